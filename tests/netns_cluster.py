"""Run the deployment's processes, as ``deploy/topology.py`` describes them, in network namespaces.

Each host of the topology ("link", "node-1", ...) becomes a network namespace on one bridge, with
its own hosts file (``/etc/netns/NS/hosts``) so that ``superlink`` and ``supernode-I`` resolve
exactly as on the compose network. Every namespace listens on the compose ports (8000, 9094)
without clashing with anything on the machine. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.topology import LocalLayout, Service, local_process

BIN = Path(sys.executable).parent


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"frprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class NetnsCluster:
    """Namespaces + bridge + processes; ``close()`` removes every trace."""

    def __init__(self, services: list[Service], layout: LocalLayout, logs: Path) -> None:
        self.services = {s.name: s for s in services}
        self.layout = layout
        self.logs = logs
        tag = f"{os.getpid() % 100000:05d}"
        self.bridge = f"frb{tag}"
        self.subnet = f"10.{150 + os.getpid() % 100}.{os.getpid() // 100 % 250}"
        hosts = list(dict.fromkeys(s.host for s in services))
        self.ns = {host: f"fr{tag}-{host}" for host in hosts}
        self.ip = {host: f"{self.subnet}.{10 + i}" for i, host in enumerate(hosts)}
        self.procs: dict[str, subprocess.Popen] = {}
        self._veths: list[str] = []

    # -- network ------------------------------------------------------------------------------
    def up(self) -> NetnsCluster:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        names = {"localhost": "127.0.0.1"}
        for svc in self.services.values():
            names[svc.name] = self.ip[svc.host]
        hosts_text = "".join(f"{ip} {name}\n" for name, ip in names.items())
        for i, (host, ns) in enumerate(self.ns.items()):
            subprocess.run(["ip", "netns", "add", ns], check=True)
            veth, peer = f"{self.bridge}v{i}", f"{self.bridge}p{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            self._veths.append(veth)
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("addr", "add", f"{self.ip[host]}/24", "dev", peer, ns=ns)
            _ip("link", "set", peer, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_text)
        return self

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    # -- processes ----------------------------------------------------------------------------
    def command(self, name: str, extra_args: list[str] | None = None) -> tuple[list[str], Path, dict]:
        svc = self.services[name]
        argv, cwd, env = local_process(svc, self.layout, list(self.services.values()))
        program = BIN / argv[0] if argv[0] != "python" else Path(sys.executable)
        full_env = {**os.environ, **env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(cwd / ".flwr"), "PYTHONUNBUFFERED": "1"}
        return ["ip", "netns", "exec", self.ns[svc.host], str(program), *argv[1:],
                *(extra_args or [])], cwd, full_env

    def start(self, name: str, extra_args: list[str] | None = None) -> subprocess.Popen:
        cmd, cwd, env = self.command(name, extra_args)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def run(self, name: str, timeout: float = 180) -> subprocess.CompletedProcess:
        cmd, cwd, env = self.command(name)
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode} before logging {text!r}:\n"
                                     f"{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not log {text!r} in {timeout}s:\n{self.log(name)[-3000:]}")
            time.sleep(0.3)
