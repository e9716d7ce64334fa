"""The compose files, the credentials and the tested topology cannot drift apart.

``deploy/topology.py`` is the one source: the committed compose files must be exactly what it
renders, and the end-to-end test (test_deploy_e2e.py) starts the processes it describes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import flwr
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from deploy.credentials import make_credentials
from deploy.topology import (
    FLWR_VERSION,
    LINK_PORT,
    NODE_PORT,
    LocalLayout,
    build_services,
    local_process,
    render_compose,
    render_shell,
)

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
INSECURE = REPO / "docker-compose.insecure.yml"


def test_committed_compose_files_are_what_the_topology_renders():
    assert COMPOSE.read_text() == render_compose(3), (
        "docker-compose.yml is stale: python -m deploy.topology compose --nodes 3 > docker-compose.yml")
    assert INSECURE.read_text() == render_compose(3, secure=False), (
        "docker-compose.insecure.yml is stale: python -m deploy.topology compose --nodes 3 --insecure "
        "> docker-compose.insecure.yml")


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_compose_file_describes_the_tested_topology():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert set(services) == {"superlink", "superexec-serverapp", "register-supernodes",
                             *(f"supernode-{i}" for i in (1, 2, 3)),
                             *(f"superexec-clientapp-{i}" for i in (1, 2, 3))}
    link = services["superlink"]
    assert link["image"] == f"${{FLWR_SUPERLINK_IMAGE:-flwr/superlink}}:${{FLWR_VERSION:-{FLWR_VERSION}}}"
    assert link["ports"] == [f"{LINK_PORT}:{LINK_PORT}"]  # Fleet, Control and Runtime on one port
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in link["command"]
    assert "--insecure" not in str(doc)
    assert _arg(link["command"], "--isolation") == "process"
    for i in (1, 2, 3):
        node = services[f"supernode-{i}"]
        cmd = node["command"]
        assert node["image"] == f"${{FLWR_SUPERNODE_IMAGE:-flwr/supernode}}:${{FLWR_VERSION:-{FLWR_VERSION}}}"
        config = dict(item.split("=", 1) for item in shlex.split(_arg(cmd, "--node-config")))
        assert config == {"partition-id": str(i - 1), "num-partitions": "3", "state-dir": "/app/state"}
        assert _arg(cmd, "--superlink") == f"superlink:{LINK_PORT}"
        assert _arg(cmd, "--auth-supernode-private-key") == "/app/credentials/auth.key"
        assert node["depends_on"] == {"register-supernodes": {"condition": "service_completed_successfully"}}
        assert node["volumes"] == [f"./deploy/credentials/supernode-{i}:/app/credentials:ro"]
        executor = services[f"superexec-clientapp-{i}"]
        assert _arg(executor["command"], "--runtime-api-address") == f"supernode-{i}:{NODE_PORT}"
        volumes = executor["volumes"]
        assert any(v.endswith(":/app/data:ro") for v in volumes), "data must be mounted read-only"
        assert f"supernode-{i}-state:/app/state" in volumes
        assert executor["environment"] == {"FEDREP_DATA_DIR": "/app/data"}
    server = services["superexec-serverapp"]
    assert "fedrep-results:/app/runs" in server["volumes"] and server["working_dir"] == "/app"
    assert set(doc["volumes"]) == {"superlink-state", "fedrep-results",
                                   *(f"supernode-{i}-state" for i in (1, 2, 3))}
    # Nothing secret is mounted where it is not needed: the CA key lives in credentials/ca only.
    assert "credentials/ca" not in COMPOSE.read_text().replace("ca.crt", "")


def test_insecure_override_turns_off_tls_everywhere():
    doc = yaml.safe_load(INSECURE.read_text())
    for name, spec in doc["services"].items():
        cmd = spec["command"]
        if name == "register-supernodes":
            assert cmd[0] == "-c"
            continue
        assert "--insecure" in cmd, name
        assert not any(a.startswith(("--ssl", "--root-cert", "--auth-", "--enable-supernode")) for a in cmd)


def test_pinned_flower_version_is_the_one_installed_and_in_the_images():
    assert flwr.__version__ == FLWR_VERSION
    pin = re.search(r'"flwr\[simulation\]==([\d.*]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert FLWR_VERSION.startswith(pin.rstrip("*"))
    dockerfile = (REPO / "deploy/docker/superexec.Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=flwr/superexec:{FLWR_VERSION}" in dockerfile
    assert "FROM ${BASE_IMAGE}" in dockerfile
    assert f'ARG FLWR_VERSION={FLWR_VERSION}' in (REPO / "deploy/local-images/flwr.Containerfile").read_text()
    assert f"${{FLWR_VERSION:-{FLWR_VERSION}}}" in COMPOSE.read_text()
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in dockerfile
    assert "deploy/credentials/" in (REPO / ".dockerignore").read_text()


@pytest.mark.parametrize("nodes", [1, 5])
def test_generator_scales_to_n_nodes(nodes: int):
    doc = yaml.safe_load(render_compose(nodes))
    node_configs = [doc["services"][f"supernode-{i}"]["command"] for i in range(1, nodes + 1)]
    assert [_arg(c, "--node-config").split()[0] for c in node_configs] == [
        f"partition-id={i}" for i in range(nodes)]
    shell = render_shell(nodes)
    assert shell.count("flower-supernode ") == nodes and f"# --- on host 'node-{nodes}' ---" in shell


def test_credentials_are_what_flower_accepts(tmp_path: Path):
    from flwr.cli.supernode.register import try_load_public_key

    out = make_credentials(tmp_path / "c", 2, extra_link_names=["203.0.113.7", "link.example.org"])
    ca = x509.load_pem_x509_certificate((out / "superlink/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink/server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink", "localhost", "link.example.org"} <= set(names.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "203.0.113.7"}
    runtime = x509.load_pem_x509_certificate((out / "supernode-2/runtime.crt").read_bytes())
    runtime.verify_directly_issued_by(ca)
    assert "supernode-2" in runtime.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    key = load_ssh_private_key((out / "supernode-1/auth.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(out / "public-keys/supernode-1.pub")  # what `flwr supernode register` reads
    before = (out / "supernode-1/auth.key").read_bytes()
    make_credentials(out, 3)  # re-running keeps registered keys, adds node 3
    assert (out / "supernode-1/auth.key").read_bytes() == before
    assert (out / "supernode-3/auth.pub").is_file()
    assert not any("ca.key" in str(p) for p in out.rglob("*") if "ca" not in p.parent.name)


def test_local_processes_map_container_paths_to_host_folders(tmp_path: Path):
    layout = LocalLayout(credentials=tmp_path / "cred", data=tmp_path / "data", volumes=tmp_path / "vol",
                         roots=tmp_path / "roots")
    services = build_services(2)
    by_name = {s.name: s for s in services}
    argv, cwd, env = local_process(by_name["supernode-2"], layout, services)
    assert argv[0] == "flower-supernode" and "/app/" not in " ".join(argv)
    assert f'state-dir="{tmp_path / "vol" / "supernode-2-state"}"' in _arg(argv, "--node-config")
    argv, cwd, env = local_process(by_name["superexec-serverapp"], layout, services)
    assert (cwd / "runs").resolve() == (tmp_path / "vol" / "fedrep-results").resolve()
    _, _, env = local_process(by_name["superexec-clientapp-1"], layout, services)
    assert env == {"FEDREP_DATA_DIR": str(tmp_path / "data")}


def _compose_config(env: dict[str, str]) -> dict:
    """``podman-compose config``: the compose file as the engine's front end reads it."""
    import os
    import shutil
    import subprocess

    front = shutil.which("podman-compose")
    if front is None or shutil.which("podman") is None:
        pytest.skip("needs podman and podman-compose (.ci/run installs both; pip install podman-compose)")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "FEDREP_"))}
    proc = subprocess.run([front, "-f", str(COMPOSE), "config"], cwd=REPO, env={**base, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return yaml.safe_load(proc.stdout)


def test_compose_config_takes_images_and_version_from_the_environment():
    """The engine's own front end validates the file; images and Flower's version are variables
    with today's values as defaults, so a private registry (or deploy/local-images) substitutes
    them without editing files."""
    default = _compose_config({})["services"]
    assert default["superlink"]["image"] == f"flwr/superlink:{FLWR_VERSION}"
    assert default["supernode-1"]["image"] == f"flwr/supernode:{FLWR_VERSION}"
    assert f"BASE_IMAGE=flwr/superexec:{FLWR_VERSION}" in default["superexec-serverapp"]["build"]["args"]
    local = _compose_config({"FLWR_VERSION": "9.9.9", "FLWR_SUPERLINK_IMAGE": "reg.example/superlink",
                             "FLWR_SUPERNODE_IMAGE": "reg.example/supernode",
                             "FLWR_SUPEREXEC_IMAGE": "reg.example/superexec",
                             "FEDREP_PIP_INSTALL_FLAGS": "--no-index"})["services"]
    assert local["superlink"]["image"] == "reg.example/superlink:9.9.9"
    assert {local[f"supernode-{i}"]["image"] for i in (1, 2, 3)} == {"reg.example/supernode:9.9.9"}
    args = local["superexec-clientapp-2"]["build"]["args"]
    assert "BASE_IMAGE=reg.example/superexec:9.9.9" in args and "PIP_INSTALL_FLAGS=--no-index" in args
    assert local["supernode-2"]["depends_on"]["register-supernodes"]["condition"] == (
        "service_completed_successfully")


def test_gpu_override_reserves_a_gpu_for_each_clientapp_executor():
    from deploy.topology import render_gpu_override

    assert (REPO / "docker-compose.gpu.yml").read_text() == render_gpu_override(3)
    services = yaml.safe_load(render_gpu_override(3))["services"]
    for i in (1, 2, 3):
        devices = services[f"superexec-clientapp-{i}"]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert "cu126" in services[f"superexec-clientapp-{i}"]["build"]["args"]["TORCH_INDEX"]
    assert "deploy" not in services["superexec-serverapp"]  # the server aggregates on CPU
