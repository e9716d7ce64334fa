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

      .lock                held by the process that writes the folder (fedrep.runlock)

Writes that a resume depends on (checkpoints, state) are atomic: temp file + ``os.replace``.
A round counts as completed only once ``state.json`` says so, and a resume drops any metric
lines past that round.

Every file is read back through a check: ``state.json`` and ``config.json`` against pydantic
models, ``config.json`` also against the digest ``state.json`` recorded when the run started (an
edited file is refused like the same change on the command line), checkpoints by loading them.
Damage is a :class:`RunFileError`: one line that names the file and what the user can do.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedrep.config import ConfigError, RunConfig, parse_run_config
from fedrep.files import atomic_write, remove_stale_temp_files, torch_bytes

CLIENT_STATE = "client-state"
# Keys that may change when a run is resumed; everything else must match the saved config.
# (client-threads, cache-head-features, closed-form-head and channels-last are not among them:
# they change float rounding.)
ONBOARDED = "onboarded.jsonl"
RESUMABLE_CHANGES = {"num-rounds", "eval-every", "resume", "run-dir", "out-dir", "client-cpus",
                     "client-gpus", "data-dir", "wait-for-clients", "reply-timeout", "final-finetune-epochs",
                     "on-damaged-head", "tracking", "onboard", "dp-epsilon-budget"}
# What torch.load raises on a truncated, overwritten or foreign file: random bytes reach its
# weights-only unpickler, which fails with IndexError (an empty stack) on about 6% of them.
LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError,
               AttributeError, struct.error, pickle.UnpicklingError, zipfile.BadZipFile)
# The keys without which a config.json is not a run's configuration (older run folders, written
# before config digests, are checked against these alone).
IDENTIFYING_KEYS = ("strategy", "dataset", "num-clients", "seed")


class RunFileError(ConfigError):
    """A run-folder file is missing or damaged; the message names it and what the user can do."""


# Marks a client's error reply as "the run folder (or the node's state folder) is damaged or
# unwritable": the server stops the run before the round counts instead of averaging without
# that client. Flower carries a ClientApp's exception text in the error reply's reason.
RUN_FOLDER_TAG = "[fedrep:run-folder] "


def run_folder_failure(message: str) -> RuntimeError:
    """The exception a client raises for a run-folder problem (one line, tagged)."""
    return RuntimeError(RUN_FOLDER_TAG + " ".join(message.split()))


def client_error_text(reason: str) -> str:
    """The client's own message out of the error reason Flower wraps it in
    (``<class '...ClientAppException'>:<'... Message: TEXT'>``), on one line."""
    text = reason.rsplit("Message: ", 1)[-1] if "Message: " in reason else reason
    return " ".join(text.strip().removesuffix("'>").split())


def run_folder_failure_in(reason: str) -> str | None:
    """The client's message if an error reply's reason is a tagged run-folder failure."""
    at = reason.find(RUN_FOLDER_TAG)
    if at < 0:
        return None
    # Under Ray the reason holds the whole chained traceback: the message ends with its line.
    return reason[at + len(RUN_FOLDER_TAG):].splitlines()[0].strip().removesuffix("'>").strip()


class RunState(BaseModel):
    """``state.json``: how far the run got and how it stands."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    last_completed_round: int = Field(alias="last-completed-round", ge=0)
    status: Literal["running", "completed", "diverged", "stopped"]
    updated: str = ""
    error: str | None = None
    strategy_state: dict[str, Any] | None = Field(None, alias="strategy-state")
    config_digest: str | None = Field(None, alias="config-digest", pattern="^[0-9a-f]{64}$")

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


def config_digest(flower_config: Mapping[str, Any]) -> str:
    """SHA-256 of the keys a resume may not change, as config.json stores them. Taken over the
    stored keys only, so that a key a later fedrep adds does not change an older run's digest."""
    kept = {k: v for k, v in flower_config.items() if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def load_error(err: BaseException) -> str:
    """One short phrase for why torch.load failed (its own messages run to paragraphs)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else "unreadable"
    return f"{type(err).__name__}: {text.split('. ')[0][:120]}"


def _load_json(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing ({what}); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is damaged (not JSON: {err}); it holds {what}; {fix}") from None


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
        self._digest: str | None = None  # set by write_config, recorded by write_state

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

    def write_config(self, cfg: RunConfig) -> str:
        """Rewritten on every resume, so config.json says what the run is now: a later ``--resume``
        without ``--rounds`` must continue to the raised round count, not fall back to the first.
        Returns the digest the next :meth:`write_state` records."""
        values = cfg.to_flower()
        atomic_write(self.config_file, json.dumps(values, indent=2).encode())
        self._digest = config_digest(values)
        return self._digest

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    def saved_config(self) -> RunConfig:
        """config.json, validated, and checked against the digest state.json recorded."""
        fix = ("restore it from a copy, or start a new run (fedrep run with the same settings and "
               "another run-dir)")
        data = _load_json(self.config_file, "the run's configuration", fix)
        if not isinstance(data, dict):
            raise RunFileError(f"{self.config_file} is damaged (a JSON {type(data).__name__}, not an "
                               f"object of run-config keys); {fix}")
        missing = [k for k in IDENTIFYING_KEYS if k not in data]
        if missing:
            raise RunFileError(f"{self.config_file} is damaged (it lacks {', '.join(missing)}); {fix}")
        recorded = self.run_state().config_digest
        if recorded is not None and config_digest(data) != recorded:
            raise RunFileError(
                f"{self.config_file} was edited after the run started (it no longer matches the digest "
                f"in {self.state_file.name}); a resumed run would not be the same run. Undo the edit; "
                f"only {sorted(RESUMABLE_CHANGES - {'resume', 'run-dir'})} may change, given on the "
                "command line (e.g. fedrep run --resume DIR --rounds N)")
        return parse_run_config(data, f"{self.config_file}")

    # -- state ---------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    def run_state(self) -> RunState:
        """state.json, validated; a damaged file is a :class:`RunFileError` naming it."""
        fix = ("restore it from a copy, or start a new run; the checkpoints in "
               f"{self.path / 'checkpoints'} show how far it got")
        data = _load_json(self.state_file, "how far the run got", fix)
        if not isinstance(data, dict):
            raise RunFileError(f"{self.state_file} is damaged (a JSON {type(data).__name__}, not an "
                               f"object); {fix}")
        try:
            return RunState.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the file"
            raise RunFileError(f"{self.state_file} is damaged ({where}: {first['msg']}); {fix}") from None

    def state(self) -> dict[str, Any]:
        return self.run_state().as_dict()

    def divergence(self) -> str | None:
        """The error of a run that stopped on NaN/inf, else None. Resuming it would repeat the
        same arithmetic, so neither ``run --resume`` nor ``compare`` continues it."""
        state = self.state()
        return state.get("error", "NaN/inf in the model") if state.get("status") == "diverged" else None

    def last_completed_round(self) -> int:
        return int(self.state()["last-completed-round"])

    def write_state(self, last_round: int, status: str, **extra: Any) -> None:
        digest = self._digest
        if digest is None and self.state_file.is_file():
            digest = self.run_state().config_digest
        state = RunState.model_validate({
            "last-completed-round": last_round, "status": status,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "config-digest": digest, **extra})
        atomic_write(self.state_file, json.dumps(state.as_dict(), indent=2).encode())

    def clean_temp_files(self) -> None:
        """Remove what a killed write left behind (call while holding the run lock)."""
        for tmp in remove_stale_temp_files(self.path):
            print(f"[fedrep] removed {tmp}, an unfinished write of a killed run", file=sys.stderr)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self, server_round: int) -> Path:
        return self.path / "checkpoints" / f"round-{server_round:04d}.pt"

    def save_checkpoint(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        buf = torch_bytes(tensors)
        atomic_write(self.checkpoint_path(server_round), buf)

    def load_checkpoint(self, server_round: int) -> dict[str, np.ndarray]:
        path = self.checkpoint_path(server_round)
        earlier = (f"resume from round {server_round - 1}'s checkpoint instead with `fedrep run --resume "
                   f"{self.path} --from-round {server_round - 1}`" if server_round > 1 else
                   "start a new run")
        if not path.is_file():
            raise RunFileError(f"checkpoint {path} is missing; restore it, or {earlier}")
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except LOAD_ERRORS as err:
            raise RunFileError(f"checkpoint {path} is damaged ({load_error(err)}); restore it, "
                               f"or {earlier}") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise RunFileError(f"checkpoint {path} is damaged (not a dict of tensors); restore it, "
                               f"or {earlier}")
        return {k: v.numpy() for k, v in tensors.items()}

    def head_files(self) -> list[Path]:
        """The clients' personal-state files a simulation keeps in this folder."""
        return sorted((self.path / CLIENT_STATE).glob("partition-*.pt"))

    def roll_back(self, to_round: int) -> None:
        """Make ``to_round`` the last completed round, so that a resume continues from its
        checkpoint (the way out when a later checkpoint is damaged). Refused where the rounds
        after it cannot be replayed exactly: a strategy with server state, which state.json keeps
        for the newest round only, or client-state files that no longer hold a version from
        ``to_round`` or before (each keeps its two newest)."""
        state = self.run_state()
        last = state.last_completed_round
        if not 0 <= to_round < last:
            raise ConfigError(f"--from-round {to_round}: {self.path} has completed rounds 1-{last}; "
                              f"give a round from 0 to {last - 1}")
        if state.strategy_state:
            raise ConfigError(f"--from-round {to_round}: this strategy keeps server state that "
                              f"{self.state_file.name} holds for round {last} only; start a new run")
        if to_round > 0:
            self.load_checkpoint(to_round)
        too_new = []
        for path in self.head_files():
            versions = read_head_versions(path)
            if len(versions) >= KEEP_HEAD_VERSIONS and min(versions) > to_round:
                too_new.append(path.name)
        if too_new:
            raise ConfigError(f"--from-round {to_round}: {len(too_new)} clients ({', '.join(too_new[:3])}"
                              f"{', ...' if len(too_new) > 3 else ''}) keep no head from round {to_round} "
                              "or before; roll back fewer rounds")
        for later in range(to_round + 1, last + 1):
            self.checkpoint_path(later).unlink(missing_ok=True)
        self.truncate_metrics(to_round)
        self.write_state(to_round, "running")
        again = f"round {last}" if last == to_round + 1 else f"rounds {to_round + 1}-{last}"
        print(f"[fedrep] rolled {self.path} back to round {to_round} ({again} will run again)",
              file=sys.stderr, flush=True)

    # -- metrics -------------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def read_metrics(self, warn: bool = True) -> list[dict[str, Any]]:
        """One dict per round. Damaged lines are skipped, and (with ``warn``) named on stderr."""
        return _read_jsonl(self.metrics_file, warn)

    def truncate_metrics(self, last_round: int) -> None:
        """Drop metric rows (and message audit and event rows) of rounds that never completed.
        A damaged line is dropped too, after the original file is kept as ``NAME.damaged``."""
        kept_metrics: list[dict[str, Any]] = []
        for path in (self.metrics_file, self.path / "messages.jsonl", self.path / "events.jsonl"):
            rows, damaged = _scan_jsonl(path)
            if damaged:
                backup = path.with_name(path.name + ".damaged")
                shutil.copyfile(path, backup)
                print(f"[fedrep] {path}: dropped damaged line{'s' * (len(damaged) > 1)} "
                      f"{', '.join(map(str, damaged[:5]))}{' ...' if len(damaged) > 5 else ''} "
                      f"(kept {len(rows)} valid rows); the original is in {backup.name}",
                      file=sys.stderr, flush=True)
            kept = [r for r in rows if r["round"] <= last_round]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
            if path == self.metrics_file:
                kept_metrics = kept
                lost = sorted(set(range(1, last_round + 1)) - {r["round"] for r in kept})
                if lost and damaged:
                    print(f"[fedrep] {path}: no row left for round{'s' * (len(lost) > 1)} "
                          f"{', '.join(map(str, lost[:10]))} (the checkpoints and messages.jsonl still "
                          "cover them)", file=sys.stderr, flush=True)
        self._write_csv(kept_metrics)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        _append_jsonl(self.metrics_file, [row])
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
        return _read_jsonl(self.path / "messages.jsonl", warn=True)

    def append_events(self, events: list[Mapping[str, Any]]) -> None:
        _append_jsonl(self.path / "events.jsonl", events)

    def append_onboarded(self, rows: list[Mapping[str, Any]]) -> None:
        """Clients that got their head after the run (``onboard``), one row each."""
        _append_jsonl(self.path / ONBOARDED, rows)

    def read_onboarded(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / ONBOARDED, warn=False)

    def read_events(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "events.jsonl", warn=True)


def _append_jsonl(path: Path, rows: list[Mapping[str, Any]]) -> None:
    """One line per row, written in one call: a killed writer leaves at most a torn last line,
    which the readers skip."""
    if rows:
        with path.open("a") as fh:
            fh.write("".join(json.dumps(dict(row)) + "\n" for row in rows))


def _scan_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(rows, numbers of damaged lines). A row is a JSON object with an integer ``round``. An
    unfinished last line (no newline: a killed writer) is not damage: it is the round that never
    completed, and is dropped silently."""
    if not path.is_file():
        return [], []
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop()  # b"" when the file ends in a newline
    rows, damaged = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict) and isinstance(row.get("round"), int):
            rows.append(row)
        else:
            damaged.append(number)
    del torn
    return rows, damaged


def _read_jsonl(path: Path, warn: bool) -> list[dict[str, Any]]:
    rows, damaged = _scan_jsonl(path)
    if damaged and warn:
        print(f"[fedrep] warning: {path}: skipped damaged line{'s' * (len(damaged) > 1)} "
              f"{', '.join(map(str, damaged[:5]))}{' ...' if len(damaged) > 5 else ''}",
              file=sys.stderr, flush=True)
    return rows


def client_state_file(state_root: str | Path, partition_id: int) -> Path:
    return Path(state_root) / f"partition-{partition_id:05d}.pt"


# A client-state file holds the newest versions of a client's personal parameters, tagged by
# the round that produced them: {round: {name: tensor}} (see clients/state.py for why two).
KEEP_HEAD_VERSIONS = 2


class HeadFileDamaged(RunFileError):
    """A client's personal-state file cannot be read."""

    def __init__(self, path: Path, reason: str) -> None:
        self.file, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def read_head_versions(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The versions in one client-state file; {} when there is none yet. A file that does not
    load, or loads as something else, is :class:`HeadFileDamaged`."""
    if not path.is_file():
        return {}
    try:
        versions = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as err:
        raise HeadFileDamaged(path, f"cannot be loaded ({load_error(err)})") from None
    if not isinstance(versions, dict) or not all(
            isinstance(r, int) and isinstance(v, dict)
            and all(isinstance(t, torch.Tensor) for t in v.values()) for r, v in versions.items()):
        raise HeadFileDamaged(path, "is not a client-state file ({round: {name: tensor}})")
    return versions
