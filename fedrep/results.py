"""The run folder: everything a run leaves behind, and everything a resumed run needs.

::

    RUN_DIR/
      config.json          resolved RunConfig (what actually ran)
      state.json           {"last-completed-round": r, "status": "running" | "completed", ...}
      metrics.jsonl        one JSON object per completed round
      metrics.csv          the same, as a table (rewritten each round)
      messages.jsonl       every reply the server received: round, kind, partition, array keys, bytes
      events.jsonl         membership changes: a node lost, a node back (with or without its head)
      checkpoints/round-NNNN.pt   the global shared parameters after round NNNN
      client-state/        per-partition personal parameters, written by the clients themselves
      plot.png             accuracy and loss over rounds

Writes that a resume depends on (checkpoints, state) are atomic: temp file + ``os.replace``.
A round counts as completed only once ``state.json`` says so, and a resume drops any metric
lines past that round.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrep.config import ConfigError, RunConfig, parse_run_config
from fedrep.files import atomic_write, torch_bytes

CLIENT_STATE = "client-state"
# Keys that may change when a run is resumed; everything else must match the saved config.
# (client-threads and cache-head-features are not among them: they change float rounding.)
RESUMABLE_CHANGES = {"num-rounds", "eval-every", "resume", "run-dir", "out-dir", "client-cpus",
                     "client-gpus", "data-dir", "wait-for-clients", "final-finetune-epochs"}


def _same_options(cfg: RunConfig, saved: str, given: str) -> bool:
    from fedrep.registry import get_strategy

    plugin = get_strategy(cfg.strategy)
    try:
        return plugin.parse_options(saved) == plugin.parse_options(given)
    except ValueError:
        return False


def new_run_name(cfg: RunConfig) -> str:
    """Time-stamped and unique: two runs started in the same second get different folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.urandom(2).hex()}-{cfg.strategy}-{cfg.dataset}-n{cfg.num_clients}-s{cfg.seed}"


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()

    # -- creation and resumption ------------------------------------------------------------
    @classmethod
    def create(cls, cfg: RunConfig) -> tuple[RunDir, RunConfig]:
        """A fresh run folder for ``cfg``; returns the config with ``run-dir`` filled in."""
        path = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.out_dir) / new_run_name(cfg)
        run = cls(path)
        if run.state_file.exists():
            raise ConfigError(
                f"run folder {run.path} already holds a run; pass resume=true (fedrep run "
                "--resume) to continue it, or choose another run-dir"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        cfg = cfg.model_copy(update={"run_dir": str(run.path), "resume": False})
        run.write_config(cfg)
        run.write_state(0, "running")
        return run, cfg

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not run.state_file.is_file() or not (run.path / "config.json").is_file():
            raise ConfigError(
                f"{run.path} is not a fedrep run folder (no state.json/config.json); pass the "
                "folder a previous `fedrep run` printed"
            )
        return run

    def check_resumable_with(self, cfg: RunConfig) -> None:
        """Refuse to continue this run under a different setup (it would not be one run)."""
        saved, given = self.saved_config().to_flower(), cfg.to_flower()
        changed = sorted(k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != given[k])
        if "strategy-options" in changed and _same_options(cfg, saved["strategy-options"],
                                                           given["strategy-options"]):
            changed.remove("strategy-options")  # the same table, written differently
        if changed:
            diffs = ", ".join(f"{k}: saved {saved[k]!r} vs given {given[k]!r}" for k in changed)
            raise ConfigError(f"cannot resume {self.path} with a different setup ({diffs}); only "
                              f"{sorted(RESUMABLE_CHANGES)} may change")
        diverged = self.divergence()
        if diverged is not None:
            raise ConfigError(f"{self.path} diverged, and a resume would diverge again in the same "
                              f"round: {diverged}")
        done = self.last_completed_round()
        if cfg.num_rounds < done:  # running it would mark fewer rounds done and drop the rest
            raise ConfigError(f"num-rounds={cfg.num_rounds}: {self.path} has already completed "
                              f"{done} rounds; set num-rounds to {done} or more")

    def write_config(self, cfg: RunConfig) -> None:
        """Rewritten on every resume, so config.json says what the run is now: a later ``--resume``
        without ``--rounds`` must continue to the raised round count, not fall back to the first."""
        atomic_write(self.path / "config.json", json.dumps(cfg.to_flower(), indent=2).encode())

    def saved_config(self) -> RunConfig:
        data = json.loads((self.path / "config.json").read_text())
        return parse_run_config(data, f"{self.path / 'config.json'}")

    # -- state ---------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())

    def divergence(self) -> str | None:
        """The error of a run that stopped on NaN/inf, else None. Resuming it would repeat the
        same arithmetic, so neither ``run --resume`` nor ``compare`` continues it."""
        state = self.state()
        return state.get("error", "NaN/inf in the model") if state.get("status") == "diverged" else None

    def last_completed_round(self) -> int:
        return int(self.state()["last-completed-round"])

    def write_state(self, last_round: int, status: str, **extra: Any) -> None:
        state = {"last-completed-round": last_round, "status": status,
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
        atomic_write(self.state_file, json.dumps(state, indent=2).encode())

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:04d}.pt"

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        buf = torch_bytes(tensors)
        atomic_write(self.checkpoint_path(server_round), buf)

    def load_checkpoint(self, server_round: int) -> dict[str, np.ndarray]:
        path = self.checkpoint_path(server_round)
        if not path.is_file():
            raise ConfigError(f"checkpoint {path} is missing; cannot resume from round {server_round}")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.numpy() for k, v in tensors.items()}

    # -- metrics -------------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run
        return rows

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metric rows (and message audit rows) of rounds that never completed."""
        kept = [row for row in self.read_metrics() if row["round"] <= last_round]
        atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept).encode())
        for name, rows in (("messages.jsonl", self.read_audit()), ("events.jsonl", self.read_events())):
            kept_rows = [r for r in rows if r["round"] <= last_round]
            atomic_write(self.path / name, "".join(json.dumps(r) + "\n" for r in kept_rows).encode())
        self._write_csv(kept)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps(dict(row)) + "\n")
        self._write_csv(self.read_metrics())

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path / "metrics.csv", text.getvalue().encode())  # readers never see half a table

    def append_audit(self, rows: list[Mapping[str, Any]]) -> None:
        _append_jsonl(self.path / "messages.jsonl", rows)

    def read_audit(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "messages.jsonl")

    def append_events(self, events: list[Mapping[str, Any]]) -> None:
        _append_jsonl(self.path / "events.jsonl", events)

    def read_events(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "events.jsonl")


def _append_jsonl(path: Path, rows: list[Mapping[str, Any]]) -> None:
    """One line per row, written in one call: a killed writer leaves at most a torn last line,
    which the readers skip."""
    if rows:
        with path.open("a") as fh:
            fh.write("".join(json.dumps(dict(row)) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if _is_json(x)]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def client_state_file(state_root: str | Path, partition_id: int) -> Path:
    return Path(state_root) / f"partition-{partition_id:05d}.pt"
