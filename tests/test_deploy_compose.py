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
    assert link["image"] == f"flwr/superlink:{FLWR_VERSION}"
    assert link["ports"] == [f"{LINK_PORT}:{LINK_PORT}"]  # Fleet, Control and Runtime on one port
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in link["command"]
    assert "--insecure" not in str(doc)
    assert _arg(link["command"], "--isolation") == "process"
    for i in (1, 2, 3):
        node = services[f"supernode-{i}"]
        cmd = node["command"]
        assert node["image"] == f"flwr/supernode:{FLWR_VERSION}"
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
    assert f"ARG FLWR_VERSION={FLWR_VERSION}" in dockerfile
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile
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
