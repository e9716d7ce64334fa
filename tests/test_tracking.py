"""fedrep.tracking against the real TensorBoard and MLflow libraries: everything written is read
back with the libraries' own readers (EventAccumulator, MlflowClient). Tests that need a library
skip where its extra is not installed."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedrep.config import ConfigError, parse_run_config
from fedrep.tracking import (
    MetricTracker,
    MLflowTracker,
    RunStatus,
    TensorBoardTracker,
    Trackers,
    default_mlflow_uri,
    replay,
    row_metrics,
    status_for,
    trackers_from,
)

CONFIG = {"strategy": "fedrep", "lr": 0.01, "augment": True, "num-rounds": 3, "strategy-options": ""}
ROWS = [
    {"round": 1, "accuracy": 0.5, "loss": 1.25, "note": "warm-up", "paper": None, "bytes-sent": 1000},
    {"round": 2, "accuracy": 0.625, "loss": float("nan"), "note": "", "bytes-sent": 2000},
    {"round": 3, "accuracy": 0.75, "loss": 0.5, "bytes-sent": 3000},
]


def tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_accumulator(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (a fresh store runs MLflow's migrations: seconds)."""
    pytest.importorskip("mlflow")
    return default_mlflow_uri(tmp_path_factory.mktemp("mlflow-store"))


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


# -- rows ---------------------------------------------------------------------------------------


def test_row_metrics_keeps_finite_numbers_only() -> None:
    import numpy as np

    step, values = row_metrics({"round": 4, "a": 1, "b": np.float32(0.5), "c": "x", "d": None,
                                "e": float("nan"), "f": float("inf"), "g": True})
    assert step == 4
    assert values == {"a": 1.0, "b": 0.5, "g": 1.0}
    with pytest.raises(ValueError, match="round"):
        row_metrics({"accuracy": 0.5})
    assert [status_for(None), status_for(KeyboardInterrupt()), status_for(RuntimeError())] == [
        "FINISHED", "KILLED", "FAILED"]


# -- configuration ------------------------------------------------------------------------------


def test_spec_parsing_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert trackers_from("", tmp_path) == []
    assert trackers_from(" , ", tmp_path) == []
    with pytest.raises(ConfigError) as err:
        trackers_from("tensorboard,wandb", tmp_path)
    assert "tracking" in str(err.value) and "'wandb'" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_mlflow_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_mlflow_uri(tmp_path) == "http://mlflow.example:5000"


def test_default_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tb, ml = trackers_from("TensorBoard, mlflow, tensorboard", tmp_path)
    assert isinstance(tb, TensorBoardTracker) and tb.log_dir == tmp_path / "tensorboard"
    assert isinstance(ml, MLflowTracker) and ml.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert ml.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    import mlflow.environment_variables

    if hasattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE"):  # MLflow 3 refuses file stores
        with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true") as err:
            trackers_from("mlflow", tmp_path)
        assert "\n" not in str(err.value)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert trackers_from("mlflow", tmp_path)[0].tracking_uri == f"file:{tmp_path}/mlruns"


@pytest.mark.parametrize("name, modules", [("tensorboard", ["torch.utils.tensorboard", "tensorboard"]),
                                           ("mlflow", ["mlflow"])])
def test_missing_library_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                           modules: list[str]) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(ConfigError) as err:
        trackers_from(f"{name}", tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith("tracking:")
    assert f'pip install -e ".[{name}]"' in message


# -- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_scalars_config_and_status(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    log_dir = tmp_path / "tb"
    with TensorBoardTracker(log_dir) as tracker:
        tracker.start("run-a", CONFIG, tmp_path)
        for row in ROWS:
            tracker.log_row(row)
    scalars = tb_scalars(log_dir)
    assert sorted(scalars) == ["accuracy", "bytes-sent", "loss"]  # strings, None skipped
    assert scalars["accuracy"] == [(1, 0.5), (2, 0.625), (3, 0.75)]
    assert scalars["loss"] == [(1, 1.25), (3, 0.5)]  # NaN skipped
    assert scalars["bytes-sent"] == [(1, 1000.0), (2, 2000.0), (3, 3000.0)]

    acc = tb_accumulator(log_dir)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert 'strategy = "fedrep"' in text and "lr = 0.01" in text and "augment = true" in text
    plugin = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(plugin["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == 0.01
    assert start.hparams["strategy"].string_value == "fedrep"
    assert start.hparams["augment"].bool_value is True
    end = HParamsPluginData.FromString(plugin["_hparams_/session_end_info"]).session_end_info
    assert end.status == Status.Value("STATUS_SUCCESS")


def test_tensorboard_resume_hides_rewritten_rounds(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "tb"
    first = TensorBoardTracker(log_dir)
    first.start("run", CONFIG, tmp_path)
    for r in (1, 2, 3):
        first.log_row({"round": r, "accuracy": r / 10})
    first.close("KILLED")
    again = TensorBoardTracker(log_dir)  # resumed from round 2's checkpoint: round 3 runs again
    again.start("run", CONFIG, tmp_path)
    for r in (3, 4):
        again.log_row({"round": r, "accuracy": r / 10 + 0.5})
    again.close()
    assert tb_scalars(log_dir)["accuracy"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                               (3, pytest.approx(0.8)), (4, pytest.approx(0.9))]


# -- MLflow ---------------------------------------------------------------------------------------


def test_mlflow_params_metrics_tag_and_status(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    config = {**CONFIG, "long": "x" * 10_000, "nested": {"mu": 0.5}}
    with MLflowTracker(mlflow_uri, experiment="params") as tracker:
        tracker.start("run-a", config, tmp_path)
        for row in ROWS:
            tracker.log_row(row)
    run = MlflowClient(mlflow_uri).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.tags["fedrep.run-dir"] == str(tmp_path.resolve())
    params = run.data.params
    assert params["strategy"] == "fedrep" and params["lr"] == "0.01" and params["augment"] == "true"
    assert params["strategy-options"] == "" and params["nested.mu"] == "0.5"
    assert 0 < len(params["long"]) < 10_000  # cut to MLflow's limit, not refused
    assert history(mlflow_uri, tracker.run_id, "accuracy") == [(1, 0.5), (2, 0.625), (3, 0.75)]
    assert history(mlflow_uri, tracker.run_id, "loss") == [(1, 1.25), (3, 0.5)]
    assert sorted(run.data.metrics) == ["accuracy", "bytes-sent", "loss"]


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_mlflow_close_status(tmp_path: Path, mlflow_uri: str, status: RunStatus) -> None:
    from mlflow.tracking import MlflowClient

    tracker = MLflowTracker(mlflow_uri, experiment="status")
    error = KeyboardInterrupt() if status == "KILLED" else RuntimeError("boom")
    with pytest.raises(type(error)), tracker:
        tracker.start("run", CONFIG, tmp_path)
        tracker.log_row(ROWS[0])
        raise error
    assert MlflowClient(mlflow_uri).get_run(tracker.run_id).info.status == status


def test_mlflow_resume_continues_the_run(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    first = MLflowTracker(mlflow_uri, experiment="resume")
    first.start("run", CONFIG, tmp_path)
    first.log_row(ROWS[0])
    first.log_row(ROWS[1])
    first.close("KILLED")
    again = MLflowTracker(mlflow_uri, experiment="resume")
    again.start("run", {**CONFIG, "num-rounds": 5}, tmp_path)  # resumed with more rounds
    for row in ROWS:  # round 1 and 2 again: not logged twice
        again.log_row(row)
    again.close()
    assert again.run_id == first.run_id
    run = MlflowClient(mlflow_uri).get_run(again.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["num-rounds"] == "3" and run.data.tags["config.num-rounds"] == "5"
    assert history(mlflow_uri, again.run_id, "accuracy") == [(1, 0.5), (2, 0.625), (3, 0.75)]


# -- fan-out ----------------------------------------------------------------------------------------


class Recorder(MetricTracker):
    """A tracker that remembers its calls, and can be told to fail in one of them."""

    def __init__(self, name: str, fail_in: str = "") -> None:
        self.name, self.fail_in = name, fail_in
        self.calls: list[tuple[str, Any]] = []

    def _call(self, what: str, arg: Any) -> None:
        if what == self.fail_in:
            raise OSError(28, "No space left on device")
        self.calls.append((what, arg))

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        self._call("start", run_name)

    def log_row(self, row: Mapping[str, Any]) -> None:
        self._call("log_row", row["round"])

    def close(self, status: RunStatus = "FINISHED") -> None:
        self._call("close", status)


@pytest.mark.parametrize("fail_in", ["start", "log_row", "close"])
def test_a_failing_tracker_is_reported_once_and_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        fail_in: str) -> None:
    good, bad = Recorder("good"), Recorder("bad", fail_in=fail_in)
    with Trackers([bad, good]) as tracking:
        tracking.start("run", CONFIG, tmp_path)
        for row in ROWS:
            tracking.log_row(row)
    assert good.calls == [("start", "run"), ("log_row", 1), ("log_row", 2), ("log_row", 3),
                          ("close", "FINISHED")]
    assert [what for what, _ in bad.calls] == {"start": [], "log_row": ["start"],
                                               "close": ["start", "log_row", "log_row", "log_row"]}[fail_in]
    lines = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert lines == ["[fedrep] tracking: bad failed: OSError: [Errno 28] No space left on device; the run "
                     "continues, metrics stay in the run folder"]
    assert tracking.active == [good] and [t for t, _ in tracking.failed] == [bad]


def test_trackers_close_with_the_run_status_and_let_interrupts_through(tmp_path: Path) -> None:
    killed, failed = Recorder("k"), Recorder("f")
    with pytest.raises(KeyboardInterrupt), Trackers([killed]) as tracking:
        tracking.start("run", CONFIG, tmp_path)
        raise KeyboardInterrupt
    with pytest.raises(FloatingPointError), Trackers([failed]) as tracking:
        tracking.start("run", CONFIG, tmp_path)
        raise FloatingPointError("round 2: NaN")
    assert killed.calls[-1] == ("close", "KILLED") and failed.calls[-1] == ("close", "FAILED")

    class Interrupted(Recorder):
        def log_row(self, row: Mapping[str, Any]) -> None:
            raise KeyboardInterrupt  # Ctrl-C during a tracker call still stops the run

    with pytest.raises(KeyboardInterrupt):
        Trackers([Interrupted("i")]).log_row(ROWS[0])
    assert not Trackers([])


# -- replay ---------------------------------------------------------------------------------------


def finished_run(tmp_path: Path) -> Path:
    """A real run folder, written by RunDir itself: config, three metric rows, completed state."""
    from fedrep.results import RunDir

    cfg = parse_run_config({"run-dir": str(tmp_path / "run"), "num-rounds": 3, "seed": 7})
    run, _ = RunDir.create(cfg)
    for row in ROWS:
        run.append_metrics(row)
    run.write_state(3, "completed")
    return run.path


def test_replay_mirrors_a_finished_run(tmp_path: Path, mlflow_uri: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    folder = finished_run(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    assert replay(folder, "tensorboard,mlflow", experiment="replay") == 3
    assert replay(folder, "tensorboard,mlflow", experiment="replay") == 3  # twice: no duplicates

    scalars = tb_scalars(folder / "tensorboard")
    assert scalars["accuracy"] == [(1, 0.5), (2, 0.625), (3, 0.75)]
    assert [step for step, value in scalars["loss"]] == [1, 3] and not any(math.isnan(v) for _, v in
                                                                           scalars["loss"])
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("replay").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == folder.name
    assert run.data.tags["fedrep.run-dir"] == str(folder)
    assert run.data.params["seed"] == "7" and run.data.params["num-rounds"] == "3"
    assert history(mlflow_uri, run.info.run_id, "accuracy") == [(1, 0.5), (2, 0.625), (3, 0.75)]


def test_replay_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a fedrep run folder"):
        replay(tmp_path, "")


def test_fedrep_imports_without_the_tracking_libraries() -> None:
    import subprocess

    code = ("import sys; sys.modules.update({'mlflow': None, 'tensorboard': None}); import fedrep.tracking, "
            "fedrep.results; fedrep.tracking.trackers_from('', __import__('pathlib').Path('.'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
