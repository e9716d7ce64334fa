"""Single-process oracles the Flower paths are checked against (test code, not library code).

* :func:`run_reference`: the shared-averaging arithmetic (FedRep and the baselines) as one plain
  PyTorch loop, same seed, same sampled clients, same shuffles, so the same bodies as a Flower
  simulation; also drives fast math tests (recovering B* on the linear task).
* :func:`run_kd3a`: KD3A rounds through the library's own round
  (:func:`fedrep.algorithms.kd3a.round.run_round`), with the parties reached by direct calls to the
  client rule instead of messages; for the parity test and the robustness tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fedrep.algorithms.aggregate import sum_groups, summarize, weighted_average
from fedrep.algorithms.base import ClientUpdateRule
from fedrep.algorithms.kd3a.round import TargetReport, run_round
from fedrep.algorithms.kd3a.rule import TARGET_PARTITION, KD3AOptions, KD3ARule
from fedrep.algorithms.sampling import sample_clients
from fedrep.algorithms.training import EVAL, TRAIN, round_generator
from fedrep.config import RunConfig
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.models.base import SplitModel
from fedrep.protocol import (
    PASSED_FRACTION,
    SERVER_ROUND,
    TRAIN_LOSS,
    focus_key,
    source_record,
    teacher_bn_record,
)


@dataclass
class ReferenceRun:
    shared: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    history: list[dict[str, float]] = field(default_factory=list)


def _state(model: SplitModel, keys: list[str]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


def run_reference(
    cfg: RunConfig,
    rule: ClientUpdateRule,
    rounds: int | None = None,
    on_round: Callable[[int, SplitModel, ReferenceRun], dict[str, float]] | None = None,
) -> ReferenceRun:
    """Run ``rounds`` rounds (default ``cfg.num_rounds``); ``on_round`` may add metrics."""
    model = rule.prepare_model(build_model(cfg))
    shared_keys, personal_keys = rule.shared_keys(model), rule.personal_keys(model)
    initial_personal = _state(model, personal_keys)
    run = ReferenceRun(shared=_state(model, shared_keys), personal={})
    torch.set_num_threads(cfg.client_threads)
    for server_round in range(1, (cfg.num_rounds if rounds is None else rounds) + 1):
        updates, losses, weights = [], [], []
        for client in sample_clients(cfg.seed, server_round, range(cfg.num_clients), cfg.fraction_train):
            data = load_client_data(cfg, client)
            personal = run.personal.get(client, initial_personal)
            model.load_state_dict({**run.shared, **personal})
            result = rule.fit(model, data, round_generator(cfg.seed, server_round, client))
            run.personal[client] = _state(model, personal_keys)
            shared_now = {k: v.numpy() for k, v in _state(model, shared_keys).items()}
            updates.append((shared_now, result.num_examples))
            losses.append(result.loss)
            weights.append(result.num_examples)
        averaged = weighted_average(updates, sum_groups(range(len(updates))))  # a train round's groups
        run.shared = {k: torch.from_numpy(v) for k, v in averaged.items()}
        metrics: dict[str, float] = {
            "round": server_round, "train-loss": summarize(losses, weights)["weighted-mean"]}
        if on_round is not None:
            model.load_state_dict({**run.shared, **initial_personal})
            metrics.update(on_round(server_round, model, run))
        run.history.append(metrics)
    return run


def evaluate_all(cfg: RunConfig, rule: ClientUpdateRule, run: ReferenceRun) -> dict[str, float]:
    """Mean of local accuracies (and loss) over all clients, each with its own personal part."""
    rounds_done = len(run.history)
    model = rule.prepare_model(build_model(cfg))
    initial_personal = _state(model, rule.personal_keys(model))
    accs, losses = [], []
    for client in range(cfg.num_clients):
        model.load_state_dict({**run.shared, **run.personal.get(client, initial_personal)})
        gen = round_generator(cfg.seed, rounds_done, client, EVAL)
        res = rule.evaluate(model, load_client_data(cfg, client), gen)
        losses.append(res.loss)
        if res.accuracy is not None:
            accs.append(res.accuracy)
    out = {f"loss-{k}": v for k, v in summarize(losses).items()}
    if accs:
        out.update({f"accuracy-{k}": v for k, v in summarize(accs).items()})
    return out


@dataclass
class KD3ARun:
    """Where an in-process run stands: the global shared arrays, every party's personal arrays,
    the moving-average domain weights and one metrics row per round."""

    shared: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    weights: torch.Tensor | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class _InProcessParties:
    """:class:`KD3AParties` by direct calls to the rule, with the ClientApp's random streams."""

    def __init__(self, cfg: RunConfig, rule: KD3ARule, model: torch.nn.Module, run: KD3ARun) -> None:
        self.cfg, self.rule, self.model, self.run = cfg, rule, model, run
        self.personal_keys = rule.personal_keys(model)

    def _load(self, pid: int, global_state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict({**global_state, **self.run.personal[pid]})

    def train_sources(self, server_round: int, global_state: Mapping[str, torch.Tensor]
                      ) -> dict[int, dict[str, torch.Tensor]]:
        sources = {}
        for pid in range(1, self.cfg.num_clients):
            self._load(pid, global_state)
            result = self.rule.train_source(self.model, load_client_data(self.cfg, pid),
                                            round_generator(self.cfg.seed, server_round, pid, TRAIN),
                                            {SERVER_ROUND: server_round})
            self.run.personal[pid] = _state(self.model, self.personal_keys)
            sources[pid] = result.arrays
        return sources

    def adapt_target(self, server_round: int, global_state: Mapping[str, torch.Tensor],
                     sources: Mapping[int, Mapping[str, torch.Tensor]], gate: float,
                     source_weights: list[float]) -> TargetReport:
        self._load(TARGET_PARTITION, global_state)
        teachers = {source_record(p): dict(state) for p, state in sources.items()}
        generator = round_generator(self.cfg.seed, server_round, TARGET_PARTITION, TRAIN)
        data = load_client_data(self.cfg, TARGET_PARTITION)
        result = self.rule.adapt_target(self.model, data, teachers, gate, torch.tensor(source_weights),
                                        generator, {SERVER_ROUND: server_round})
        self.run.personal[TARGET_PARTITION] = _state(self.model, self.personal_keys)
        return TargetReport(
            arrays=result.arrays, passed_fraction=float(result.metrics[PASSED_FRACTION]),
            focus={p: float(result.metrics[focus_key(p)]) for p in sources},
            teacher_bn={p: result.extra[teacher_bn_record(p)] for p in sources
                        if teacher_bn_record(p) in result.extra},
            train_loss=float(result.metrics[TRAIN_LOSS]))


def run_kd3a(cfg: RunConfig, options: KD3AOptions, rounds: int | None = None,
             on_round: Callable[[int, KD3ARun], None] | None = None) -> KD3ARun:
    """``rounds`` KD3A rounds (default ``cfg.num_rounds``); every source answers every round."""
    rule = KD3ARule(cfg, options)
    model = rule.prepare_model(build_model(cfg))
    shared_keys, personal_keys = rule.shared_keys(model), rule.personal_keys(model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run = KD3ARun(shared={k: initial[k] for k in shared_keys},
                  personal={p: {k: initial[k] for k in personal_keys} for p in range(cfg.num_clients)})
    parties = _InProcessParties(cfg, rule, model, run)
    torch.set_num_threads(cfg.client_threads)  # as each ClientApp does
    for server_round in range(1, (cfg.num_rounds if rounds is None else rounds) + 1):
        outcome = run_round(server_round, run.shared, parties, options, cfg.num_rounds,
                            cfg.num_clients - 1, run.weights)
        run.shared, run.weights = outcome.state, outcome.weights
        row: dict[str, float] = {"round": server_round}
        if outcome.report is not None and outcome.weights is not None and outcome.focus is not None:
            row.update({"passed-fraction": outcome.report.passed_fraction,
                        **{f"weight-{p}": float(w) for p, w in enumerate(outcome.weights)},
                        **{f"focus-{p}": float(f) for p, f in enumerate(outcome.focus, start=1)}})
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
