"""Launch the Flower app on Flower's Simulation Runtime (Ray backend), in this process.

This is what ``flwr run .`` does on a local SuperLink, minus the SuperLink: the same ServerApp
and ClientApp components, loaded by name from an app folder whose ``pyproject.toml`` carries the
resolved run config, so every simulated SuperNode sees exactly the config the server validated.
The ServerApp runs in a thread of this process, which is why progress prints live and an
exception in round 7 reaches the caller as an exception.

Ray: a private instance started here, or, when ``RAY_ADDRESS`` is set (Ray's own variable:
``auto``, ``host:6379``, ``ray://host:10001``), the existing cluster it names; the ClientApps then
run as Ray actors on any of its nodes. ``deploy/ray/README.md`` covers the cluster side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import tomllib

from fedrep.config import ConfigError, RunConfig, toml_value
from fedrep.interrupts import IN_PROCESS

SERVER_APP, CLIENT_APP = "server.app:app", "clients.app:app"
# Read by the clients (data location, cache, offline switch). A cluster's workers descend from its
# raylets, not from this process, so they see these only if we pass them along.
FORWARDED_ENV = ("FEDREP_DATA_DIR", "FEDREP_CACHE_DIR", "FEDREP_OFFLINE", "FEDREP_CLIENT_CACHE",
                 "FEDREP_CLIENT_CACHE_MB", "FEDREP_QUIET_ACTORS")


def check_component(reference: str) -> None:
    """Fail early, naming the fix, if ``module:attr`` does not name an importable object. Modules
    resolve from the current directory too, as with ``python -m`` (the Ray workers inherit this
    process's ``sys.path``)."""
    import importlib

    if os.getcwd() not in sys.path:  # after the install: a clients.py here must not shadow ours
        sys.path.append(os.getcwd())
    module, sep, attr = reference.partition(":")
    if not sep or not module or not attr.isidentifier():
        raise ConfigError(f"--client-app {reference!r}: write MODULE:ATTR, e.g. clients.app:app")
    try:
        found = hasattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ConfigError(f"--client-app {reference!r}: cannot import {module} ({err}); run from the "
                          "repository root or install the package that holds it") from None
    if not found:
        raise ConfigError(f"--client-app {reference!r}: {module} has no attribute {attr!r}")


def write_app_dir(cfg: RunConfig, folder: Path, client_app: str = CLIENT_APP) -> Path:
    """A minimal Flower app folder whose default run config is ``cfg``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[project]", 'name = "fedrep-run"', 'version = "0.0.0"', "",
        "[tool.flwr.app]", 'publisher = "fedrep"', "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"', f'clientapp = "{client_app}"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in cfg.to_flower().items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # fail here, not inside a Ray worker, if quoting ever breaks
    (folder / "pyproject.toml").write_text(text)
    return folder


def quiet_flower_env() -> None:
    """No telemetry (offline machines hang on it) and no per-run dependency installation."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silence a FutureWarning


def worker_runtime_env() -> dict[str, Any]:
    """The Ray runtime_env every ClientApp actor starts with.

    Flower's RayBackend passes this driver's ``sys.path`` as PYTHONPATH so that workers import
    the app as this process does; we keep that and add :data:`FORWARDED_ENV`."""
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    env_vars = {"PYTHONPATH": pythonpath}
    env_vars.update({key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)})
    for key in ("FEDREP_DATA_DIR", "FEDREP_CACHE_DIR"):  # workers start in another folder
        if key in env_vars:
            env_vars[key] = os.path.abspath(env_vars[key])
    return {"env_vars": env_vars}


def clients_at_once(nodes: list[dict[str, Any]], cpus: float, gpus: float) -> int:
    """How many ClientApp actors fit, counted node by node as Flower sizes its actor pool
    (``pool_size_from_resources``): an actor cannot straddle two nodes."""
    total = 0
    for node in nodes:
        fit = int(node["Resources"].get("CPU", 0) / cpus)
        if gpus > 0:
            fit = min(fit, int(node["Resources"].get("GPU", 0) / gpus))
        total += fit
    return total


@contextlib.contextmanager
def _working_dir(folder: Path | None):
    """Run the block in ``folder``. ``ray.init`` puts the driver's working directory at the front
    of every worker's ``sys.path``, so a ``clients.py`` or ``clients/`` where the user happens to
    be would replace the ClientApp package in the workers; initialising Ray from the run's own
    app folder (it holds only ``pyproject.toml``) keeps the workers on the installed packages."""
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def start_ray(cfg: RunConfig, verbose: bool = False, init_dir: Path | None = None) -> str:
    """Start a private Ray, or join the cluster ``RAY_ADDRESS`` names; return one line saying
    which, with its nodes, CPUs, GPUs and how many clients run at once.

    Flower's RayBackend calls ``ray.init`` only while Ray is not initialised, so initialising it
    here, with the arguments Flower would use, decides where the clients run. Without
    ``RAY_ADDRESS`` we ask for ``local``: a bare ``ray.init()`` joins whatever cluster ``ray start``
    last left on this machine."""
    import ray

    address = os.environ.get("RAY_ADDRESS", "").strip()
    runtime_env = worker_runtime_env()
    os.environ["PYTHONPATH"] = runtime_env["env_vars"]["PYTHONPATH"]  # as Flower does (a private
    init_args: dict[str, Any] = {"runtime_env": runtime_env, "log_to_driver": True}  # Ray inherits)
    if not verbose:
        init_args["logging_level"] = "WARNING"  # Flower's default for simulations
        runtime_env["env_vars"]["FEDREP_QUIET_ACTORS"] = "1"  # see clients/app.py
    if not address:
        with _working_dir(init_dir):
            ray.init(address="local", include_dashboard=False, **init_args)
    else:
        check_reachable(address)
        try:
            with _working_dir(init_dir):
                ray.init(address=address, **init_args)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"RAY_ADDRESS={address!r}: cannot join a Ray cluster there ({err}). "
                              f"{_RAY_ADDRESS_FIX}") from None
    summary, gpus, fit = ray_summary(cfg, address)
    if fit == 0:
        ray.shutdown()
        fix = ("set client-gpus=0 to train on CPUs, or add GPU nodes" if cfg.client_gpus > 0 and not gpus
               else "lower them (e.g. --set client-cpus=0.5) or add bigger nodes")
        raise ConfigError(f"client-cpus={cfg.client_cpus:g} client-gpus={cfg.client_gpus:g} fit no node "
                          f"of the {summary}; {fix}")
    return (f"[fedrep] {summary}; client-cpus={cfg.client_cpus:g} client-gpus={cfg.client_gpus:g} "
            f"-> {fit} clients at a time")


_RAY_ADDRESS_FIX = ("Start the cluster (`ray start --head`, deploy/ray/README.md) or unset RAY_ADDRESS "
                    "to run on a private local Ray")


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds, naming RAY_ADDRESS, when nothing listens at ``host:port``: ``ray.init``
    itself keeps retrying an unreachable head for minutes. ``auto`` is Ray's to resolve (and it
    fails fast)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConfigError(f"RAY_ADDRESS={address!r}: nothing answers there ({err}). "
                          f"{_RAY_ADDRESS_FIX}") from None


def ray_summary(cfg: RunConfig, address: str) -> tuple[str, float, int]:
    """(which Ray, its live nodes, CPUs and GPUs; its GPUs; how many clients fit at once)."""
    import ray

    nodes = [node for node in ray.nodes() if node["Alive"]]
    cpus = sum(node["Resources"].get("CPU", 0) for node in nodes)
    gpus = sum(node["Resources"].get("GPU", 0) for node in nodes)
    if not address:
        where = "private local Ray (set RAY_ADDRESS to use a cluster)"
    elif "://" in address:  # Ray Client: the driver is not part of the cluster
        where = f"Ray cluster at {address}"
    else:
        resolved = ray.get_runtime_context().gcs_address
        where = f"Ray cluster at {resolved}" + (f" (RAY_ADDRESS={address})" if address != resolved else "")
    summary = f"{where}: {len(nodes)} node{'s' * (len(nodes) != 1)}, {cpus:g} CPUs, {gpus:g} GPUs"
    return summary, gpus, clients_at_once(nodes, cfg.client_cpus, cfg.client_gpus)


class _ClientFailureLogFilter(logging.Filter):
    """Without ``--verbose``, a client that raises is one line of the round loop's (the progress
    line and an ``events.jsonl`` row with its message), not the pages of chained Ray and Flower
    tracebacks the simulation engine logs for it; and a client that cannot use the run folder
    stops the run with one line naming the file."""

    NOISE = ("An exception was raised when processing a message by", "ray::ClientAppActor",
             "Traceback (most recent call last)")

    def filter(self, record: logging.LogRecord) -> bool:
        from fedrep.results import RUN_FOLDER_TAG

        text = record.getMessage()
        return not (RUN_FOLDER_TAG in text or any(n in text[:120] for n in self.NOISE))


def simulate(cfg: RunConfig, app_dir: Path, verbose: bool = False, client_app: str = CLIENT_APP) -> None:
    """Run ``cfg`` (already validated; ``run-dir`` already decided) to completion with the
    ``client_app`` component (``module:attr``)."""
    quiet_flower_env()
    from fedrep import flower_runtime

    try:
        flower_runtime.install()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    write_app_dir(cfg, app_dir, client_app)
    resources: dict[str, Any] = {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}
    backend_config: dict[str, Any] = {"client_resources": resources, "init_args": {}}
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigterm_before = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    # ray.init replaces the SIGTERM handler; _quiet_on_interrupt below puts ours back
    print(start_ray(cfg, verbose, init_dir=app_dir), file=sys.stderr, flush=True)
    if not verbose:
        logging.getLogger("flwr").addFilter(_ClientFailureLogFilter())
    import ray

    previous = _quiet_on_interrupt()
    IN_PROCESS.reset()
    try:
        flower_runtime.run_simulation(cfg.to_flower(), cfg.num_clients, SERVER_APP, client_app,
                                      backend_config, app_dir, verbose)
    except BaseException:
        # The ServerApp runs in a thread of this process that Ctrl-C does not reach: have it stop
        # before it writes another round, and let it go before the caller may resume the run.
        IN_PROCESS.request()
        raise
    finally:
        ray.shutdown()  # Flower's backend shuts Ray down too, but not if the run fails before it
        IN_PROCESS.wait_idle(timeout=30.0)
        if previous is not None:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, sigterm_before)


def _quiet_on_interrupt() -> Any:
    """On Ctrl-C or SIGTERM, silence Flower's logger *before* the interrupt unwinds: Flower's own
    clean-up shuts Ray down on the way out, and its client threads then log every actor that
    dies as an error, pages of noise over the one line that says how to resume. SIGTERM raises
    the CLI's ``Terminated`` (a KeyboardInterrupt) instead of the handler ``ray.init`` installed,
    which exits mid-clean-up with a stack dump. Returns the previous SIGINT handler in a tuple
    (None off the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    from fedrep.interrupts import Terminated

    def interrupted(signum: int, frame: Any) -> None:
        logging.getLogger("flwr").disabled = True
        if signum == signal.SIGTERM:
            raise Terminated
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGTERM, interrupted)
    return signal.signal(signal.SIGINT, interrupted), None
