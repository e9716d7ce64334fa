"""The server half of one KD3A round as plain PyTorch: who is asked what in which order
(:func:`run_round`), and how the target's report becomes domain weights and the new global
extractor (:func:`aggregate_round`).

The Flower strategy (``server/strategies/kd3a.py``) reaches the parties with messages on a grid;
the tests' single-process oracle (``tests/single_process.py``) with direct calls to the rule.
Both implement :class:`KD3AParties` and call :func:`run_round`, so the round the robustness tests
check is the round a deployment runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from fedrep.algorithms.kd3a.rule import KD3AOptions
from fedrep.algorithms.kd3a.schedule import confidence_gate
from fedrep.algorithms.kd3a.weights import (
    aggregate_state_dicts,
    domain_weights,
    initial_domain_weights,
    moving_average_weights,
)

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
    train_loss: float = float("nan")


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


class KD3AParties(Protocol):
    """How a round reaches the parties: Flower messages on a grid, or direct calls in one process."""

    def train_sources(self, server_round: int, global_state: StateDict) -> dict[int, dict[str, Tensor]]:
        """Every reachable source trains from ``global_state``; each answer's whole model by
        partition id (1..S). Sources that fail are simply absent."""
        ...

    def adapt_target(self, server_round: int, global_state: StateDict, sources: Mapping[int, StateDict],
                     gate: float, source_weights: list[float]) -> TargetReport:
        """The target adapts with ``sources`` (in partition order, ``source_weights`` alike)."""
        ...


@dataclass(frozen=True)
class RoundOutcome:
    """One round's result: the new global shared arrays and what the round measured. ``weights``
    stays the previous moving average for source-only rounds (no target step, no weights)."""

    state: dict[str, Tensor]
    sources: dict[int, dict[str, Tensor]]
    weights: Tensor | None = None
    focus: Tensor | None = None
    gate: float | None = None
    report: TargetReport | None = None


def run_round(server_round: int, global_state: StateDict, parties: KD3AParties, options: KD3AOptions,
              num_rounds: int, num_sources: int, previous_weights: Tensor | None) -> RoundOutcome:
    """One KD3A round (official ``train.py``'s order): the sources train, the target votes and
    adapts with the round's confidence gate, and the domain-weighted average gives the new global
    arrays. ``mode = "source-only"`` averages the sources' models instead (no target step)."""
    sources = parties.train_sources(server_round, global_state)
    if not sources:
        raise RuntimeError(f"round {server_round}: every source failed; see the log")
    if options.mode == "source-only":
        averaged = aggregate_state_dicts([sources[p] for p in sorted(sources)], torch.ones(len(sources)))
        return RoundOutcome({k: averaged[k] for k in global_state}, sources, previous_weights)
    previous = previous_weights if previous_weights is not None else initial_domain_weights(num_sources)
    gate = confidence_gate(server_round - 1, num_rounds, options.gate_begin, options.gate_end)
    report = parties.adapt_target(server_round, global_state, {p: sources[p] for p in sorted(sources)},
                                  gate, [float(previous[p]) for p in sorted(sources)])
    result = aggregate_round(global_state, sources, report, num_sources, previous_weights,
                             options.consensus_focus, options.weight_momentum)
    return RoundOutcome(result.state, sources, result.weights, result.focus, gate, report)
