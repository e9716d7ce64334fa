"""The deployment, for real: the compose file's processes with TLS and node auth, one network
namespace per host, FedRep over three SuperNodes, nodes killed and restarted mid-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.credentials import make_auth_keys, make_credentials
from deploy.register_supernodes import CONNECTION, write_connection
from deploy.topology import LocalLayout, build_services
from fedrep.data.fashion_mnist import locate
from netns_cluster import NetnsCluster, netns_unavailable

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
NODES = 3
ROUNDS = 5
RUN_NAME = "deploy-e2e"


def _fmnist_dir() -> Path:
    try:
        return locate(None, allow_download=False)
    except Exception as err:  # noqa: BLE001 - any reason means: no data here
        pytest.skip(f"Fashion-MNIST not installed ({err})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"deployment e2e needs network namespaces: {reason}")
    root = tmp_path_factory.mktemp("deploy")
    layout = LocalLayout(credentials=root / "credentials", data=_fmnist_dir(), volumes=root / "volumes",
                         roots=root / "roots")
    net = NetnsCluster(build_services(NODES), layout, root / "logs")
    make_credentials(layout.credentials, NODES, extra_link_names=[net.ip["link"]])
    net.up()
    try:
        net.start("superlink")
        net.wait_for_log("superlink", "Uvicorn running", 60)
        net.start("superexec-serverapp")
        registered = net.run("register-supernodes")
        assert registered.returncode == 0, registered.stderr
        assert registered.stdout.count(": node ") == NODES, registered.stdout
        again = net.run("register-supernodes")  # idempotent, as `docker compose up` re-runs it
        assert again.returncode == 0 and again.stdout.count("already registered") == NODES
        for i in range(1, NODES + 1):
            net.start(f"supernode-{i}")
            net.start(f"superexec-clientapp-{i}")
        for i in range(1, NODES + 1):
            net.wait_for_log(f"supernode-{i}", "SuperNode ID", 90)
        yield net
    finally:
        net.close()


def _cli_env(net: NetnsCluster) -> dict[str, str]:
    home = net.layout.roots / "operator-cli"
    write_connection(home, f"{net.ip['link']}:8000", net.layout.credentials / "superexec" / "ca.crt")
    return {**os.environ, "FLWR_HOME": str(home)}


def _without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def test_supernode_with_unregistered_key_is_refused(cluster: NetnsCluster, tmp_path: Path):
    make_auth_keys(tmp_path / "stranger.key", tmp_path / "stranger.pub")
    cmd, cwd, env = cluster.command("supernode-1", ["--auth-supernode-private-key",
                                                    str(tmp_path / "stranger.key"), "--port", "9095",
                                                    "--max-retries", "2", "--max-wait-time", "20"])
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "Failed to activate SuperNode" in out or "Failed to initialize the connection" in out, out[-2000:]


def test_supernode_without_the_ca_cannot_connect(cluster: NetnsCluster):
    cmd, cwd, env = cluster.command("supernode-1", ["--port", "9096", "--max-retries", "2",
                                                    "--max-wait-time", "20"])
    cmd = _without(cmd, "--root-certificates")  # falls back to the system CAs, which don't know ours
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in out or "certificate verify failed" in out, out[-2000:]


def _run_dir(net: NetnsCluster) -> Path:
    return net.layout.volumes / "fedrep-results" / RUN_NAME


def _wait(condition, what: str, timeout: float, net: NetnsCluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; server log:\n"
                                 + net.log("superexec-serverapp")[-3000:])
        time.sleep(0.5)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_fedrep_survives_lost_nodes_and_takes_them_back(cluster: NetnsCluster):
    env = _cli_env(cluster)
    settings = {"num-clients": NODES, "num-rounds": ROUNDS, "max-train-per-client": 120,
                "max-test-per-client": 60, "head-epochs": 2, "fraction-train": 1.0,
                "fraction-evaluate": 1.0, "eval-every": ROUNDS, "final-finetune-epochs": 1,
                "wait-for-clients": 60, "run-dir": f'"runs/{RUN_NAME}"'}
    # The user's route: `fedrep run` submits to the deployment and follows the run to its end.
    cmd = [sys.executable, "-m", "fedrep.cli", "run", "--engine", "flwr", "--superlink", CONNECTION,
           "--app", str(REPO)]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    user_log = cluster.logs / "fedrep-run.log"
    with user_log.open("w") as sink:  # a file, not a pipe: the streamed run log can be long
        user = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    run_dir = _run_dir(cluster)

    # A round with everyone, then nodes 2 and 3 die (SIGKILL, with their ClientApp executors);
    # node 3 also loses its disk, node 2 keeps it. The SuperLink declares them offline once their
    # heartbeats stop (about a minute in flwr 1.41), and the waiting round goes on without them.
    _wait(lambda: len(_metrics(run_dir)) >= 1, "round 1", 300, cluster)
    for i in (2, 3):
        cluster.kill(f"superexec-clientapp-{i}")
        cluster.kill(f"supernode-{i}")
    shutil.rmtree(cluster.layout.volumes / "supernode-3-state")
    _wait(lambda: {e["partition"] for e in _events(run_dir) if e["event"] == "node-lost"} == {1, 2},
          "the server to notice both lost nodes", 240, cluster)
    assert len(_metrics(run_dir)) < ROUNDS, "the run ended before the nodes could come back"
    for i in (2, 3):
        cluster.start(f"supernode-{i}")
        cluster.start(f"superexec-clientapp-{i}")

    # `fedrep run` returns once the SuperLink reports the run finished, with the run's log.
    user.wait(timeout=400)
    output = user_log.read_text()
    assert user.returncode == 0, output[-3000:]
    assert f"results: runs/{RUN_NAME} on the ServerApp's host" in output

    # The run completed every round; nothing it wrote is torn.
    rows = _metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert json.loads((run_dir / "state.json").read_text())["status"] == "completed"
    for r in range(1, ROUNDS + 1):
        torch.load(run_dir / "checkpoints" / f"round-{r:04d}.pt", weights_only=True)
    assert (run_dir / "metrics.csv").read_text().count("\n") == ROUNDS + 1
    assert min(r["train-clients"] for r in rows) == 1 and rows[0]["train-clients"] == NODES
    final = rows[-1]
    assert final["eval-clients"] == NODES and final["accuracy-mean"] > 0.5

    # The server said which node was lost and how each came back.
    events = _events(run_dir)
    back = {e["partition"]: e for e in events if e["event"] == "node-rejoined"}
    assert back[1]["head"] == "restored from its state file"
    assert back[2]["head"].startswith("fresh")
    assert all(e["round"] > 1 for e in events)

    # Heads stayed on their nodes: the server only ever received body arrays, and each node's
    # head file sits in that node's own state volume.
    audit = [json.loads(x) for x in (run_dir / "messages.jsonl").read_text().splitlines()]
    arrays = {a for row in audit for a in row["arrays"]}
    assert arrays and all(a.startswith("arrays/body.") for a in arrays), sorted(arrays)[:5]
    assert not (run_dir / "client-state").exists()
    for i in range(1, NODES + 1):
        files = list((cluster.layout.volumes / f"supernode-{i}-state").rglob("partition-*.pt"))
        assert [f.name for f in files] == [f"partition-{i - 1:05d}.pt"]
        versions = torch.load(files[0], weights_only=True)
        assert all(k.startswith("head.") for v in versions.values() for k in v)
        assert all(np.isfinite(t.numpy()).all() for v in versions.values() for t in v.values())
