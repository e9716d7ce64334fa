"""The deployment's topology, described once: docker-compose files and the tests both come from it.

    python -m deploy.topology compose --nodes 3 > docker-compose.yml
    python -m deploy.topology compose --nodes 3 --insecure > docker-compose.insecure.yml
    python -m deploy.topology shell --nodes 3          # the same processes on plain hosts

Process model (flwr 1.41, checked in its source): the SuperLink serves the Fleet, Control and
Runtime APIs on one HTTPS port (8000). With ``--isolation process`` it launches no executor
itself; a separate ``flower-superexec`` dials its Runtime API and spawns ``flwr-serverapp`` per
run. Each SuperNode likewise serves a Runtime API (9094) that its own ``flower-superexec``
dials to spawn ``flwr-clientapp``. Only the SuperExec images carry the app's dependencies
(PyTorch, fedrep); SuperLink and SuperNode are Flower's official images unchanged.

A ``Service`` holds the command as the container sees it (container paths, service names as
host names). ``local_process`` turns one into the command for a plain host by mapping the
container paths onto host folders, which is how the end-to-end test runs the very commands the
compose file holds.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

FLWR_VERSION = "1.41.0"
# Images and the Flower version come from the environment, today's values the defaults, so that a
# user with a private registry (or a machine with none: deploy/local_images.sh) substitutes them
# without editing the file.
VERSION = f"${{FLWR_VERSION:-{FLWR_VERSION}}}"
LINK_IMAGE = f"${{FLWR_SUPERLINK_IMAGE:-flwr/superlink}}:{VERSION}"
NODE_IMAGE = f"${{FLWR_SUPERNODE_IMAGE:-flwr/supernode}}:{VERSION}"
EXEC_BASE_IMAGE = f"${{FLWR_SUPEREXEC_IMAGE:-flwr/superexec}}:{VERSION}"
LINK_PORT = 8000  # Fleet + Control + Runtime API (one HTTP(S) server in flwr 1.41)
NODE_PORT = 9094  # a SuperNode's Runtime API, dialled by its ClientApp SuperExec
APP_IMAGE = "fedrep-superexec:latest"
APP_DOCKERFILE = "deploy/docker/superexec.Dockerfile"
CREDENTIALS = "/app/credentials"
STATE = "/app/state"
DATA = "/app/data"
RUNS = "/app/runs"
DATA_HOST = "${FEDREP_DATA_HOST_DIR:-/usr/share/datasets/fashion-mnist}"
APP_DEPLOY = "/app/deploy"  # the deploy/ scripts inside the app image
RESULTS_VOLUME = "fedrep-results"
LINK_VOLUME = "superlink-state"


@dataclass(frozen=True)
class Mount:
    """``source`` is a host path (bind mount, starts with '.', '/' or '$') or a named volume."""

    source: str
    target: str
    read_only: bool = False

    @property
    def is_volume(self) -> bool:
        return not self.source.startswith((".", "/", "$"))

    def compose(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


@dataclass(frozen=True)
class Service:
    """One process of the deployment, as its container runs it."""

    name: str
    host: str  # the machine it belongs on: "link" or "node-I" (a network namespace in tests)
    program: str  # the executable (the image's entrypoint)
    args: tuple[str, ...]
    image: str
    build: bool = False  # built from APP_DOCKERFILE (else an official Flower image)
    mounts: tuple[Mount, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ()
    depends_on: dict[str, str] = field(default_factory=dict)
    restart: str = "unless-stopped"
    working_dir: str = "/app"
    node_index: int | None = None

    @property
    def argv(self) -> list[str]:
        return [self.program, *self.args]


def node_name(index: int) -> str:
    return f"supernode-{index}"


def node_config(index: int, num_nodes: int) -> str:
    """The SuperNode's ``--node-config``: which partition it serves and where it keeps heads."""
    return f'partition-id={index - 1} num-partitions={num_nodes} state-dir="{STATE}"'


def _trust(secure: bool) -> tuple[str, ...]:
    return ("--root-certificates", f"{CREDENTIALS}/ca.crt") if secure else ("--insecure",)


def build_services(num_nodes: int, secure: bool = True) -> list[Service]:
    """All services for one SuperLink and ``num_nodes`` SuperNodes.

    ``secure``: TLS on every hop and SuperNode authentication (keys registered by the one-shot
    ``register-supernodes`` service); off only for local tries (the insecure override file)."""
    if num_nodes < 1:
        raise ValueError(f"need at least one SuperNode, got {num_nodes}")
    link_flags: tuple[str, ...] = (
        ("--ssl-ca-certfile", f"{CREDENTIALS}/ca.crt", "--ssl-certfile", f"{CREDENTIALS}/server.crt",
         "--ssl-keyfile", f"{CREDENTIALS}/server.key", "--enable-supernode-auth")
        if secure else ("--insecure",))
    services = [
        Service(
            name="superlink", host="link", program="flower-superlink",
            image=LINK_IMAGE,
            args=("--host", "0.0.0.0", "--port", str(LINK_PORT), "--isolation", "process",
                  "--database", f"{STATE}/superlink.db", "--disable-runtime-dependency-installation",
                  *link_flags),
            mounts=(Mount("./deploy/credentials/superlink", CREDENTIALS, read_only=True),
                    Mount(LINK_VOLUME, STATE)),
            ports=(f"{LINK_PORT}:{LINK_PORT}",),
        ),
        Service(
            name="superexec-serverapp", host="link", program="flower-superexec",
            image=APP_IMAGE, build=True,
            args=("--runtime-api-address", f"superlink:{LINK_PORT}", *_trust(secure)),
            mounts=(Mount("./deploy/credentials/superexec", CREDENTIALS, read_only=True),
                    Mount(RESULTS_VOLUME, RUNS)),
            depends_on={"superlink": "service_started"},
        ),
    ]
    register_args: tuple[str, ...] = (
        f"{APP_DEPLOY}/register_supernodes.py", "--superlink", f"superlink:{LINK_PORT}",
        *_trust(secure), "--keys", "/app/public-keys")
    if not secure:
        register_args = ("-c", "print('insecure deployment: SuperNode authentication is off')")
    services.append(Service(
        name="register-supernodes", host="link", program="python", image=APP_IMAGE, build=True,
        args=register_args, restart="no", depends_on={"superlink": "service_started"},
        mounts=(Mount("./deploy/credentials/superexec", CREDENTIALS, read_only=True),
                Mount("./deploy/credentials/public-keys", "/app/public-keys", read_only=True))
        if secure else (),
    ))
    for index in range(1, num_nodes + 1):
        name = node_name(index)
        node_flags: tuple[str, ...] = (
            ("--root-certificates", f"{CREDENTIALS}/ca.crt",
             "--auth-supernode-private-key", f"{CREDENTIALS}/auth.key",
             "--ssl-ca-certfile", f"{CREDENTIALS}/ca.crt", "--ssl-certfile", f"{CREDENTIALS}/runtime.crt",
             "--ssl-keyfile", f"{CREDENTIALS}/runtime.key")
            if secure else ("--insecure",))
        services.append(Service(
            name=name, host=f"node-{index}", program="flower-supernode", node_index=index,
            image=NODE_IMAGE,
            args=("--superlink", f"superlink:{LINK_PORT}", "--isolation", "process", "--host", "0.0.0.0",
                  "--port", str(NODE_PORT), "--node-config", node_config(index, num_nodes), *node_flags),
            mounts=(Mount(f"./deploy/credentials/{name}", CREDENTIALS, read_only=True),),
            depends_on={"register-supernodes": "service_completed_successfully"},
        ))
        services.append(Service(
            name=f"superexec-clientapp-{index}", host=f"node-{index}", program="flower-superexec",
            node_index=index, image=APP_IMAGE, build=True,
            args=("--runtime-api-address", f"{name}:{NODE_PORT}", *_trust(secure)),
            mounts=(Mount("./deploy/credentials/superexec", CREDENTIALS, read_only=True),
                    Mount(DATA_HOST, DATA, read_only=True),
                    Mount(f"{name}-state", STATE)),
            environment={"FEDREP_DATA_DIR": DATA},
            depends_on={name: "service_started"},
        ))
    return services


# -- docker compose ---------------------------------------------------------------------------
def compose_document(services: list[Service]) -> dict:
    """The compose file as data (what ``docker compose config`` would read)."""
    out: dict = {"name": "fedrep", "services": {}, "volumes": {}}
    for svc in services:
        spec: dict = {}
        if svc.build:
            spec["build"] = {"context": ".", "dockerfile": APP_DOCKERFILE,
                             "args": {"BASE_IMAGE": EXEC_BASE_IMAGE,
                                      "PIP_INSTALL_FLAGS": "${FEDREP_PIP_INSTALL_FLAGS:-}"}}
        spec["image"] = svc.image
        spec["hostname"] = svc.name
        spec["entrypoint"] = [svc.program]
        spec["command"] = list(svc.args)
        spec["working_dir"] = svc.working_dir
        if svc.environment:
            spec["environment"] = dict(svc.environment)
        if svc.mounts:
            spec["volumes"] = [m.compose() for m in svc.mounts]
        if svc.ports:
            spec["ports"] = list(svc.ports)
        if svc.depends_on:
            spec["depends_on"] = {dep: {"condition": cond} for dep, cond in svc.depends_on.items()}
        spec["restart"] = svc.restart
        spec["networks"] = ["flwr"]
        out["services"][svc.name] = spec
        for mount in svc.mounts:
            if mount.is_volume:
                out["volumes"][mount.source] = {}
    out["networks"] = {"flwr": {}}
    return out


def render_compose(num_nodes: int, secure: bool = True) -> str:
    import yaml

    header = (
        f"# Generated by `python -m deploy.topology compose --nodes {num_nodes}"
        f"{'' if secure else ' --insecure'}`; edit deploy/topology.py, not this file.\n"
        + ("# Secure by default: TLS everywhere and SuperNode authentication. First run\n"
           "#   python deploy/credentials.py --nodes N\n"
           "# then `docker compose up -d --build`. See deploy/README.md.\n" if secure else
           "# Local tries without certificates or node authentication:\n"
           "#   docker compose -f docker-compose.yml -f docker-compose.insecure.yml up -d --build\n"))
    doc = compose_document(build_services(num_nodes, secure))
    if not secure:  # an override file: only what differs, and no secrets mounted
        doc = {"services": {name: {"command": spec["command"]} for name, spec in doc["services"].items()}}
    return header + yaml.safe_dump(doc, sort_keys=False, width=200)


def render_gpu_override(num_nodes: int) -> str:
    """``docker-compose.gpu.yml``: the SuperNodes' ClientApp executors reserve one NVIDIA GPU each
    (compose's device reservation; podman: CDI, ``nvidia-ctk cdi generate``), and the app image is
    built with a CUDA PyTorch. Used as an override on top of the main file."""
    import yaml

    header = (f"# Generated by `python -m deploy.topology compose --nodes {num_nodes} --gpu`; edit "
              "deploy/topology.py, not this file.\n"
              "# GPU SuperNodes:\n"
              "#   docker compose -f docker-compose.yml -f docker-compose.gpu.yml up -d --build\n"
              "# then run with --set client-gpus=1 (or a fraction). Needs the NVIDIA container toolkit.\n")
    gpu = {"deploy": {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}}
    cuda = "${FEDREP_TORCH_INDEX:-https://download.pytorch.org/whl/cu126}"
    build = {"build": {"context": ".", "dockerfile": APP_DOCKERFILE, "args": {"TORCH_INDEX": cuda}}}
    services = {name: copy.deepcopy({**build, **(gpu if name.startswith("superexec-clientapp-") else {})})
                for name in ["superexec-serverapp",
                             *(f"superexec-clientapp-{i}" for i in range(1, num_nodes + 1))]}
    return header + yaml.safe_dump({"services": services}, sort_keys=False, width=200)


# -- plain hosts / tests -------------------------------------------------------------------------
@dataclass(frozen=True)
class LocalLayout:
    """Where a plain host keeps what the containers get as mounts."""

    credentials: Path  # the folder deploy/credentials.py wrote
    data: Path  # Fashion-MNIST IDX files
    volumes: Path  # one sub-folder per named volume
    roots: Path  # one sub-folder per service, standing in for its /app
    deploy_scripts: Path = Path(__file__).resolve().parent  # what the image copies to /app/deploy


def _host_path(mount: Mount, layout: LocalLayout) -> Path:
    if mount.is_volume:
        return layout.volumes / mount.source
    if mount.source == DATA_HOST:
        return layout.data
    prefix = "./deploy/credentials"
    if mount.source.startswith(prefix):
        return layout.credentials / mount.source[len(prefix):].lstrip("/")
    raise ValueError(f"no host location for mount {mount.compose()}")


def local_process(svc: Service, layout: LocalLayout, same_host: list[Service] = ()
                  ) -> tuple[list[str], Path, dict[str, str]]:
    """(argv, working folder, environment) to run ``svc`` on a plain host.

    Container paths in the arguments become host paths; mounts under the working folder become
    symlinks inside the service's stand-in root. A path that only a neighbour on the same host
    mounts maps to that neighbour's folder: the SuperNode's ``state-dir`` is read by the
    ClientApp its SuperExec spawns. Host names (``superlink``, ``supernode-I``) are unchanged:
    the host must resolve them (``/etc/hosts``, or per-namespace hosts files)."""
    root = layout.roots / svc.name
    root.mkdir(parents=True, exist_ok=True)
    mapping = {APP_DEPLOY: str(layout.deploy_scripts)}
    for other in same_host:
        if other.host == svc.host and other.name != svc.name:
            mapping.update({m.target: str(_host_path(m, layout)) for m in other.mounts})
    for mount in svc.mounts:
        host = _host_path(mount, layout)
        host.mkdir(parents=True, exist_ok=True)
        mapping[mount.target] = str(host)
        if mount.target.startswith(svc.working_dir + "/"):
            link = root / mount.target[len(svc.working_dir) + 1:]
            if not link.exists():
                link.symlink_to(host, target_is_directory=True)
    args = []
    for arg in svc.args:
        for target, host in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            arg = arg.replace(target, host)
        args.append(arg)
    env = {k: mapping.get(v, v) for k, v in svc.environment.items()}
    return [svc.program, *args], root, env


def render_shell(num_nodes: int, secure: bool = True) -> str:
    """The processes grouped by machine, for deployments without Docker."""
    lines = ["# The same processes on plain hosts. Replace /app/... with your folders; every host",
             "# must resolve 'superlink' (and each node host its own 'supernode-I') to the right IP."]
    host = None
    for svc in build_services(num_nodes, secure):
        if svc.host != host:
            host = svc.host
            lines += ["", f"# --- on host '{host}' ---"]
        env = " ".join(f"{k}={v}" for k, v in svc.environment.items())
        cmd = " ".join(_quote(a) for a in svc.argv)
        lines.append(f"{env + ' ' if env else ''}{cmd}{'' if svc.restart == 'no' else ' &'}")
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.topology", description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["compose", "shell"])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node auth (local tries)")
    parser.add_argument("--gpu", action="store_true", help="the GPU override file (compose only)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    if args.gpu:
        if args.format != "compose":
            parser.error("--gpu renders the compose override file: use it with 'compose'")
        sys.stdout.write(render_gpu_override(args.nodes))
        return 0
    render = render_compose if args.format == "compose" else render_shell
    sys.stdout.write(render(args.nodes, secure=not args.insecure))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
