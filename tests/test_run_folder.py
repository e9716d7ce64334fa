"""Run folders that nothing can corrupt: each case damages a real run folder (or races a real
second process against it) and checks that nothing is lost or mixed and that the user gets one
line naming the file and what to do, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fedrep_cli
from fedrep.results import RunDir

pytestmark = pytest.mark.e2e

# A fast real federation: the paper's linear task (no data files), FedRep, 4 clients.
LINEAR = ["--dataset", "linear-synthetic", "--model", "linear", "--num-clients", "4",
          "--set", "fraction-train=0.5", "--set", "final-finetune-epochs=0", "--set", "lr=0.05",
          "--set", "momentum=0.0", "--set", "weight-decay=0.0", "--set", "wait-for-clients=60"]


def _start(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedrep.cli", *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for_round(proc: subprocess.Popen, run: Path, after: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((run / "state.json").read_text())["last-completed-round"] >= after:
                return
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before round {after}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"round {after} not reached in {timeout}s")


def _one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fedrep: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round, 4-client FedRep run, copied by each test before it damages it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    fedrep_cli("run", *LINEAR, "--rounds", "2", "--set", f"run-dir={run}")
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)  # config.json's run-dir may change on a resume: same run
    return copy


def test_every_file_in_a_run_folder_has_the_same_mode(finished: Path):
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in finished.rglob("*") if p.is_file()]
    assert {"state.json", "metrics.jsonl", "messages.jsonl", "plot.png", "round-0002.pt",
            "partition-00000.pt", ".lock"} <= {p.name for p in files}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert not [p for p in files if p.name.startswith(".") and p.name != ".lock"]  # no temp files


@pytest.mark.parametrize("name", ["state.json", "config.json"])
@pytest.mark.parametrize("text", ["{", "{}", "[]"])
def test_a_damaged_state_or_config_file_is_one_line_naming_it(finished: Path, tmp_path: Path,
                                                              name: str, text: str):
    run = _copy(finished, tmp_path)
    (run / name).write_text(text)
    for args in (["run", "--resume", str(run)], ["plot", str(run)]):
        line = _one_line_error(fedrep_cli(*args, check=False))
        assert f"{run / name} is damaged" in line and "restore it" in line, line
    if name == "state.json" and text == "{":  # compare reads the same files through the same checks
        spec = tmp_path / "cmp.toml"
        spec.write_text('strategies = ["fedrep"]\n[config]\n' + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in json.loads((finished / "config.json").read_text()).items()
            if k not in ("run-dir", "resume", "out-dir", "strategy")))
        shutil.move(str(run), str(tmp_path / "cmp" / "fedrep"))
        line = _one_line_error(fedrep_cli("compare", str(spec), "--out", str(tmp_path / "cmp"), check=False))
        assert "state.json is damaged" in line


def test_an_edited_config_is_refused_like_the_same_change_on_the_command_line(finished: Path,
                                                                              tmp_path: Path):
    run = _copy(finished, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["num-clients"] = 5
    (run / "config.json").write_text(json.dumps(config, indent=2))
    line = _one_line_error(fedrep_cli("run", "--resume", str(run), "--rounds", "3", check=False))
    assert "config.json was edited after the run started" in line and "Undo the edit" in line
    assert RunDir(run).read_metrics()[-1]["round"] == 2  # nothing ran
    # a resumable key given on the command line is fine, and config.json then says so
    config["num-clients"] = 4
    (run / "config.json").write_text(json.dumps(config, indent=2))
    fedrep_cli("run", "--resume", str(run), "--rounds", "3")
    assert RunDir(run).saved_config().num_rounds == 3 and RunDir(run).state()["status"] == "completed"


def test_a_damaged_head_file_is_named_and_the_user_chooses(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    head = sorted((run / "client-state").glob("partition-*.pt"))[0]  # a client that trained
    partition = int(head.stem.split("-")[1])
    head.write_bytes(os.urandom(300))
    line = _one_line_error(fedrep_cli("run", "--resume", str(run), "--rounds", "3", check=False))
    assert str(head) in line and "cannot be loaded" in line and "--restart-damaged-heads" in line
    assert RunDir(run).last_completed_round() == 2
    # truncated: the same
    head.write_bytes((finished / "client-state" / head.name).read_bytes()[:100])
    line = _one_line_error(fedrep_cli("run", "--resume", str(run), "--rounds", "3", check=False))
    assert str(head) in line
    # the explicit choice: that client starts from a fresh head, and the run says so
    proc = fedrep_cli("run", "--resume", str(run), "--rounds", "3", "--restart-damaged-heads")
    assert "head-restarted" in proc.stderr and str(head) in proc.stderr
    events = [e for e in RunDir(run).read_events() if e["event"] == "head-restarted"]
    assert events and {e["partition"] for e in events} == {partition} and events[0]["file"] == str(head)
    assert RunDir(run).state()["status"] == "completed"


def test_a_deleted_head_file_is_an_event_not_silence(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    trained = sorted(p.name for p in (run / "client-state").glob("*.pt"))
    gone = run / "client-state" / trained[0]
    gone.unlink()
    proc = fedrep_cli("run", "--resume", str(run), "--rounds", "3")
    assert "head-missing" in proc.stderr and str(gone) in proc.stderr
    events = [e for e in RunDir(run).read_events() if e["event"] == "head-missing"]
    assert events and events[0]["file"] == str(gone) and events[0]["round"] == 3


def test_a_truncated_checkpoint_names_the_file_and_the_earlier_one(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    ckpt = run / "checkpoints" / "round-0002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:64])
    line = _one_line_error(fedrep_cli("run", "--resume", str(run), "--rounds", "3", check=False))
    assert f"checkpoint {ckpt} is damaged" in line and "--from-round 1" in line
    # resuming from round 1 re-runs round 2 exactly as the undamaged run did
    proc = fedrep_cli("run", "--resume", str(run), "--rounds", "2", "--from-round", "1")
    assert "rolled" in proc.stderr and "round 2 will run again" in proc.stderr
    for key, value in RunDir(finished).load_checkpoint(2).items():
        np.testing.assert_array_equal(RunDir(run).load_checkpoint(2)[key], value, err_msg=key)
    assert [r["round"] for r in RunDir(run).read_metrics()] == [1, 2]


def test_a_garbage_metrics_line_keeps_the_valid_rows_after_it(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["garbage", *lines[1:]]) + "\n")
    proc = fedrep_cli("run", "--resume", str(run), "--rounds", "3")
    assert f"{run / 'metrics.jsonl'}: dropped damaged line 1" in proc.stderr
    assert "no row left for round 1" in proc.stderr
    assert [r["round"] for r in RunDir(run).read_metrics()] == [2, 3]  # row 2 survived
    assert (run / "metrics.jsonl.damaged").read_text().startswith("garbage\n")


def test_a_concurrent_resume_is_refused_and_mixes_nothing(tmp_path: Path):
    """Two real processes: the second names the first and exits; the first finishes alone.
    (60 rounds of the linear task: long enough that the first is still running when the second,
    started after its round 1, has imported everything; 8 rounds were not, once round 1 stopped
    querying every node.)"""
    run = tmp_path / "busy"
    rounds = 60
    first = _start(["run", *LINEAR, "--rounds", str(rounds), "--set", f"run-dir={run}"])
    try:
        _wait_for_round(first, run, after=1)
        second = fedrep_cli("run", "--resume", str(run), check=False, timeout=60)
        line = _one_line_error(second)
        assert f"run folder {run} is in use by process {first.pid}" in line
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, err[-3000:]
    assert [r["round"] for r in RunDir(run).read_metrics()] == list(range(1, rounds + 1))
    per_round = [sum(1 for r in RunDir(run).read_audit() if r["round"] == n and r["kind"] == "train")
                 for n in range(1, rounds + 1)]
    assert per_round == [2] * rounds  # 4 clients x 50%: no second writer's replies
    # the lock went with its process: a resume now works (and has nothing to do)
    assert "nothing to do" in fedrep_cli("run", "--resume", str(run), timeout=60).stderr


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path):
    run = tmp_path / "killed"
    proc = _start(["run", *LINEAR, "--rounds", "30", "--set", f"run-dir={run}"])
    _wait_for_round(proc, run, after=1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the dead holder's details
    again = fedrep_cli("run", "--resume", str(run), "--rounds", "3")
    assert f"took over the lock of process {proc.pid}" in again.stderr
    assert RunDir(run).state()["status"] == "completed"


def test_sigterm_stops_like_ctrl_c(tmp_path: Path):
    run = tmp_path / "term"
    proc = _start(["run", *LINEAR, "--rounds", "40", "--set", f"run-dir={run}"])
    _wait_for_round(proc, run, after=2)
    os.kill(proc.pid, signal.SIGTERM)  # as systemd or a batch scheduler: the main process
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert f"fedrep: terminated (SIGTERM); continue with `fedrep run --resume {run}`" in err
    assert "Traceback" not in err and "ActorDiedError" not in err and "ERROR" not in err
    done = RunDir(run).last_completed_round()
    fedrep_cli("run", "--resume", str(run), "--rounds", str(done + 1))
    assert [r["round"] for r in RunDir(run).read_metrics()] == list(range(1, done + 2))
    assert not [p for p in run.rglob(".*") if p.name != ".lock"]  # a write cut short is cleaned


def test_a_client_that_fails_shows_on_the_progress_line_and_in_events(tmp_path: Path):
    run = tmp_path / "failing"
    proc = fedrep_cli("run", *LINEAR, "--rounds", "2", "--set", f"run-dir={run}",
                      "--client-app", "failing_clientapp:app", cwd=Path(__file__).parent)
    progress = [line for line in proc.stderr.splitlines() if re.match(r"\[fedrep\] round +\d+/", line)]
    assert len(progress) == 2 and all("FAILED (" in line and "evaluate p1" in line for line in progress)
    assert all("means over the 3 that answered" in line for line in progress), progress
    assert "Traceback" not in proc.stderr and "simulated crash of partition 1" in proc.stderr
    failed = [e for e in RunDir(run).read_events() if e["event"] == "client-failed"]
    assert {(e["partition"], e["kind"]) for e in failed} >= {(1, "evaluate")}
    assert "simulated crash" in failed[0]["reason"]
    assert all(row["client-failures"] >= 1 for row in RunDir(run).read_metrics())


def test_a_client_that_never_answers_counts_as_failed_after_reply_timeout(tmp_path: Path):
    """Partition 1 holds its round-2 training until round 2 is over; with reply-timeout=60 (round
    1, which starts the workers, stays well within it even on a loaded machine) the round goes on
    without it (a failure, node-lost in events.jsonl, with the reason), and in round 3 it is back."""
    run = tmp_path / "hanging"
    proc = fedrep_cli("run", *LINEAR, "--rounds", "3", "--set", "fraction-train=1.0",
                      "--set", f"run-dir={run}", "--set", "reply-timeout=60",
                      "--client-app", "failing_clientapp:hanging_app", cwd=Path(__file__).parent)
    rows = RunDir(run).read_metrics()
    assert [(r["train-clients"], r["train-failures"]) for r in rows] == [(4, 0), (3, 1), (4, 0)], rows
    lost = [e for e in RunDir(run).read_events() if e["event"] == "node-lost"]
    assert [(e["round"], e["partition"]) for e in lost] == [(2, 1)], lost
    assert lost[0]["reason"].startswith("no reply within 60s") and "reply-timeout" in lost[0]["reason"]
    assert "did not reply within 60s; going on without them" in proc.stderr
    assert 60 <= rows[1]["round-seconds"] < 120


@pytest.mark.parametrize("shadow", ["clients.py", "clients/__init__.py"])
def test_a_clients_module_in_the_working_directory_does_not_shadow_the_app(tmp_path: Path, shadow: str):
    work = tmp_path / "work"
    (work / shadow).parent.mkdir(parents=True, exist_ok=True)
    (work / shadow).write_text("raise ImportError('the wrong clients package')\n")
    proc = fedrep_cli("run", *LINEAR, "--rounds", "1", "--set", "run-dir=r", cwd=work)
    assert RunDir(work / "r").state()["status"] == "completed", proc.stderr[-2000:]


def test_a_run_dir_the_os_would_refuse_is_refused_before_ray_starts(tmp_path: Path):
    deep = tmp_path.joinpath(*["d" * 200] * 20)
    deep = Path(str(deep)[:4060])
    line = _one_line_error(fedrep_cli("run", *LINEAR, "--set", f"run-dir={deep}", check=False))
    assert "the OS takes paths of at most" in line
    line = _one_line_error(fedrep_cli("run", *LINEAR, "--set", f"run-dir={tmp_path / ('n' * 300)}",
                                      check=False))
    assert "this file system takes at most 255" in line


def test_compare_leaves_out_a_strategy_with_no_finished_round(finished: Path, tmp_path: Path):
    spec = tmp_path / "cmp.toml"
    config = json.loads((finished / "config.json").read_text())
    spec.write_text('strategies = ["fedrep", "empty=fedrep"]\n[config]\n' + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in config.items()
        if k not in ("run-dir", "resume", "out-dir", "strategy")))
    for name in ("fedrep", "empty"):
        shutil.copytree(finished, tmp_path / "cmp" / name)
    (tmp_path / "cmp" / "empty" / "metrics.jsonl").write_text("")
    proc = fedrep_cli("compare", str(spec), "--out", str(tmp_path / "cmp"))
    assert "empty: " in proc.stderr and "holds no finished round; left out" in proc.stderr
    assert "| fedrep |" in proc.stdout and "| empty |" not in proc.stdout


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, check=False)
    return done.returncode == 0


def test_a_full_disk_names_the_file_and_leaves_no_temp_files(tmp_path: Path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = disk / "run"
        proc = _start(["run", *LINEAR, "--rounds", "40", "--set", f"run-dir={run}"])
        _wait_for_round(proc, run, after=1)
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # unbuffered: fill to the last byte
        for chunk in (b"\0" * 65536, b"\0"):
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
        os.close(fd)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (1, 2), err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("fedrep: ")]
        assert len(errors) == 1 and "No space left on device" in errors[0], err[-3000:]
        assert str(run) in errors[0] and f"fedrep run --resume {run}" in errors[0]
        assert not [p for p in run.rglob(".*") if p.name != ".lock"]
        filler.unlink()
        done = RunDir(run).last_completed_round()
        fedrep_cli("run", "--resume", str(run), "--rounds", str(done + 1))
        assert RunDir(run).state()["status"] == "completed"
        assert [r["round"] for r in RunDir(run).read_metrics()] == list(range(1, done + 2))
        assert not [p for p in run.rglob(".*") if p.name != ".lock"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


WRONG_SIZE = """
import time
from flwr.simulation import run_simulation
from server.app import app as server_app
from clients.app import app as client_app
started = time.monotonic()
try:
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1}})
except RuntimeError as err:
    print("REFUSED", err)
print("SECONDS", time.monotonic() - started)
"""


def test_a_federation_of_the_wrong_size_is_refused_at_once(tmp_path: Path, fmnist_dir: Path):
    """`flwr run .` without num-supernodes starts Flower's default federation, not num-clients
    nodes: the first node that answers says so, long before wait-for-clients (120 s) runs out,
    and the run folder says 'stopped' with the reason instead of 'running' at round 0."""
    proc = subprocess.run([sys.executable, "-c", WRONG_SIZE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FEDREP_DATA_DIR": str(fmnist_dir)})
    assert "REFUSED" in proc.stdout and "of 3, but num-clients=100" in proc.stdout, proc.stderr[-3000:]
    assert float(proc.stdout.split("SECONDS")[1]) < 100
    (run,) = (tmp_path / "runs").iterdir()
    state = RunDir(run).state()
    assert state["status"] == "stopped" and "num-supernodes=100" in state["error"]
