"""KD3A rounds in one process, without Flower: the client rule and :func:`aggregate_round`, called
in the order the Flower strategy calls them.

For fast behaviour tests (negative transfer, ablations) and quick studies; the Flower app remains
what runs and deploys. Uses the same per-(seed, round, party) random streams as the ClientApp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedrep.algorithms.kd3a.round import TargetReport, aggregate_round
from fedrep.algorithms.kd3a.rule import TARGET_PARTITION, KD3AOptions, KD3ARule
from fedrep.algorithms.kd3a.schedule import confidence_gate
from fedrep.algorithms.kd3a.weights import aggregate_state_dicts, initial_domain_weights
from fedrep.algorithms.training import EVAL, TRAIN, round_generator
from fedrep.config import RunConfig
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.protocol import PASSED_FRACTION, SERVER_ROUND, focus_key, source_record, teacher_bn_record


def _copy(model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in keys}


@dataclass
class KD3ARun:
    """Where an in-process run stands: the global shared arrays, every party's personal arrays,
    the moving-average domain weights and one metrics row per round."""

    shared: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    weights: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def run_kd3a(cfg: RunConfig, options: KD3AOptions, rounds: int | None = None,
             on_round: Callable[[int, KD3ARun], None] | None = None) -> KD3ARun:
    """``rounds`` KD3A rounds (default ``cfg.num_rounds``); every source answers every round."""
    rule = KD3ARule(cfg, options)
    model = rule.prepare_model(build_model(cfg))
    shared_keys, personal_keys = rule.shared_keys(model), rule.personal_keys(model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run = KD3ARun(shared={k: initial[k] for k in shared_keys},
                  personal={p: {k: initial[k] for k in personal_keys} for p in range(cfg.num_clients)})
    num_sources = cfg.num_clients - 1
    torch.set_num_threads(cfg.client_threads)  # as each ClientApp does
    for server_round in range(1, (cfg.num_rounds if rounds is None else rounds) + 1):
        sources: dict[int, dict[str, torch.Tensor]] = {}
        for pid in range(1, num_sources + 1):
            model.load_state_dict({**run.shared, **run.personal[pid]})
            result = rule.train_source(model, load_client_data(cfg, pid),
                                       round_generator(cfg.seed, server_round, pid, TRAIN),
                                       {SERVER_ROUND: server_round})
            run.personal[pid] = _copy(model, personal_keys)
            sources[pid] = result.arrays
        row: dict[str, float] = {"round": server_round}
        if options.mode == "source-only":
            averaged = aggregate_state_dicts([sources[p] for p in sorted(sources)], torch.ones(len(sources)))
            run.shared = {k: averaged[k] for k in shared_keys}
        else:
            previous = run.weights if run.weights is not None else initial_domain_weights(num_sources)
            gate = confidence_gate(server_round - 1, cfg.num_rounds, options.gate_begin, options.gate_end)
            model.load_state_dict({**run.shared, **run.personal[TARGET_PARTITION]})
            result = rule.adapt_target(
                model, load_client_data(cfg, TARGET_PARTITION),
                {source_record(p): state for p, state in sources.items()}, gate, previous[1:].clone(),
                round_generator(cfg.seed, server_round, TARGET_PARTITION, TRAIN),
                {SERVER_ROUND: server_round})
            run.personal[TARGET_PARTITION] = _copy(model, personal_keys)
            report = TargetReport(
                arrays=result.arrays, passed_fraction=float(result.metrics[PASSED_FRACTION]),
                focus={p: float(result.metrics[focus_key(p)]) for p in sources},
                teacher_bn={p: result.extra[teacher_bn_record(p)] for p in sources
                            if teacher_bn_record(p) in result.extra})
            aggregate = aggregate_round(run.shared, sources, report, num_sources, run.weights,
                                        options.consensus_focus, options.weight_momentum)
            run.shared, run.weights = aggregate.state, aggregate.weights
            row.update({"passed-fraction": report.passed_fraction,
                        **{f"weight-{p}": float(w) for p, w in enumerate(aggregate.weights)},
                        **{f"focus-{p}": float(f) for p, f in enumerate(aggregate.focus, start=1)}})
        run.history.append(row)
        if on_round is not None:
            on_round(server_round, run)
    return run


def target_accuracy(cfg: RunConfig, options: KD3AOptions, run: KD3ARun) -> float:
    """Top-1 accuracy of the target's model (global extractor, its own classifier) on its
    labelled test split: labels used here only."""
    rule = KD3ARule(cfg, options)
    model = rule.prepare_model(build_model(cfg))
    model.load_state_dict({**run.shared, **run.personal[TARGET_PARTITION]})
    result = rule.evaluate(model, load_client_data(cfg, TARGET_PARTITION),
                           round_generator(cfg.seed, len(run.history), TARGET_PARTITION, EVAL))
    if result.accuracy is None:
        raise ValueError(f"target-accuracy: the {cfg.dataset} target has no labelled test split")
    return float(result.accuracy)
