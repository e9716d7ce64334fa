"""Experiment tracking: mirror a run's metric rows and configuration into TensorBoard and MLflow.

The run folder (``metrics.jsonl``/``metrics.csv``, written by :meth:`fedrep.results.RunDir.append_metrics`)
stays the source of truth: a resume, ``fedrep compare`` and the plots read it, never a tracker. The
trackers here are mirrors for people who browse runs in TensorBoard or MLflow, so:

* they are optional: fedrep imports without ``tensorboard`` or ``mlflow`` installed, and each library
  is imported only when its tracker is asked for (``tracking = "tensorboard,mlflow"``);
* a tracker that fails (disk full, tracking server down) must not stop training: :class:`Trackers`
  reports it once on stderr and drops it, and the round's metrics are in the run folder anyway;
* a folder tracked after the fact, or a resumed run, can be mirrored again without duplicates
  (:func:`replay`; TensorBoard purges the steps it rewrites, MLflow skips steps it already holds).

The round loop uses them like this::

    with Trackers(trackers_from(cfg.tracking, run.path)) as tracking:  # closes FINISHED/FAILED/KILLED
        tracking.start(run.path.name, cfg.to_flower(), run.path)
        for server_round in ...:
            ...
            run.append_metrics(row)       # the run folder first: it is the record
            tracking.log_row(row)
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from fedrep.config import ConfigError, toml_value

if TYPE_CHECKING:  # imported inside replay(): no import cycle if fedrep.results ever uses this module
    from fedrep.results import RunDir

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
"""How a tracked run ended (MLflow's terminal run statuses; TensorBoard maps them to its own)."""

TRACKING_KEY = "tracking"
KNOWN = ("tensorboard", "mlflow")
RUN_DIR_TAG = "fedrep.run-dir"
DEFAULT_EXPERIMENT = "fedrep"


def status_for(error: BaseException | None) -> RunStatus:
    """The status a run ending on ``error`` gets: Ctrl-C and SIGTERM (:class:`fedrep.interrupts.
    Terminated` is a KeyboardInterrupt) leave a resumable run, hence KILLED rather than FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def row_metrics(row: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, numeric values) of one metrics row. The step is the row's ``round``; strings, None and
    NaN/inf are left out (neither back-end stores them faithfully; metrics.csv keeps them)."""
    step = row.get("round")
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"a metrics row needs an integer 'round', got {step!r}")
    values: dict[str, float] = {}
    for key, value in row.items():
        if key == "round" or not isinstance(value, numbers.Real):
            continue
        number = float(value)
        if math.isfinite(number):
            values[str(key)] = number
    return step, values


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``): both back-ends take
    flat key/value parameters. A RunConfig's ``to_flower()`` is flat already."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_text(config: Mapping[str, Any]) -> str:
    """The config as flat TOML lines, the syntax of an experiment file, so it can be pasted back."""
    return "\n".join(f"{key} = {toml_value(value)}" for key, value in sorted(flatten(config).items()))


def _require(module: str, tracker: str) -> ModuleType:
    """Import a tracker's library, or say in one line which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"{TRACKING_KEY}: {tracker} tracking needs a library that is not installed ({err}); "
            f'install it with pip install -e ".[{tracker}]", or remove {tracker} from {TRACKING_KEY}'
        ) from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or "no message"
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MetricTracker(ABC):
    """What the round loop needs from a tracker. Calls come in the order ``start``, ``log_row``
    per completed round, ``close``; ``with tracker:`` closes with the status the block ended with.
    A tracker raises on failure; :class:`Trackers` is what keeps a failure from stopping a run."""

    name: str = "tracker"

    @abstractmethod
    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        """Begin (or, for a resumed run, continue) the tracked run and record its configuration."""

    @abstractmethod
    def log_row(self, row: Mapping[str, Any]) -> None:
        """Record one metrics row: numeric values with step = ``row["round"]``, the rest skipped."""

    @abstractmethod
    def close(self, status: RunStatus = "FINISHED") -> None:
        """End the tracked run with ``status`` and release files/connections. Safe to call twice."""

    def describe(self) -> str:
        """Where this tracker writes, for the one line a run prints when tracking starts."""
        return self.name

    def __enter__(self) -> MetricTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(status_for(error))


class TensorBoardTracker(MetricTracker):
    """Scalars per metric (step = round), the config as text, and the config as hparams.

    The hparams go in as a session-start record without an experiment summary, so that TensorBoard's
    HParams tab infers the columns from all runs under the directory it is pointed at (``tensorboard
    --logdir runs``) and the metric columns from their scalars. The session-end record carries the
    status. The event file is opened at the first row with ``purge_step`` = that round: a resumed
    or replayed run rewrites rounds, and TensorBoard then hides the older copies."""

    name = "tensorboard"

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._tb = _require("torch.utils.tensorboard", self.name)
        self._writer: Any = None
        self._config: dict[str, Any] | None = None
        self._closed = False

    def describe(self) -> str:
        return f"tensorboard in {self.log_dir} (tensorboard --logdir {self.log_dir})"

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        self._config = {"run-name": run_name, "run-dir": str(run_dir), **flatten(config)}
        self._closed = False

    def _open(self, first_step: int | None) -> Any:
        if self._writer is None:
            if self._config is None:
                raise RuntimeError("TensorBoardTracker.log_row before start")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._tb.SummaryWriter(log_dir=str(self.log_dir), purge_step=first_step)
            text = "\n".join("    " + line for line in config_text(self._config).splitlines())
            self._writer.add_text("config", text, global_step=0)  # indented: markdown code block
            self._write_hparams()
        return self._writer

    def _write_hparams(self) -> None:
        from tensorboard.plugins.hparams.plugin_data_pb2 import SessionStartInfo

        assert self._config is not None
        session = SessionStartInfo(start_time_secs=time.time())
        for key, value in self._config.items():  # torch's hparams() would turn booleans into numbers
            if isinstance(value, bool):
                session.hparams[key].bool_value = value
            elif isinstance(value, numbers.Real):
                session.hparams[key].number_value = float(value)
            else:
                session.hparams[key].string_value = value if isinstance(value, str) else json.dumps(
                    value, default=str)
        self._write_plugin_data(session_start_info=session)

    def _write_status(self, status: RunStatus) -> None:
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.plugin_data_pb2 import SessionEndInfo

        # TensorBoard has no "interrupted": a killed run (resumable) is neither success nor failure
        code = {"FINISHED": "STATUS_SUCCESS", "FAILED": "STATUS_FAILURE", "KILLED": "STATUS_UNKNOWN"}
        self._write_plugin_data(session_end_info=SessionEndInfo(status=Status.Value(code[status]),
                                                                end_time_secs=time.time()))

    def _write_plugin_data(self, **data: Any) -> None:
        """One HParams plugin record (session start or end), as TensorBoard's own summaries write it."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import metadata
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

        (field,) = data
        tag = {"session_start_info": metadata.SESSION_START_INFO_TAG,
               "session_end_info": metadata.SESSION_END_INFO_TAG}[field]
        content = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data).SerializeToString()
        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                      content=content))
        self._writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, metadata=meta)]))

    def log_row(self, row: Mapping[str, Any]) -> None:
        step, values = row_metrics(row)
        writer = self._open(step)
        wall = time.time()
        for key, value in values.items():
            writer.add_scalar(key, value, global_step=step, walltime=wall)
        writer.flush()  # a row per round: cheap, and TensorBoard shows the round while the run goes on

    def close(self, status: RunStatus = "FINISHED") -> None:
        if self._closed or self._config is None:
            return
        self._closed = True
        writer = self._open(None)  # a run without a single row still records its config and status
        self._write_status(status)
        writer.close()
        self._writer = None


class MLflowTracker(MetricTracker):
    """One MLflow run per run folder, through ``MlflowClient`` with explicit run ids: no active-run
    global state, so two runs in one process (tests, ``fedrep compare``) never log into each other.

    Params are the flattened config (values cut to MLflow's length limit), metrics each row with
    step = round, and the run folder's path is the tag ``fedrep.run-dir``. A later ``start`` for the
    same folder (a resumed run, a replay) continues that MLflow run: params it already holds stay
    (MLflow params are immutable; a changed value, e.g. a raised num-rounds, is set as the tag
    ``config.KEY``), and (metric, step) pairs it already holds are not logged again."""

    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
                 artifact_location: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        self._mlflow = _require("mlflow", self.name)
        self._check_store()
        self._max_value, self._max_key, self._params_per_batch, self._metrics_per_batch = self._limits()
        self._client: Any = None
        self.run_id: str | None = None  # kept after close, to find the run again
        self._running = False
        self._seen: dict[str, set[int]] = {}

    def _check_store(self) -> None:
        """Refuse a file store that this MLflow would refuse at the first call (MLflow 3 keeps it in
        maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``), now and with the fix, not mid-run."""
        variables = importlib.import_module("mlflow.environment_variables")
        allow = getattr(variables, "MLFLOW_ALLOW_FILE_STORE", None)  # absent where file stores just work
        if urlparse(self.tracking_uri).scheme in ("", "file") and allow is not None and not allow.get():
            raise ConfigError(
                f"{TRACKING_KEY}: MLflow {self._mlflow.__version__} refuses the file store "
                f"{self.tracking_uri}; use a database (MLFLOW_TRACKING_URI=sqlite:///PATH/mlflow.db, or "
                "unset it for one in the run folder) or a server, or set MLFLOW_ALLOW_FILE_STORE=true")

    def describe(self) -> str:
        where = f"mlflow at {self.tracking_uri}, experiment {self.experiment!r}"
        return f"{where}, run {self.run_id}" if self._running else where

    def _limits(self) -> tuple[int, int, int, int]:
        """(param value length, key length, params per batch, metrics per batch) of this MLflow."""
        try:
            from mlflow.utils import validation as v

            return (v.MAX_PARAM_VAL_LENGTH, v.MAX_ENTITY_KEY_LENGTH, v.MAX_PARAMS_TAGS_PER_BATCH,
                    v.MAX_METRICS_PER_BATCH)
        except (ImportError, AttributeError):  # the oldest limits MLflow has had
            return 500, 250, 100, 1000

    def _key(self, key: str) -> str:
        # MLflow allows alphanumerics, _ - . / space and : in names; anything else would fail the batch
        return re.sub(r"[^\w\-./ :]", "_", key)[: self._max_key]

    def _experiment_id(self) -> str:
        found = self._client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return str(self._client.create_experiment(self.experiment,
                                                          artifact_location=self.artifact_location))
            except self._mlflow.exceptions.MlflowException as err:
                if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":  # another run won
                    raise
                found = self._client.get_experiment_by_name(self.experiment)
        if found.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {self.experiment!r} is deleted in {self.tracking_uri}; "
                               "restore it (mlflow experiments restore) or use another experiment name")
        return str(found.experiment_id)

    def _existing_run(self, experiment_id: str, run_dir: str) -> Any:
        if "'" in run_dir:  # cannot be quoted in a filter string; such a run starts a new MLflow run
            return None
        runs = self._client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment_id = self._experiment_id()
        folder = str(Path(run_dir).resolve())
        existing = self._existing_run(experiment_id, folder)
        max_value, per_batch = self._max_value, self._params_per_batch
        params = {self._key(k): (("true" if v else "false") if isinstance(v, bool) else str(v))[:max_value]
                  for k, v in flatten(config).items()}
        tags: dict[str, str] = {}
        if existing is None:
            run = self._client.create_run(experiment_id, run_name=run_name, tags={RUN_DIR_TAG: folder})
            self.run_id, self._seen = run.info.run_id, {}
        else:
            self.run_id = existing.info.run_id
            self._client.update_run(self.run_id, status="RUNNING")  # it ended FINISHED/KILLED before
            self._seen = {key: {m.step for m in self._client.get_metric_history(self.run_id, key)}
                          for key in existing.data.metrics}
            held = existing.data.params
            tags = {f"config.{k}": v for k, v in params.items() if k in held and held[k] != v}
            params = {k: v for k, v in params.items() if k not in held}
        self._running = True
        entries: list[Any] = [Param(k, v) for k, v in params.items()]
        for first in range(0, len(entries), per_batch):
            self._client.log_batch(self.run_id, params=entries[first:first + per_batch])
        if tags:
            self._client.log_batch(self.run_id, tags=[RunTag(k, v[:max_value]) for k, v in tags.items()])

    def log_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        if not self._running:
            raise RuntimeError("MLflowTracker.log_row outside start/close")
        step, values = row_metrics(row)
        stamp = int(time.time() * 1000)
        metrics = []
        for key, value in values.items():
            name = self._key(key)
            if step not in self._seen.setdefault(name, set()):
                metrics.append(Metric(name, value, stamp, step))
        per_batch = self._metrics_per_batch
        for first in range(0, len(metrics), per_batch):
            self._client.log_batch(self.run_id, metrics=metrics[first:first + per_batch])
        for metric in metrics:
            self._seen[metric.key].add(step)

    def close(self, status: RunStatus = "FINISHED") -> None:
        if not self._running:
            return
        self._running = False
        self._client.set_terminated(self.run_id, status=status)


def default_mlflow_uri(run_dir: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set (a shared server or database, to compare runs), else an SQLite
    database inside the run folder, which keeps the folder self-contained. Not a ``file:`` store:
    MLflow 3 refuses the file store (maintenance mode) unless ``MLFLOW_ALLOW_FILE_STORE=true``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def parse_spec(spec: str) -> list[str]:
    """``"tensorboard, mlflow"`` -> ``["tensorboard", "mlflow"]``; ``""`` -> ``[]``. Refuses unknown names."""
    names: list[str] = []
    for part in spec.split(","):
        name = part.strip().lower()
        if not name or name in names:
            continue
        if name not in KNOWN:
            raise ConfigError(f"{TRACKING_KEY} = {spec!r}: unknown tracker {name!r}; use a comma-separated "
                              f"list of {', '.join(KNOWN)}, or \"\" for none")
        names.append(name)
    return names


def trackers_from(spec: str, run_dir: Path, experiment: str | None = None) -> list[MetricTracker]:
    """The trackers a ``tracking`` config value names, writing into ``run_dir`` by default.

    Raises :class:`ConfigError` (one line: the key and the fix) for an unknown name or a missing
    library, so a run refuses a bad setting before its first round rather than train untracked."""
    run_dir = Path(run_dir)
    trackers: list[MetricTracker] = []
    for name in parse_spec(spec):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir / "tensorboard"))
        else:
            uri = default_mlflow_uri(run_dir)
            local = not os.environ.get("MLFLOW_TRACKING_URI")
            trackers.append(MLflowTracker(
                uri, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT,
                artifact_location=(run_dir.resolve() / "mlartifacts").as_uri() if local else None))
    return trackers


class Trackers:
    """Fans each call out to several trackers, and keeps any one of them from failing the run.

    A tracker that raises (an ``Exception``; Ctrl-C still stops the run) is reported once on stderr
    and dropped: the metrics are safe in the run folder, and :func:`replay` can mirror them later."""

    def __init__(self, trackers: Iterable[MetricTracker] = ()) -> None:
        self.active: list[MetricTracker] = list(trackers)
        self.failed: list[tuple[MetricTracker, str]] = []

    def __bool__(self) -> bool:
        return bool(self.active)

    def _each(self, call: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, call)(*args)
            except Exception as err:  # a mirror must never end the run (Ctrl-C still does)
                reason = _one_line(err)
                self.active.remove(tracker)
                self.failed.append((tracker, reason))
                print(f"[fedrep] tracking: {tracker.name} failed: {reason}; the run continues, metrics "
                      "stay in the run folder", file=sys.stderr, flush=True)

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        self._each("start", run_name, config, Path(run_dir))
        if self.active:
            print("[fedrep] tracking: " + "; ".join(t.describe() for t in self.active),
                  file=sys.stderr, flush=True)

    def log_row(self, row: Mapping[str, Any]) -> None:
        self._each("log_row", row)

    def close(self, status: RunStatus = "FINISHED") -> None:
        self._each("close", status)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(status_for(error))


def _replay_status(run: RunDir) -> RunStatus:
    status = run.run_state().status
    if status == "completed":
        return "FINISHED"
    return "FAILED" if status in ("diverged", "stopped") else "KILLED"  # "running": it was cut off


def replay(run_dir: str | Path, spec: str, experiment: str | None = None) -> int:
    """Mirror a finished run folder into the trackers ``spec`` names (a run done before tracking was
    on, or one whose tracker failed mid-run); returns the number of rows mirrored. Holds the run lock,
    so a folder still being written is refused rather than mirrored half-way. Failures raise here:
    the run is over, and the caller asked for exactly this."""
    from fedrep import runlock
    from fedrep.results import RunDir

    run = RunDir.open(run_dir)
    with runlock.holding(run.path):
        config = run.saved_config().to_flower()
        rows = run.read_metrics()
        status = _replay_status(run)
        for tracker in trackers_from(spec, run.path, experiment):
            with tracker:
                tracker.start(run.path.name, config, run.path)
                for row in rows:
                    tracker.log_row(row)
                tracker.close(status)
    return len(rows)
