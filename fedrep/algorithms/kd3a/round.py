"""The server half of one KD3A round as plain PyTorch: turn the target's report into domain weights
and the new global extractor.

The Flower strategy (``server/strategies/kd3a.py``) and the in-process loop
(:mod:`fedrep.algorithms.kd3a.inprocess`) both call :func:`aggregate_round`, so the arithmetic the
robustness tests check is the arithmetic a deployment runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrep.algorithms.kd3a.weights import aggregate_state_dicts, domain_weights, moving_average_weights

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class TargetReport:
    """What the target sends back after adapting: its shared arrays, the fraction of its samples
    that passed the gate, each source's consensus focus, and (when the teachers voted with target
    batch statistics) each source's BN statistics as gathered on the target's batches."""

    arrays: dict[str, Tensor]
    passed_fraction: float
    focus: dict[int, float]
    teacher_bn: dict[int, dict[str, Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundAggregate:
    state: dict[str, Tensor]  # the new global shared arrays
    weights: Tensor  # [S + 1] moving average of the domain weights, target first
    focus: Tensor  # [S] the focus the weights used (uniform when consensus focus is off)


def aggregate_round(
    global_state: StateDict,
    source_states: Mapping[int, StateDict],
    report: TargetReport,
    num_sources: int,
    previous_weights: Tensor | None,
    use_consensus_focus: bool = True,
    momentum: float = 0.9,
) -> RoundAggregate:
    """Domain weights from focus and passed fraction, smoothed across rounds, then the weighted
    average of the target's and the sources' shared arrays.

    ``source_states`` maps source partition ids (1..S) that answered this round to their full
    state dicts; a source that did not answer takes part with the old global arrays at weight 0
    (its moving-average weight is kept for the rounds it returns)."""
    answered = sorted(source_states)
    if use_consensus_focus:
        focus = torch.zeros(num_sources, dtype=torch.float64)
        for pid in answered:
            focus[pid - 1] = float(report.focus[pid])
    else:
        focus = torch.tensor([1.0 if p in source_states else 0.0 for p in range(1, num_sources + 1)],
                             dtype=torch.float64)
    weights = moving_average_weights(previous_weights, domain_weights(focus, report.passed_fraction),
                                     momentum)
    shared_keys = list(global_state)
    states: list[StateDict] = [report.arrays]
    this_round = weights.clone()
    for pid in range(1, num_sources + 1):
        if pid in source_states:
            full = {**source_states[pid], **report.teacher_bn.get(pid, {})}
            states.append({k: full[k] for k in shared_keys})
        else:
            states.append(global_state)
            this_round[pid] = 0.0
    return RoundAggregate(aggregate_state_dicts(states, this_round), weights, focus)
