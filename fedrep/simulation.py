"""Launch the Flower app on Flower's Simulation Runtime (Ray backend), in this process.

This is what ``flwr run .`` does on a local SuperLink, minus the SuperLink: the same ServerApp
and ClientApp components, loaded by name from an app folder whose ``pyproject.toml`` carries the
resolved run config, so every simulated SuperNode sees exactly the config the server validated.
The ServerApp runs in a thread of this process, which is why progress prints live and an
exception in round 7 reaches the caller as an exception.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tomllib

from fedrep.config import RunConfig, toml_value

SERVER_APP, CLIENT_APP = "server.app:app", "clients.app:app"


def write_app_dir(cfg: RunConfig, folder: Path) -> Path:
    """A minimal Flower app folder whose default run config is ``cfg``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[project]", 'name = "fedrep-run"', 'version = "0.0.0"', "",
        "[tool.flwr.app]", 'publisher = "fedrep"', "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"', f'clientapp = "{CLIENT_APP}"', "",
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


def simulate(cfg: RunConfig, app_dir: Path, verbose: bool = False) -> None:
    """Run ``cfg`` (already validated; ``run-dir`` already decided) to completion."""
    quiet_flower_env()
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    write_app_dir(cfg, app_dir)
    run_config = cfg.to_flower()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(8))
    run.primary_task_id = generate_rand_int_from_bytes(8)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    resources: dict[str, Any] = {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}
    backend_config: dict[str, Any] = {"client_resources": resources, "init_args": {}}
    if os.environ.get("RAY_ADDRESS"):
        backend_config["init_args"]["address"] = os.environ["RAY_ADDRESS"]
    _run_simulation(
        num_supernodes=cfg.num_clients,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr=SERVER_APP,
        client_app_attr=CLIENT_APP,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        verbose_logging=verbose,
        is_app=True,
    )
