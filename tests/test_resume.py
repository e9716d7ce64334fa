"""A run killed after round 2 of 4 and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.results import RunDir

pytestmark = pytest.mark.e2e


def _wait_for_round(proc: subprocess.Popen, run_dir: Path, after: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = run_dir / "state.json"
    try:
        while time.monotonic() < deadline:
            if state.is_file():
                try:
                    if json.loads(state.read_text())["last-completed-round"] >= after:
                        break
                except (json.JSONDecodeError, KeyError):
                    pass
            if proc.poll() is not None:
                pytest.fail(f"run exited ({proc.returncode}) before round {after}")
            time.sleep(0.05)
        else:
            pytest.fail(f"round {after} not reached in {timeout}s")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _start(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedrep.cli", *args], start_new_session=True,
                            **popen)


def _kill_after_round(args: list[str], run_dir: Path, after: int, timeout: float = 240) -> None:
    proc = _start(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_round(proc, run_dir, after, timeout)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: server, Ray, client workers
    proc.wait()


def test_killed_run_resumes_exactly(tmp_path: Path, fmnist_dir: Path):
    common = [*SMALL_FMNIST, "--rounds", "4", "--set", f"data-dir={fmnist_dir}"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    fedrep_cli("run", *common, "--set", f"run-dir={straight}")

    _kill_after_round(["run", *common, "--set", f"run-dir={broken}"], broken, after=2)
    killed_at = RunDir(broken).last_completed_round()
    assert 2 <= killed_at < 4 and RunDir(broken).state()["status"] == "running"

    proc = fedrep_cli("run", "--resume", str(broken))
    assert f"resuming {broken}" in proc.stderr

    a, b = RunDir(straight), RunDir(broken)
    assert b.state()["status"] == "completed"
    for key, value in a.load_checkpoint(4).items():
        np.testing.assert_array_equal(b.load_checkpoint(4)[key], value, err_msg=key)
    rows_a, rows_b = a.read_metrics(), b.read_metrics()
    assert [r["round"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["accuracy-mean"] == rb["accuracy-mean"], (ra, rb)
        assert ra["train-loss"] == rb["train-loss"]


def test_resume_refuses_a_changed_setup(tmp_path: Path, fmnist_dir: Path):
    run = tmp_path / "r"
    fedrep_cli("run", *SMALL_FMNIST, "--rounds", "1", "--set", f"run-dir={run}",
               "--set", f"data-dir={fmnist_dir}")
    proc = fedrep_cli("run", "--resume", str(run), "--set", "lr=0.5", "--rounds", "2",
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot resume" in proc.stderr and "lr: saved 0.05 vs given 0.5" in proc.stderr
    # extending the number of rounds is allowed, and config.json then says 2 rounds
    fedrep_cli("run", "--resume", str(run), "--rounds", "2")
    assert [r["round"] for r in RunDir(run).read_metrics()] == [1, 2]
    assert RunDir(run).saved_config().num_rounds == 2
    # a later --resume without --rounds must not roll the finished run back to round 1
    fedrep_cli("run", "--resume", str(run))
    assert RunDir(run).last_completed_round() == 2 and RunDir(run).state()["status"] == "completed"
    assert [r["round"] for r in RunDir(run).read_metrics()] == [1, 2]
    # and fewer rounds than are done is refused before anything is touched
    proc = fedrep_cli("run", "--resume", str(run), "--rounds", "1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "num-rounds" in proc.stderr and "already completed 2 rounds" in proc.stderr
    assert [r["round"] for r in RunDir(run).read_metrics()] == [1, 2]


def test_a_diverged_run_stops_with_one_line_and_says_so_in_its_state(tmp_path: Path,
                                                                      fmnist_dir: Path):
    run = tmp_path / "nan"
    proc = fedrep_cli("run", *SMALL_FMNIST, "--rounds", "2", "--set", "lr=1e9",
                      "--set", f"run-dir={run}", "--set", f"data-dir={fmnist_dir}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "run failed: round 1: the aggregated model has NaN/inf" in proc.stderr
    assert "smaller lr" in proc.stderr
    state = RunDir(run).state()
    assert state["status"] == "diverged" and state["last-completed-round"] == 0
    assert not RunDir(run).checkpoint_path(1).exists()  # NaNs never become a checkpoint
    again = fedrep_cli("run", "--resume", str(run), check=False)  # would diverge again: refused
    assert again.returncode == 2 and "diverged" in again.stderr and "new run" in again.stderr


def test_ctrl_c_stops_quickly_and_names_the_folder_to_resume(tmp_path: Path, fmnist_dir: Path):
    run = tmp_path / "interrupted"
    args = ["run", *SMALL_FMNIST, "--rounds", "3", "--set", f"run-dir={run}",
            "--set", f"data-dir={fmnist_dir}"]
    # a terminal's Ctrl-C: SIGINT to the whole foreground process group, default handler
    proc = _start(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_round(proc, run, after=1, timeout=240)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("fedrep run did not exit within 60 s of Ctrl-C")
    assert proc.returncode == 130, err[-2000:]
    assert f"interrupted; continue with `fedrep run --resume {run}`" in err
    assert "Traceback" not in err and "ActorDiedError" not in err and "ERROR" not in err
    if RunDir(run).last_completed_round() < 3:  # it may have finished the last round meanwhile
        fedrep_cli("run", "--resume", str(run))
    assert RunDir(run).state()["status"] == "completed"
    assert [r["round"] for r in RunDir(run).read_metrics()] == [1, 2, 3]
