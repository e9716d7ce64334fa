"""The server's round loop: train, aggregate, evaluate, checkpoint, report; resumable.

Flower's ``Strategy.start`` runs rounds too, but it has no checkpoint/resume, no run folder and
no audit of received messages; this loop calls the same strategy hooks and adds those.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedrep.config import RunConfig
from fedrep.data.synthetic import ground_truth_representation, principal_angle_distance
from fedrep.models import build_model
from fedrep.plotting import plot_run
from fedrep.registry import get_strategy
from fedrep.results import RunDir
from server.records import from_record, to_record


class AuditingGrid:
    """A Grid proxy that records every message the server receives (kind, sender, the array
    names and bytes it carried), so 'the head never leaves the client' is checkable."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.server_round = 0
        self.rows: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        # Message ids exist once sent; an error the SuperLink wrote for a vanished node has the
        # SuperLink as sender, so name the node the answered message went to.
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:
            row: dict[str, Any] = {
                "round": self.server_round,
                "kind": reply.metadata.message_type,
                "node": dst_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id),
                "error": reply.error.reason if reply.has_error() else None,
                "arrays": [],
                "bytes": 0,
            }
            if not reply.has_error():
                for name, record in reply.content.array_records.items():
                    row["arrays"] += [f"{name}/{key}" for key in record]
                    row["bytes"] += record.count_bytes()
                metrics = reply.content.metric_records.get("metrics")
                if metrics is not None:
                    row["metrics"] = dict(metrics)
                    if "partition-id" in metrics:
                        row["partition"] = int(metrics["partition-id"])
            self.rows.append(row)
        return replies

    def drain(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows


def _open_run(cfg: RunConfig) -> tuple[RunDir, RunConfig, int]:
    """(run folder, effective config, last completed round)."""
    if not cfg.resume:
        run, cfg = RunDir.create(cfg)
        return run, cfg, 0
    run = RunDir.open(cfg.run_dir)
    run.check_resumable_with(cfg)
    last = run.last_completed_round()
    run.truncate_metrics(last)
    cfg = cfg.model_copy(update={"run_dir": str(run.path)})
    run.write_config(cfg.model_copy(update={"resume": False}))
    return run, cfg, last


def _progress(cfg: RunConfig, server_round: int, row: dict[str, Any], started: float,
              first_round: int) -> None:
    done = server_round - first_round + 1
    per_round = (time.perf_counter() - started) / done
    eta = per_round * (cfg.num_rounds - server_round)
    parts = [f"round {server_round:>3}/{cfg.num_rounds}"]
    if "target-accuracy" in row:
        parts.append(f"target acc {row['target-accuracy']:.4f}")
    if "passed-fraction" in row:
        parts.append(f"passed {row['passed-fraction']:.2f}")
    if "accuracy-mean" in row:
        parts.append(f"acc {row['accuracy-mean']:.4f} ± {row['accuracy-std']:.4f}")
    if "accuracy-trained-mean" in row and row.get("eval-untrained", 0) > 0:
        parts.append(f"trained {row['accuracy-trained-mean']:.4f}")
    if "accuracy-finetuned-mean" in row:
        parts.append(f"fine-tuned {row['accuracy-finetuned-mean']:.4f}")
    if "train-loss" in row and not math.isnan(row["train-loss"]):
        parts.append(f"train-loss {row['train-loss']:.4g}")
    if "representation-distance" in row:
        parts.append(f"dist(B,B*) {row['representation-distance']:.2e}")
    parts.append(f"{row['round-seconds']:.1f}s/round, eta {eta:.0f}s")
    print("[fedrep] " + " | ".join(parts), file=sys.stderr, flush=True)


def check_finite(server_round: int, arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
    """Stop a diverged run before its NaNs become the global model and its checkpoint."""
    bad = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        loss = f" (train-loss {metrics['train-loss']})" if "train-loss" in metrics else ""
        done = server_round - 1
        kept = ("no round completed" if done == 0 else
                f"the run folder keeps round{'s 1-' if done > 1 else ' '}{done} for inspection")
        raise FloatingPointError(
            f"round {server_round}: the aggregated model has NaN/inf in {bad[:3]}"
            f"{' and more' if len(bad) > 3 else ''}{loss}; local training diverged. Start a new run "
            f"with a smaller lr (or smaller strategy step sizes, e.g. KD3A's mmd_weight); {kept}")


def _strategy_state(strategy: Any) -> dict[str, Any]:
    """What a stateful strategy needs to resume, kept in state.json next to the round."""
    if hasattr(strategy, "strategy_state"):
        return {"strategy-state": strategy.strategy_state()}
    return {}


def _describe(event: dict[str, Any]) -> str:
    where = f"round {event['round']}: partition {event.get('partition')} (node {event.get('node')})"
    if event["event"] == "node-lost":
        return f"{where} lost: {event.get('reason')}"
    if event["event"] == "node-rejoined":
        return f"{where} rejoined (lost in round {event.get('lost_in_round')}); head {event.get('head')}"
    return f"{where}: {event['event']}"


def run_federation(grid: Grid, cfg: RunConfig, timeout: float = 3600.0) -> RunDir:
    run, cfg, last = _open_run(cfg)
    plugin = get_strategy(cfg.strategy)
    rule = plugin.client_rule(cfg)
    model = rule.prepare_model(build_model(cfg))
    rule.check(model)  # a deployment has no CLI preflight: refuse before any client works
    shared_keys = rule.shared_keys(model)
    strategy = plugin.server_strategy(cfg)
    if last > 0:
        arrays = run.load_checkpoint(last)
        if hasattr(strategy, "load_strategy_state"):  # e.g. KD3A's moving-average domain weights
            strategy.load_strategy_state(run.state().get("strategy-state", {}))
        print(f"[fedrep] resuming {run.path} after round {last}", file=sys.stderr, flush=True)
    else:
        state = model.state_dict()
        arrays = {k: state[k].numpy() for k in shared_keys}
    b_star = (ground_truth_representation(cfg.linear_dim, cfg.linear_rank, cfg.seed)
              if cfg.dataset == "linear-synthetic" else None)
    audit = AuditingGrid(grid)
    print(f"[fedrep] {cfg.strategy} on {cfg.dataset}: {cfg.num_clients} clients, "
          f"{cfg.num_rounds} round{'s' if cfg.num_rounds != 1 else ''} -> {run.path}",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    for server_round in range(last + 1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        audit.server_round = server_round
        record = to_record(arrays)
        config = ConfigRecord({"run-dir": str(run.path)})
        if hasattr(strategy, "train_round"):  # a strategy with its own multi-phase round (KD3A)
            new_arrays, train_metrics, sent = strategy.train_round(server_round, record, config, audit,
                                                                   timeout)
        else:
            train_msgs = list(strategy.configure_train(server_round, record, config, audit))
            if not train_msgs:
                raise RuntimeError(f"round {server_round}: no client available to train")
            replies = audit.send_and_receive(train_msgs, timeout=timeout)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            sent = record.count_bytes() * len(train_msgs)
        if new_arrays is None:
            raise RuntimeError(f"round {server_round}: every sampled client failed; see log")
        aggregated = from_record(new_arrays)
        try:
            check_finite(server_round, aggregated, dict(train_metrics or {}))
        except FloatingPointError as err:  # keep the last good round's strategy state, not this one's
            good = {k: v for k, v in run.state().items() if k == "strategy-state"}
            run.write_state(server_round - 1, "diverged", error=str(err), **good)
            raise
        arrays = aggregated
        row: dict[str, Any] = {"round": server_round}
        row.update(dict(train_metrics or {}))
        row["bytes-sent"] = sent
        if server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds:
            eval_record = new_arrays  # the aggregate, already a record
            eval_config = ConfigRecord({"run-dir": str(run.path)})
            if server_round == cfg.num_rounds and cfg.final_finetune_epochs > 0:
                eval_config["finetune-epochs"] = cfg.final_finetune_epochs
            eval_msgs = list(strategy.configure_evaluate(server_round, eval_record, eval_config, audit))
            eval_metrics = strategy.aggregate_evaluate(
                server_round, audit.send_and_receive(eval_msgs, timeout=timeout))
            row.update(dict(eval_metrics or {}))
            row["bytes-sent"] += eval_record.count_bytes() * len(eval_msgs)
        if b_star is not None and "body.weight" in arrays:
            row["representation-distance"] = principal_angle_distance(arrays["body.weight"].T, b_star)
        events = strategy.drain_events() if hasattr(strategy, "drain_events") else []
        row["nodes-lost"] = len(getattr(strategy, "lost", {}))
        audit_rows = audit.drain()
        row["bytes-received"] = sum(r["bytes"] for r in audit_rows)
        row["round-seconds"] = time.perf_counter() - t0
        run.save_checkpoint(server_round, arrays)
        run.append_audit(audit_rows)
        run.append_events(events)
        run.append_metrics(row)
        run.write_state(server_round, "running", **_strategy_state(strategy))
        _progress(cfg, server_round, row, started, last + 1)
        for event in events:
            print(f"[fedrep] {_describe(event)}", file=sys.stderr, flush=True)
    run.write_state(cfg.num_rounds, "completed", **_strategy_state(strategy))
    plot = plot_run(run.path)
    print(f"[fedrep] done: metrics {run.metrics_file}, plot {plot}", file=sys.stderr, flush=True)
    return run
