"""KD3A's server half: a two-phase round on Flower messages, and the domain-weighted aggregate.

Round t (message types tell the phases apart):

1. ``train.kd3a-source`` to every source: the global feature extractor; each replies with its
   whole trained model.
2. ``train.kd3a-target`` to the target: the global extractor plus every source model in one
   message (one ArrayRecord per source), the round's confidence gate and the current source
   weights; it replies with its extractor, the fraction of its samples that passed the gate and
   each source's consensus focus.
3. Domain weights from focus and passed fraction (:func:`domain_weights`), smoothed across
   rounds, weight the average of the target's and the sources' extractors (BN statistics too,
   unless ``batchnorm = "local"``; the sources' BN statistics are those their models gathered
   while voting on the target's batches, which the target returns, as in the official code).

A source that fails or is lost gets weight 0 for the round; a lost target fails the round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrep.algorithms.kd3a.round import TargetReport, run_round
from fedrep.algorithms.kd3a.rule import (
    SOURCE_ACTION,
    TARGET_ACTION,
    TARGET_PARTITION,
    KD3AOptions,
)
from fedrep.config import RunConfig
from fedrep.protocol import (
    ACCURACY,
    ARRAYS,
    CONFIG,
    FINETUNE_EPOCHS,
    GATE,
    METRICS,
    PARTITION_ID,
    PASSED_FRACTION,
    SERVER_ROUND,
    SOURCE_WEIGHTS,
    TRAIN_LOSS,
    focus_key,
    source_record,
    teacher_bn_record,
)
from fedrep.records import from_record, to_record
from fedrep.round_program import TrainOutcome
from server.strategies.base import Federation


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in from_record(record).items()}


class KD3AStrategy(Federation):
    """KD3A's round program. Not a Flower ``Strategy``: its round has two phases with message
    types of its own, which Flower's single ``configure_train``/``aggregate_train`` pair cannot
    express; fedrep's round loop runs it through :meth:`train_round`."""

    options: KD3AOptions

    def __init__(self, cfg: RunConfig, options: KD3AOptions) -> None:
        super().__init__(cfg, options)
        self.domains = cfg.party_names()  # domain per partition; domain-j when nodes share one
        self.weights: torch.Tensor | None = None  # [S+1], target first: the moving average

    # -- resumable state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"domain-weights": None if self.weights is None else self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state.get("domain-weights")
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)

    # -- one round -------------------------------------------------------------------------------
    def train_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                    timeout: float) -> TrainOutcome:
        """Sources, then the target with every source's model; the domain-weighted aggregate
        (:func:`~fedrep.algorithms.kd3a.round.run_round`, the round the in-process loop runs)."""
        self.server_round = server_round
        known = self.discover(grid)
        node_of = {pid: node for node, pid in known.items()}
        if TARGET_PARTITION not in node_of:
            raise RuntimeError(f"round {server_round}: the target ({self.domains[0]}, partition 0) is "
                               "not connected; KD3A cannot adapt without it")
        config[SERVER_ROUND] = server_round
        parties = _GridParties(self, grid, node_of, arrays, config, timeout)
        outcome = run_round(server_round, _tensors(arrays), parties, self.options, self.cfg.num_rounds,
                            len(self.domains) - 1, self.weights)
        self.weights = outcome.weights
        metrics = parties.metrics
        if outcome.report is not None and outcome.weights is not None and outcome.focus is not None:
            metrics.update({"passed-fraction": outcome.report.passed_fraction, "gate": outcome.gate,
                            "train-loss": outcome.report.train_loss})
            for p, domain in enumerate(self.domains):
                metrics[f"weight-{domain}"] = float(outcome.weights[p])
                if p > 0:
                    metrics[f"focus-{domain}"] = float(outcome.focus[p - 1])
        state = to_record({k: v.numpy() for k, v in outcome.state.items()})
        return TrainOutcome(state, metrics, parties.sent)

    # -- evaluation ------------------------------------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if FINETUNE_EPOCHS in config:  # the target has no labels to fine-tune with
            del config[FINETUNE_EPOCHS]
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        out = super().aggregate_evaluate(server_round, replies)
        if out is None:
            return None
        for reply in replies:
            if reply.has_error() or ACCURACY not in reply.content[METRICS]:
                continue
            pid = int(reply.content[METRICS][PARTITION_ID])
            accuracy = float(reply.content[METRICS][ACCURACY])
            out["target-accuracy" if pid == TARGET_PARTITION else f"accuracy-{self.domains[pid]}"] = accuracy
        return out


class _GridParties:
    """:class:`~fedrep.algorithms.kd3a.round.KD3AParties` over Flower messages: ``train.kd3a-source``
    to every connected source, then one ``train.kd3a-target`` carrying every source model (the
    records the sources sent, forwarded as they came). Counts bytes and per-source losses."""

    def __init__(self, strategy: KD3AStrategy, grid: Grid, node_of: dict[int, int], arrays: ArrayRecord,
                 config: ConfigRecord, timeout: float) -> None:
        self.strategy, self.grid, self.node_of = strategy, grid, node_of
        self.arrays, self.config, self.timeout = arrays, config, timeout
        self.records: dict[int, ArrayRecord] = {}
        self.metrics: dict[str, Any] = {}
        self.sent = 0

    def _send(self, content: RecordDict, nodes: list[int], kind: str) -> list[Message]:
        return self.strategy.send_and_collect(self.grid, content, nodes, kind, self.timeout)

    def train_sources(self, server_round: int, global_state: Mapping[str, torch.Tensor]
                      ) -> dict[int, dict[str, torch.Tensor]]:
        sources = [pid for pid in range(1, len(self.strategy.domains)) if pid in self.node_of]
        self.sent = self.arrays.count_bytes() * len(sources)
        replies = self._send(RecordDict({ARRAYS: self.arrays, CONFIG: self.config}),
                             [self.node_of[p] for p in sources], f"{MessageType.TRAIN}.{SOURCE_ACTION}")
        self.records = {int(r.content[METRICS][PARTITION_ID]): r.content[ARRAYS] for r in replies}
        self.metrics.update({
            "train-clients": len(replies), "train-failures": len(self.strategy.last_failures),
            "bytes-to-each-source": self.arrays.count_bytes(),
            "bytes-from-each-source": max((m.count_bytes() for m in self.records.values()), default=0)})
        for r in replies:
            pid = int(r.content[METRICS][PARTITION_ID])
            self.metrics[f"source-loss-{self.strategy.domains[pid]}"] = float(r.content[METRICS][TRAIN_LOSS])
        return {pid: _tensors(record) for pid, record in self.records.items()}

    def adapt_target(self, server_round: int, global_state: Mapping[str, torch.Tensor],
                     sources: Mapping[int, Mapping[str, torch.Tensor]], gate: float,
                     source_weights: list[float]) -> TargetReport:
        config = ConfigRecord({**dict(self.config), GATE: gate, SOURCE_WEIGHTS: source_weights})
        content = RecordDict({ARRAYS: self.arrays, CONFIG: config,
                              **{source_record(p): self.records[p] for p in sources}})
        self.metrics["bytes-to-target"] = sum(r.count_bytes() for r in content.array_records.values())
        self.sent += self.metrics["bytes-to-target"]
        (reply,) = self._send(content, [self.node_of[TARGET_PARTITION]],
                              f"{MessageType.TRAIN}.{TARGET_ACTION}") or (None,)
        if reply is None:
            raise RuntimeError(f"round {server_round}: the target failed: {self.strategy.last_failures}")
        metrics, records = reply.content[METRICS], reply.content.array_records
        self.metrics["bytes-from-target"] = sum(r.count_bytes() for r in records.values())
        return TargetReport(
            arrays=_tensors(records[ARRAYS]), passed_fraction=float(metrics[PASSED_FRACTION]),
            focus={p: float(metrics[focus_key(p)]) for p in sources},
            teacher_bn={p: _tensors(records[teacher_bn_record(p)]) for p in sources
                        if teacher_bn_record(p) in records},
            train_loss=float(metrics[TRAIN_LOSS]))
