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

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrep.algorithms.kd3a import aggregate_state_dicts, confidence_gate, initial_domain_weights
from fedrep.algorithms.kd3a.round import TargetReport, aggregate_round
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
from fedrep.round_program import TrainOutcome
from server.records import from_record, to_record
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
    def _send(self, grid: Grid, content: RecordDict, nodes: list[int], kind: str,
              timeout: float) -> list[Message]:
        messages = self._address(content, nodes, kind)
        return self._split_replies(grid.send_and_receive(messages, timeout=timeout))

    def train_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                    timeout: float) -> TrainOutcome:
        """Sources, then the target with every source's model; the domain-weighted aggregate."""
        self.server_round = server_round
        known = self.discover(grid)
        node_of = {pid: node for node, pid in known.items()}
        if TARGET_PARTITION not in node_of:
            raise RuntimeError(f"round {server_round}: the target ({self.domains[0]}, partition 0) is "
                               "not connected; KD3A cannot adapt without it")
        sources = [pid for pid in range(1, len(self.domains)) if pid in node_of]
        config[SERVER_ROUND] = server_round
        source_content = RecordDict({ARRAYS: arrays, CONFIG: config})
        sent = arrays.count_bytes() * len(sources)
        replies = self._send(grid, source_content, [node_of[p] for p in sources],
                             f"{MessageType.TRAIN}.{SOURCE_ACTION}", timeout)
        models = {int(r.content[METRICS][PARTITION_ID]): r.content[ARRAYS] for r in replies}
        metrics: dict[str, Any] = {
            "train-clients": len(replies), "train-failures": len(self.last_failures),
            "bytes-to-each-source": arrays.count_bytes(),
            "bytes-from-each-source": max((m.count_bytes() for m in models.values()), default=0)}
        for r in replies:
            pid = int(r.content[METRICS][PARTITION_ID])
            metrics[f"source-loss-{self.domains[pid]}"] = float(r.content[METRICS][TRAIN_LOSS])
        if not models:
            raise RuntimeError(f"round {server_round}: every source failed; see the log")
        global_state = _tensors(arrays)
        if self.options.mode == "source-only":
            states = [_tensors(models[p]) for p in sorted(models)]
            averaged = aggregate_state_dicts(states, torch.ones(len(states)))
            return TrainOutcome(to_record({k: v.numpy() for k, v in averaged.items()}), metrics, sent)

        num_sources = len(self.domains) - 1
        previous = self.weights if self.weights is not None else initial_domain_weights(num_sources)
        gate = confidence_gate(server_round - 1, self.cfg.num_rounds, self.options.gate_begin,
                               self.options.gate_end)
        target_config = ConfigRecord({
            **dict(config), GATE: gate,
            SOURCE_WEIGHTS: [float(previous[p]) for p in sorted(models)],
        })
        target_content = RecordDict({ARRAYS: arrays, CONFIG: target_config,
                                     **{source_record(p): models[p] for p in sorted(models)}})
        metrics["bytes-to-target"] = sum(r.count_bytes() for r in target_content.array_records.values())
        sent += metrics["bytes-to-target"]
        (target_reply,) = self._send(grid, target_content, [node_of[TARGET_PARTITION]],
                                     f"{MessageType.TRAIN}.{TARGET_ACTION}", timeout) or (None,)
        if target_reply is None:
            raise RuntimeError(f"round {server_round}: the target failed: {self.last_failures}")
        target_metrics = target_reply.content[METRICS]
        metrics["bytes-from-target"] = sum(
            r.count_bytes() for r in target_reply.content.array_records.values())
        passed = float(target_metrics[PASSED_FRACTION])
        records = target_reply.content.array_records
        report = TargetReport(
            arrays=_tensors(records[ARRAYS]), passed_fraction=passed,
            focus={p: float(target_metrics[focus_key(p)]) for p in models},
            teacher_bn={p: _tensors(records[teacher_bn_record(p)]) for p in models
                        if teacher_bn_record(p) in records})
        result = aggregate_round(global_state, {p: _tensors(models[p]) for p in models}, report,
                                 num_sources, self.weights, self.options.consensus_focus,
                                 self.options.weight_momentum)
        self.weights, focus, averaged = result.weights, result.focus, result.state
        metrics.update({"passed-fraction": passed, "gate": gate,
                        "train-loss": float(target_metrics[TRAIN_LOSS])})
        for p, domain in enumerate(self.domains):
            metrics[f"weight-{domain}"] = float(self.weights[p])
            if p > 0:
                metrics[f"focus-{domain}"] = float(focus[p - 1])
        return TrainOutcome(to_record({k: v.numpy() for k, v in averaged.items()}), metrics, sent)

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
