"""The plain Flower route: `flwr run .` on a local SuperLink runs the very same app.

`fedrep run --engine flwr` drives `flwr run <app> --stream` with the resolved config as
`--run-config` overrides and FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION set (offline). Flower
auto-starts a detached local SuperLink; the test gives it a private FLWR_HOME and port and
tears the whole process tree down afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.results import RunDir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with(fragment: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd:
            pids.append(int(proc.name))
    return pids


def _teardown_superlink(port: int) -> None:
    links = _pids_with(f"--port {port}")
    execs = [p for link in links for p in _pids_with(f"--parent-pid {link}")]
    for pid in links:
        os.kill(pid, signal.SIGTERM)
    time.sleep(3)
    for pid in execs + links:  # superexec's group holds flwr-simulation and Ray's helpers
        for target in (-pid, pid):
            try:
                os.kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_flwr_run_route_trains_with_same_app(tmp_path: Path, fmnist_dir: Path):
    port = _free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    run_dir = tmp_path / "via-flwr"
    try:
        fedrep_cli("run", "--engine", "flwr", "--app", str(ROOT), *SMALL_FMNIST, "--rounds", "2",
                   "--set", f"run-dir={run_dir}", "--set", f"data-dir={fmnist_dir}",
                   env=env, timeout=400)
    finally:
        _teardown_superlink(port)
    run = RunDir(run_dir)
    assert run.state()["status"] == "completed"
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    audit = run.read_audit()
    trained = {r["partition"] for r in audit if r["kind"] == "train"}
    final = [r["metrics"]["accuracy"] for r in audit
             if r["kind"] == "evaluate" and r["round"] == 2 and r["partition"] in trained]
    assert final and sum(final) / len(final) > 0.6, final  # chance on own 2 classes: 0.5
    assert audit and not any("head" in a for row in audit for a in row["arrays"])
