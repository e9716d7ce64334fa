"""The server's round loop: train, aggregate, evaluate, checkpoint, report; resumable.

Flower's ``Strategy.start`` runs rounds too, but it has no checkpoint/resume, no run folder and
no audit of received messages; this loop calls the same strategy hooks and adds those.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedrep import runlock
from fedrep.algorithms.aggregate import PAPER_METRIC, PAPER_WINDOW, WEIGHTED_ACCURACY, last_rounds_mean
from fedrep.algorithms.privacy import update_norm
from fedrep.config import RunConfig
from fedrep.data.synthetic import ground_truth_representation, principal_angle_distance
from fedrep.flower_runtime import (
    notify_pushed,
    pull_interval,
    replies_stored,
    simulated_partitions,
    wait_for_replies,
)
from fedrep.interrupts import IN_PROCESS
from fedrep.models import build_model
from fedrep.plotting import plot_run
from fedrep.protocol import (
    ACCURACY,
    ARRAYS,
    FINETUNE_EPOCHS,
    FINETUNED,
    METRICS,
    NO_REPLY,
    PARTITION_ID,
    RUN_DIR,
    Restored,
    restored_of,
)
from fedrep.records import from_record, to_record
from fedrep.registry import get_strategy
from fedrep.results import (
    ONBOARDED,
    RunDir,
    RunFileError,
    client_error_text,
    new_run_name,
    run_folder_failure_in,
)
from fedrep.round_program import RoundProgram
from fedrep.tracking import Trackers, trackers_from
from server.privacy import PrivacyBudgetReached
from server.strategies.base import SharedAveraging

SAFETY_PULL_S = 1.0  # the longest a simulated ServerApp goes without a pull while it waits


class RunFolderFailure(RuntimeError):
    """A client could not read or write its part of the run folder; the round does not count."""


class AuditingGrid:
    """A Grid proxy that records every message the server receives (kind, sender, the array
    names and bytes it carried), so 'the head never leaves the client' is checkable, and how
    long the server waited for each kind of reply (a round's time = those waits + its own work)."""

    def __init__(self, grid: Grid, run: RunDir, update_norms: bool = False) -> None:
        self._grid = grid
        self._run = run
        self.update_norms = update_norms  # under DP: record how far each train reply moved the model
        self.server_round = 0
        self.rows: list[dict[str, Any]] = []
        self.partition_of: dict[int, int] = {}  # node -> partition, from earlier replies
        self.waited: dict[str, float] = {}  # message kind -> seconds from push to last reply, this round

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _exchange(self, messages: list[Message], timeout: float | None) -> tuple[list[Message], set[str]]:
        """Flower's ``send_and_receive`` (push, then pull until every reply is in or the timeout
        passes), written out so that an in-process stop request ends the wait. Returns the
        replies and the ids of the messages still unanswered."""
        waiting = set(self._grid.push_messages(messages))
        notify_pushed()
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        interval = pull_interval(self._grid)
        pull, stored, pulled_at = True, 0, 0.0
        while True:
            # In a simulation, a pull when all are in (each pull re-validates every awaited
            # message), and one a second in case a reply came some other way (the LinkState's
            # own error replies are not counted).
            if pull or time.monotonic() - pulled_at >= SAFETY_PULL_S:
                # the count before the pull (see wait_for_replies)
                stored, pulled_at = replies_stored(), time.monotonic()
                got = list(self._grid.pull_messages(waiting))
                replies += got
                waiting.difference_update(m.metadata.reply_to_message_id for m in got)
                if not waiting:
                    break
            if timeout is not None and time.monotonic() >= end:
                break
            IN_PROCESS.check(f"in round {self.server_round}")
            pull = (wait_for_replies(stored + len(waiting), interval)
                    or (timeout is not None and time.monotonic() >= end))
        return replies, waiting

    def _missing_replies(self, sent_of: dict[str, Message], waiting: set[str],
                         timeout: float) -> list[Message]:
        """Error replies standing in for the messages nobody answered within ``timeout`` s, so
        that the round counts those clients as failed (and lost) like any other failure."""
        reason = (f"{NO_REPLY} {timeout:g}s (a node restarted mid-round never answers the message it "
                  "had: Flower 1.41 does not resend it; reply-timeout bounds the wait)")
        log(WARNING, "round %d: %d of %d clients did not reply within %gs; going on without them",
            self.server_round, len(waiting), len(sent_of), timeout)
        return [Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason), reply_to=sent_of[mid])
                for mid in sorted(waiting) if mid in sent_of]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        messages = list(messages)
        started = time.perf_counter()
        replies, waiting = self._exchange(messages, timeout)
        elapsed = time.perf_counter() - started
        for kind in {m.metadata.message_type for m in messages}:
            self.waited[kind] = self.waited.get(kind, 0.0) + elapsed
        # Message ids exist once sent; an error the SuperLink wrote for a vanished node has the
        # SuperLink as sender, so name the node the answered message went to.
        sent_of = {m.metadata.message_id: m for m in messages}
        if waiting and timeout is not None:
            replies += self._missing_replies(sent_of, waiting, timeout)
        first_new = len(self.rows)
        for reply in replies:
            asked = sent_of.get(reply.metadata.reply_to_message_id)
            row: dict[str, Any] = {
                "round": self.server_round,
                "kind": reply.metadata.message_type,
                "node": asked.metadata.dst_node_id if asked is not None else reply.metadata.src_node_id,
                "error": reply.error.reason if reply.has_error() else None,
                "arrays": [],
                "bytes": 0,
            }
            if not reply.has_error():
                # One pass over the content: RecordDict.array_records / .metric_records build
                # a synced copy per call, a cost per reply the server pays 2,000 times a round.
                metrics = None
                for name, record in reply.content.items():
                    if isinstance(record, ArrayRecord):
                        row["arrays"] += [f"{name}/{key}" for key in record]
                        row["bytes"] += record.count_bytes()
                    elif name == METRICS and isinstance(record, MetricRecord):
                        metrics = record
                if (self.update_norms and asked is not None
                        and reply.metadata.message_type == MessageType.TRAIN):
                    row["update-norm"] = update_norm(from_record(asked.content[ARRAYS]),
                                                     from_record(reply.content[ARRAYS]))
                if metrics is not None:
                    row["metrics"] = dict(metrics)
                    if PARTITION_ID in metrics:
                        row["partition"] = int(metrics[PARTITION_ID])
                        self.partition_of[row["node"]] = row["partition"]
            elif (partition := self.partition_of.get(row["node"],
                                                      simulated_partitions().get(row["node"]))) is not None:
                row["partition"] = partition
            self.rows.append(row)
        self._stop_on_run_folder_failure(self.rows[first_new:])
        return replies

    def _stop_on_run_folder_failure(self, rows: list[dict[str, Any]]) -> None:
        """A client that cannot read its head or write its state ends the run here, before the
        round's aggregate or checkpoint exists, so a resume re-runs the round with every client."""
        failures = [msg for r in rows if r["error"] and (msg := run_folder_failure_in(r["error"]))]
        if not failures:
            return
        others = len(failures) - 1
        more = f" (and {others} more client{'s' * (others > 1)})" if others else ""
        first = failures[0]
        if "head file" in first and "cannot write" not in first:
            fix = (f"restore the file and `fedrep run --resume {self._run.path}`, or `fedrep run --resume "
                   f"{self._run.path} --restart-damaged-heads` to start that client from a fresh head")
        else:
            fix = f"fix that (free space, permissions) and `fedrep run --resume {self._run.path}`"
        raise RunFolderFailure(f"round {self.server_round} stopped before it counted: {first}{more}; {fix}")

    def drain(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows

    def drain_waits(self) -> dict[str, float]:
        """This round's waits as metrics columns: ``train-phase-seconds`` and
        ``evaluate-phase-seconds`` (push to last reply; other kinds as ``<kind>-phase-seconds``)."""
        waited, self.waited = self.waited, {}
        return {f"{kind}-phase-seconds": seconds for kind, seconds in sorted(waited.items())}


def _open_run(cfg: RunConfig) -> tuple[RunDir, RunConfig, int]:
    """(run folder, effective config, last completed round), with the folder's lock held."""
    path = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.out_dir) / new_run_name(cfg)
    if not cfg.resume:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise RunFileError(f"{path} does not exist; pass the folder a previous `fedrep run` printed")
    runlock.acquire(path)  # re-entrant: `fedrep run` already holds it in this process
    try:
        if not cfg.resume:
            run, cfg = RunDir.create(cfg.model_copy(update={"run_dir": str(path)}))
            return run, cfg, 0
        run = RunDir.open(path)
        run.check_resumable_with(cfg)
        run.clean_temp_files()
        last = run.last_completed_round()
        run.truncate_metrics(last)
        saved = run.saved_config()
        same_options = cfg.strategy_options if cfg.strategy_options == saved.strategy_options else (
            saved.strategy_options)  # check_resumable_with found them equal as tables: keep the text
        cfg = cfg.model_copy(update={"run_dir": str(run.path), "strategy_options": same_options})
        run.write_config(cfg.model_copy(update={"resume": False, "onboard": False}))  # one-off switches
        return run, cfg, last
    except BaseException:
        runlock.release(path)
        raise


def _progress(cfg: RunConfig, server_round: int, row: dict[str, Any], started: float,
              first_round: int, warning: str | None = None) -> None:
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
    if "dp-epsilon" in row:
        parts.append(f"ε {row['dp-epsilon']:.3g} (δ {row['dp-delta']:g})")
    elif cfg.dp != "none":
        parts.append("ε ∞ (no noise)")
    if "representation-distance" in row:
        parts.append(f"dist(B,B*) {row['representation-distance']:.2e}")
    parts.append(f"{row['round-seconds']:.1f}s/round, eta {eta:.0f}s")
    if warning:
        parts.append(warning)
    print("[fedrep] " + " | ".join(parts), file=sys.stderr, flush=True)


def _new_clients_metrics(cfg: RunConfig, program: RoundProgram, server_round: int, arrays: Any,
                         run: RunDir, audit: AuditingGrid, timeout: float) -> dict[str, Any]:
    """The paper's generalisation experiment, after the last round: each held-out client trains
    from the final model for new-client-epochs (FedRep: a fresh head on the final representation)
    and reports; their metrics as ``new-clients-*``."""
    outcome = program.evaluate_new_clients(server_round, arrays, ConfigRecord({RUN_DIR: str(run.path)}),
                                           audit, timeout)
    out = {f"new-clients-{k}": v for k, v in outcome.metrics.items()}
    if "new-clients-accuracy-finetuned-mean" in out:
        print(f"[fedrep] {out['new-clients-eval-clients']} new clients after {cfg.new_client_epochs} epochs "
              f"from the final model: accuracy {out['new-clients-accuracy-finetuned-mean']:.4f} (weighted "
              f"{out['new-clients-accuracy-finetuned-weighted-mean']:.4f})", file=sys.stderr, flush=True)
    return out


def evaluates(cfg: RunConfig, server_round: int) -> bool:
    """Evaluate every ``eval-every`` rounds, and every round of the last 10 of a classification
    task: the paper's metric averages those (official main_fedrep.py tests when ``iter >=
    epochs - 10``); the regression task has no accuracy to average."""
    last = server_round > cfg.num_rounds - PAPER_WINDOW and cfg.dataset != "linear-synthetic"
    return server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds or last


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


def _strategy_state(program: RoundProgram) -> dict[str, Any]:
    """What a stateful round program needs to resume, kept in state.json next to the round."""
    state = program.state_dict()
    return {"strategy-state": state} if state else {}


def _describe(event: dict[str, Any]) -> str:
    where = f"round {event['round']}: partition {event.get('partition')} (node {event.get('node')})"
    if event["event"] == "node-lost":
        return f"{where} lost: {event.get('reason')}"
    if event["event"] == "node-rejoined":
        return f"{where} rejoined (lost in round {event.get('lost_in_round')}); head {event.get('head')}"
    if event["event"] == "client-failed":
        return f"{where} failed its {event.get('kind')} message: {event.get('reason')}"
    if event["event"] in ("head-missing", "head-restarted"):
        return f"{where} {event['event']}: {event.get('file')}: head {event.get('head')}"
    return f"{where}: {event['event']}"


def _client_events(server_round: int, rows: list[dict[str, Any]], trained: set[int],
                   state_root: Path) -> list[dict[str, Any]]:
    """What the clients' replies say about them beyond the metrics: a client that failed, a head
    file that was missing (a client that trained before came back fresh) or damaged and restarted.
    Updates ``trained``, the partitions known to hold a trained head."""
    events: list[dict[str, Any]] = []
    for row in rows:
        partition = row.get("partition")
        if row["error"]:
            events.append({"round": server_round, "event": "client-failed", "kind": row["kind"],
                           "node": row["node"], "partition": partition,
                           "reason": client_error_text(str(row["error"]))[-500:]})
            continue
        restored = restored_of(row.get("metrics", {}))
        head_file = str(state_root / f"partition-{partition:05d}.pt") if partition is not None else None
        if restored is Restored.FRESH and partition in trained:
            events.append({"round": server_round, "event": "head-missing", "kind": row["kind"],
                           "node": row["node"], "partition": partition, "file": head_file,
                           "head": "fresh: the client trained before, but its head file is gone"})
        elif restored is Restored.RESTARTED:
            events.append({"round": server_round, "event": "head-restarted", "kind": row["kind"],
                           "node": row["node"], "partition": partition, "file": head_file,
                           "head": "fresh: its head file was damaged (on-damaged-head = restart)"})
        keeps_head = restored not in (None, Restored.NONE)
        if row["kind"].startswith("train") and partition is not None and keeps_head:
            trained.add(partition)
    return events


def _trained_before(run: RunDir, last: int) -> set[int]:
    """Partitions that trained with a personal part in rounds 1..last (from messages.jsonl)."""
    return {int(r["partition"]) for r in run.read_audit()
            if r["round"] <= last and str(r["kind"]).startswith("train") and not r.get("error")
            and "partition" in r and restored_of(r.get("metrics", {})) not in (None, Restored.NONE)}


def _failures_note(row: dict[str, Any], events: list[dict[str, Any]]) -> str | None:
    """The progress line's warning for a round where some clients failed."""
    failed = [e for e in events if e["event"] == "client-failed"]
    if not failed:
        return None
    who = ", ".join(f"{e['kind']} p{e['partition'] if e['partition'] is not None else '?'}"
                    for e in failed[:4]) + (" ..." if len(failed) > 4 else "")
    over = f"; evaluation means over the {row['eval-clients']} that answered" if "eval-clients" in row else ""
    return f"{len(failed)} client message{'s' * (len(failed) > 1)} FAILED ({who}){over}"


def _event_lines(events: list[dict[str, Any]], per_kind: int = 5) -> list[str]:
    """One line per event, at most ``per_kind`` of each kind a round (events.jsonl has all)."""
    lines: list[str] = []
    for kind in dict.fromkeys(e["event"] for e in events):
        of_kind = [e for e in events if e["event"] == kind]
        lines += [_describe(e) for e in of_kind[:per_kind]]
        if len(of_kind) > per_kind:
            lines.append(f"... and {len(of_kind) - per_kind} more {kind} events this round (events.jsonl)")
    return lines


def run_federation(grid: Grid, cfg: RunConfig, timeout: float | None = None) -> RunDir:
    """Run (or resume) the federation; each round waits up to ``timeout`` s (default: the run's
    ``reply-timeout``) for its replies."""
    IN_PROCESS.begin()
    try:
        run, cfg, last = _open_run(cfg)
        timeout = cfg.reply_timeout if timeout is None else timeout
        try:
            if cfg.onboard:
                return _onboard(grid, cfg, run, last, timeout)
            return _run_rounds(grid, cfg, run, last, timeout)
        except (FloatingPointError, KeyboardInterrupt):
            raise  # diverged: state.json already says so; interrupted: the round in flight never counted
        except BaseException as err:
            _record_stop(run, err)
            raise
        finally:
            runlock.release(run.path)
    finally:
        IN_PROCESS.end()


def _record_stop(run: RunDir, err: BaseException) -> None:
    """A run that ends on an error says so in state.json (still resumable), instead of staying
    'running'."""
    try:
        state = run.run_state()
        if state.status == "running":
            extra = {"strategy-state": state.strategy_state} if state.strategy_state else {}
            run.write_state(state.last_completed_round, "stopped",
                            error=" ".join(f"{type(err).__name__}: {err}".split())[:2000], **extra)
    except (OSError, RunFileError):
        pass  # the folder itself is the problem; the error the caller sees says so


def _onboard(grid: Grid, cfg: RunConfig, run: RunDir, last: int, timeout: float) -> RunDir:
    """A finished run's new clients get heads (``onboard``): no round is trained; every connected
    client that never trained gets its head on the final body (``RoundProgram.onboard``), and
    one row per client goes to ``onboarded.jsonl``."""
    state = run.state()
    if state.get("status") != "completed" or last < cfg.num_rounds:
        raise RunFileError(f"onboard=true: {run.path} has completed {last} of {cfg.num_rounds} rounds; "
                           "finish it first (resume without onboard), then onboard new clients")
    plugin = get_strategy(cfg.strategy)
    rule = plugin.client_rule(cfg)
    if not rule.personal_keys(rule.prepare_model(build_model(cfg))):
        raise RunFileError(f"onboard=true: {cfg.strategy} keeps nothing per client, so a new client "
                           "needs no head: use the global model (`fedrep export RUN_DIR --client K`) "
                           "or fine-tune it (`fedrep personalize RUN_DIR --data FILE`)")
    strategy = plugin.server_strategy(cfg)
    strategy.load_state_dict(state.get("strategy-state", {}))
    audit = AuditingGrid(grid, run)
    audit.server_round = last
    trained = _trained_before(run, last)
    rows = strategy.onboard(last, to_record(run.load_checkpoint(last)),
                            ConfigRecord({RUN_DIR: str(run.path)}), audit, timeout, trained)
    run.append_audit(audit.drain())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    run.append_onboarded([{"round": last, "time": stamp, **row} for row in rows])
    done = [r for r in rows if "error" not in r]
    for row in rows:
        if "error" in row:
            print(f"[fedrep] onboarding node {row['node']} failed: {row['error']}", file=sys.stderr,
                  flush=True)
        elif ACCURACY + FINETUNED in row:
            print(f"[fedrep] onboarded client {row['partition']}: local accuracy {row.get(ACCURACY, 0):.4f} "
                  f"with the initial head -> {row[ACCURACY + FINETUNED]:.4f} with its own",
                  file=sys.stderr, flush=True)
    print(f"[fedrep] onboarded {len(done)} new client{'s' * (len(done) != 1)} on round {last}'s body "
          f"({len(trained)} had trained in the run) -> {run.path / ONBOARDED}", file=sys.stderr, flush=True)
    return run


def _run_rounds(grid: Grid, cfg: RunConfig, run: RunDir, last: int, timeout: float) -> RunDir:
    plugin = get_strategy(cfg.strategy)
    rule = plugin.client_rule(cfg)
    model = rule.prepare_model(build_model(cfg))
    rule.check(model)  # a deployment has no CLI preflight: refuse before any client works
    shared_keys = rule.shared_keys(model)
    strategy = plugin.server_strategy(cfg)
    if cfg.dp != "none" and not isinstance(strategy, SharedAveraging):
        raise RuntimeError(f"dp={cfg.dp!r}: {cfg.strategy}'s server ({type(strategy).__name__}) does not "
                           "average a shared part through fedrep.SharedAveraging, so fedrep cannot "
                           "clip, noise and account for it; set dp='none'")
    if last > 0:
        arrays = run.load_checkpoint(last)
        if sorted(arrays) != sorted(shared_keys):
            raise RunFileError(f"checkpoint {run.checkpoint_path(last)} holds {sorted(arrays)[:3]}..., "
                               f"not this strategy's shared parameters {shared_keys[:3]}...; restore it")
        strategy.load_state_dict(run.state().get("strategy-state", {}))  # e.g. KD3A's domain weights
        print(f"[fedrep] resuming {run.path} after round {last}", file=sys.stderr, flush=True)
    else:
        state = model.state_dict()
        arrays = {k: state[k].numpy() for k in shared_keys}
    b_star = (ground_truth_representation(cfg.linear_dim, cfg.linear_rank, cfg.seed)
              if cfg.dataset == "linear-synthetic" else None)
    audit = AuditingGrid(grid, run, update_norms=cfg.dp != "none")
    trained = _trained_before(run, last)
    state_root = run.path / "client-state"
    print(f"[fedrep] {cfg.strategy} on {cfg.dataset}: {cfg.num_clients} clients, "
          f"{cfg.num_rounds} round{'s' if cfg.num_rounds != 1 else ''} -> {run.path}",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    weighted = {r["round"]: r.get(WEIGHTED_ACCURACY) for r in run.read_metrics(warn=False)}
    # Trackers mirror the folder; on the way out they record how the run ended (Trackers.__exit__).
    with Trackers(trackers_from(cfg.tracking, run.path)) as tracking:
        tracking.start(run.path.name, cfg.to_flower(), run.path)
        for server_round in range(last + 1, cfg.num_rounds + 1):
            t0 = time.perf_counter()
            audit.server_round = server_round
            record = to_record(arrays)
            config = ConfigRecord({RUN_DIR: str(run.path)})
            try:
                outcome = strategy.train_round(server_round, record, config, audit, timeout)
            except PrivacyBudgetReached as spent:  # a planned end, before any client trained
                run.write_state(server_round - 1, "stopped", error=str(spent), **_strategy_state(strategy))
                print(f"[fedrep] {spent}", file=sys.stderr, flush=True)
                break
            new_arrays, train_metrics, sent = outcome.arrays, outcome.metrics, outcome.bytes_sent
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
            if evaluates(cfg, server_round):
                eval_config = ConfigRecord({RUN_DIR: str(run.path)})
                if server_round == cfg.num_rounds and cfg.final_finetune_epochs > 0:
                    eval_config[FINETUNE_EPOCHS] = cfg.final_finetune_epochs
                evaluation = strategy.evaluate_round(server_round, new_arrays, eval_config, audit, timeout)
                row.update(evaluation.metrics)
                row["bytes-sent"] += evaluation.bytes_sent
            if server_round == cfg.num_rounds and cfg.new_clients > 0:
                row.update(_new_clients_metrics(cfg, strategy, server_round, new_arrays, run, audit, timeout))
            weighted[server_round] = row.get(WEIGHTED_ACCURACY)
            paper = last_rounds_mean(weighted, server_round)
            if paper is not None:
                row[PAPER_METRIC] = paper
            if b_star is not None and "body.weight" in arrays:
                row["representation-distance"] = principal_angle_distance(arrays["body.weight"].T, b_star)
            events = strategy.drain_events()
            row["nodes-lost"] = len(strategy.lost_partitions())
            audit_rows = audit.drain()
            client_events = _client_events(server_round, audit_rows, trained, state_root)
            events += client_events
            row["client-failures"] = sum(e["event"] == "client-failed" for e in client_events)
            row["bytes-received"] = sum(r["bytes"] for r in audit_rows)
            IN_PROCESS.check(f"before round {server_round} was written")  # it does not count
            run.save_checkpoint(server_round, arrays)
            run.append_audit(audit_rows)
            run.append_events(events)
            # the round's own files count (its checkpoint, with fsync, and a line per message:
            # 20,000 lines a round at 10,000 clients); only its metrics row and state do not
            row["round-seconds"] = time.perf_counter() - t0
            phases = audit.drain_waits()
            row.update(phases)
            # the rest: sampling, aggregation, checks, the round's files (the server's own work)
            row["server-seconds"] = max(0.0, row["round-seconds"] - sum(phases.values()))
            run.append_metrics(row)
            run.write_state(server_round, "running", **_strategy_state(strategy))
            tracking.log_row(row)  # after the folder: trackers see completed rounds only
            _progress(cfg, server_round, row, started, last + 1, _failures_note(row, client_events))
            for line in _event_lines(events):
                print(f"[fedrep] {line}", file=sys.stderr, flush=True)
        else:
            run.write_state(cfg.num_rounds, "completed", **_strategy_state(strategy))
    paper = last_rounds_mean(weighted, cfg.num_rounds)
    if paper is not None:
        print(f"[fedrep] the paper's metric (test-size-weighted mean local accuracy, averaged over the "
              f"last {min(PAPER_WINDOW, cfg.num_rounds)} rounds): {paper:.4f}", file=sys.stderr, flush=True)
    plot = plot_run(run.path)
    print(f"[fedrep] done: metrics {run.metrics_file}, plot {plot}", file=sys.stderr, flush=True)
    return run
