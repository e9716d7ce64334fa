"""fedrep from Python: run, resume and compare experiments, and use what they produced.

For notebooks and scripts; the ``fedrep`` command is a thin layer over this module. Nothing here
ends the process or changes global state a caller owns: errors are exceptions
(:class:`~fedrep.config.ConfigError` for what a user can fix, ``RuntimeError`` for a run that
started and failed), Ctrl-C raises ``KeyboardInterrupt`` to the caller (the run folder stays
resumable), and plots are drawn without touching matplotlib's backend.

    import fedrep

    run = fedrep.run({"num-rounds": 3, "num-clients": 20}, out_dir="runs")
    run.metrics()[-1]["accuracy-mean"]     # one dict per completed round
    run.plot()                              # RUN_DIR/plot.png
    model = run.model_for(7)                # client 7's personalised model (torch.nn.Module)
    run.export(7, "client-7.pt")            # one self-contained file; fedrep.load_model reads it
    run = fedrep.resume(run.path, rounds=5) # continue the same run to round 5

A run in a notebook keeps Ray's worker processes only while it runs; each call starts and stops
its own. Known limit: after a Ctrl-C, Flower may leave one of its client threads waiting on a Ray
worker that is gone. It holds no files and does not disturb later runs, but Python joins it at
exit, so a *script* that caught the interrupt should end with ``os._exit(code)`` (as the CLI
does); a notebook kernel is unaffected until it is restarted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrep.config import ConfigError, RunConfig, load_experiment_file, parse_run_config

if TYPE_CHECKING:
    import torch

ConfigSource = Mapping[str, Any] | RunConfig | str | Path | None


# -- configuration ------------------------------------------------------------------------------
def config_values(config: ConfigSource = None, **keys: Any) -> dict[str, Any]:
    """Flat run-config values from a mapping, a :class:`RunConfig`, or a TOML file, with ``keys``
    (Python names such as ``num_rounds`` or run-config keys) on top."""
    if isinstance(config, RunConfig):
        values = config.to_flower()
    elif isinstance(config, str | Path):
        values = load_experiment_file(config)
    else:
        values = dict(config or {})
    values.update({key.replace("_", "-"): value for key, value in keys.items()})
    return values


def settle_config(values: Mapping[str, Any], resume: str | Path | None = None,
                  local: bool = True) -> RunConfig:
    """Validate ``values`` into the run's config with its run folder decided: a new folder under
    ``out-dir``, or (``resume``) the given run's, whose saved config the values update.

    ``local=False`` (a deployed SuperLink): the run folder is a path on the ServerApp's host,
    kept relative so that it lands under the executor's working folder (its results volume)."""
    from fedrep import runlock
    from fedrep.results import RunDir, new_run_name

    merged: dict[str, Any] = {}
    if resume:
        merged.update(RunDir.open(resume).saved_config().to_flower())
    merged.update(values)
    if resume:
        merged.update({"resume": True, "run-dir": str(Path(resume).resolve())})
    for path_key in ("data-dir", "partition-file"):  # the clients do not run in this folder
        if local and merged.get(path_key):
            merged[path_key] = os.path.abspath(str(merged[path_key]))
    cfg = parse_run_config(merged, "fedrep run configuration")
    if cfg.run_dir and local:
        check_path_lengths(cfg)  # before anything touches a path the OS would refuse
    if cfg.run_dir and Path(cfg.run_dir).is_dir():
        runlock.check_free(cfg.run_dir)  # name the process that holds it, whatever else is wrong
    if not resume and cfg.run_dir and (Path(cfg.run_dir) / "state.json").exists():
        raise ConfigError(f"run-dir {cfg.run_dir} already holds a run; resume it with "
                          f"`fedrep run --resume {cfg.run_dir}` or choose another run-dir")
    if resume:
        RunDir(cfg.run_dir).check_resumable_with(cfg)
    if not cfg.run_dir:
        run_dir = Path(cfg.out_dir) / new_run_name(cfg)
        run_dir = run_dir.resolve() if local else run_dir
        cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
        if local:
            check_path_lengths(cfg)
    return cfg


# -- running ------------------------------------------------------------------------------------
class RunFailed(RuntimeError):
    """The federation ran but did not complete."""


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before Ray starts, on what would otherwise fail inside a client."""
    from fedrep.models import build_model
    from fedrep.registry import get_strategy

    rule = get_strategy(cfg.strategy).client_rule(cfg)
    try:
        rule.check(rule.prepare_model(build_model(cfg)))
    except ValueError as err:
        raise ConfigError(f"strategy {cfg.strategy!r}: {err}") from None
    from fedrep.data.federated import check_data

    check_data(cfg)  # locates + verifies the files, builds the split
    from fedrep.tracking import trackers_from

    trackers_from(cfg.tracking, Path(cfg.run_dir))  # a tracker whose library is missing, named now
    if cfg.resume:
        check_resumable_files(cfg)
    # last, so that a run refused above leaves no empty folder behind
    try:  # the ServerApp creates it; a bad path would fail there, after Ray started
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run-dir {cfg.run_dir}: cannot create the run folder ({err.strerror}); "
                          "choose a writable place with --out DIR or --set run-dir=DIR") from None


def check_path_lengths(cfg: RunConfig) -> None:
    """Refuse a run-dir whose files the OS would refuse (each client's head file would fail to
    save, after Ray started): the longest path written inside it, and each folder name."""
    from fedrep.files import TEMP_SUFFIX_LEN
    from fedrep.results import CLIENT_STATE, client_state_file

    run_dir = Path(cfg.run_dir).absolute()
    existing = next(p for p in (run_dir, *run_dir.parents) if os.path.exists(p))
    path_max, name_max = os.pathconf(existing, "PC_PATH_MAX"), os.pathconf(existing, "PC_NAME_MAX")
    for part in run_dir.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"run-dir: the folder name {part[:40]}... is {len(os.fsencode(part))} bytes; "
                              f"this file system takes at most {name_max}. Choose a shorter run-dir or --out")
    head = client_state_file(run_dir / CLIENT_STATE, max(cfg.num_clients - 1, 0))
    longest = len(os.fsencode(head)) + TEMP_SUFFIX_LEN
    if longest >= path_max:
        raise ConfigError(f"run-dir is {len(os.fsencode(run_dir))} bytes long; the files inside it would "
                          f"reach {longest}, and the OS takes paths of at most {path_max - 1}. Choose a "
                          "shorter run-dir or --out")


def check_resumable_files(cfg: RunConfig) -> None:
    """Before Ray starts: the checkpoint a resume starts from, and (simulation) every client's
    head file, load. A damaged one is named with the user's choices."""
    from fedrep.results import HeadFileDamaged, RunDir, read_head_versions

    run = RunDir(cfg.run_dir)
    last = run.last_completed_round()
    if last > 0:
        run.load_checkpoint(last)
    if cfg.on_damaged_head == "restart":
        return
    damaged = []
    for path in run.head_files():
        try:
            read_head_versions(path)
        except HeadFileDamaged as err:
            damaged.append(err)
    if damaged:
        many = len(damaged) > 1
        raise ConfigError(
            f"{len(damaged)} client head file{'s' * many} cannot be read: {damaged[0]}"
            f"{' (and more)' if many else ''}. Restore {'them' if many else 'it'}, or add "
            f"--restart-damaged-heads to start {'those clients' if many else 'that client'} from a "
            "fresh head (an event in events.jsonl)")


def flwr_command(cfg: RunConfig) -> tuple[str, list[str]]:
    """The ``flwr`` executable and the run config as ``--run-config key=value`` arguments."""
    from fedrep.config import toml_value

    flwr = shutil.which("flwr")
    if flwr is None:
        raise ConfigError("`flwr` is not on PATH; install the project (pip install -e .)")
    overrides: list[str] = []
    for key, value in cfg.to_flower().items():
        overrides += ["--run-config", f"{key}={toml_value(value)}"]
    return flwr, overrides


def flwr_run(cfg: RunConfig, app: str, verbose: bool) -> None:
    """Drive the plain Flower route: ``flwr run APP --stream`` on a local SuperLink."""
    from fedrep.results import RunDir
    from fedrep.simulation import quiet_flower_env

    quiet_flower_env()
    flwr, overrides = flwr_command(cfg)
    cpus = int(cfg.client_cpus) if float(cfg.client_cpus).is_integer() else cfg.client_cpus
    federation = (f"num-supernodes={cfg.num_clients} client-resources-num-cpus={cpus} "
                  f"client-resources-num-gpus={cfg.client_gpus}")
    cmd = [flwr, "run", app, "--stream", "--federation-config", federation, *overrides]
    if verbose:
        print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=False)
    run = RunDir(cfg.run_dir)
    if not run.state_file.is_file() or run.state().get("status") != "completed":
        raise RunFailed(f"the Flower run did not complete; see the log above and {run.path}")


def already_done(cfg: RunConfig) -> bool:
    """A resume of a finished run with nothing to add: say so instead of starting Ray."""
    from fedrep.results import RunDir

    run = RunDir(cfg.run_dir)
    state = run.state()
    if cfg.onboard or state.get("status") != "completed" or cfg.num_rounds > run.last_completed_round():
        return False
    print(f"[fedrep] {run.path} already completed its {cfg.num_rounds} rounds; nothing to do "
          "(--rounds N extends it)", file=sys.stderr)
    return True


def execute(cfg: RunConfig, engine: str = "simulation", verbose: bool = False, app: str = ".",
            client_app: str | None = None, from_round: int | None = None) -> bool:
    """Run a settled config to completion in this process (``engine="simulation"``) or through
    ``flwr run`` against a local SuperLink (``"flwr"``). Returns False when a resumed run had
    already done every round (nothing was started). The run folder's lock is held while it runs."""
    from fedrep import runlock

    if client_app and engine != "simulation":
        raise ConfigError("client-app works with the simulation engine; a deployment's ClientApp is "
                          "the app folder's [tool.flwr.app.components] clientapp")
    if from_round is not None and not cfg.resume:
        raise ConfigError("from-round needs a resumed run (--resume RUN_DIR)")
    held_before = runlock.holds(cfg.run_dir)
    try:
        if cfg.resume and engine == "simulation" and not held_before:
            runlock.acquire(cfg.run_dir)
        if from_round is not None:
            from fedrep.results import RunDir

            with runlock.holding(cfg.run_dir):
                RunDir(cfg.run_dir).roll_back(from_round)
        if cfg.resume and already_done(cfg):
            return False
        preflight(cfg)
        if engine == "flwr":
            runlock.check_free(cfg.run_dir)  # the ServerApp, another process, takes it
            flwr_run(cfg, app, verbose)
            return True
        from fedrep.simulation import CLIENT_APP, check_component, simulate

        if client_app:
            check_component(client_app)
        if not runlock.holds(cfg.run_dir):
            runlock.acquire(cfg.run_dir)
        with tempfile.TemporaryDirectory(prefix="fedrep-app-") as app_dir:
            simulate(cfg, Path(app_dir), verbose=verbose, client_app=client_app or CLIENT_APP)
        return True
    finally:
        if not held_before and runlock.holds(cfg.run_dir):
            runlock.release(cfg.run_dir)


def run(config: ConfigSource = None, *, verbose: bool = False, **keys: Any) -> Run:
    """Run an experiment and return it. ``config``: a mapping of run-config keys, a
    :class:`RunConfig`, or a TOML experiment file; ``keys`` override it (``num_rounds=3`` or
    ``**{"num-rounds": 3}``). Raises :class:`ConfigError` before anything starts on a bad key."""
    cfg = settle_config(config_values(config, **keys))
    execute(cfg, verbose=verbose)
    return Run(Path(cfg.run_dir))


def resume(run_dir: str | Path, *, rounds: int | None = None, from_round: int | None = None,
           verbose: bool = False, **keys: Any) -> Run:
    """Continue a stopped run (or extend a finished one to ``rounds``) from its last completed
    round, bitwise as if it had not stopped; ``from_round`` drops the rounds after it first.
    ``onboard=True`` on a finished run trains no round: its new clients get heads instead."""
    values = config_values(None, **keys)
    if rounds is not None:
        values["num-rounds"] = rounds
    cfg = settle_config(values, resume=run_dir)
    execute(cfg, verbose=verbose, from_round=from_round)
    return Run(Path(cfg.run_dir))


def run_comparison(comparison_file: str | Path, out: str | Path, *, seeds: Sequence[int] | None = None,
            only: Sequence[str] | None = None, settings: Mapping[str, Any] | None = None) -> Path:
    """Run every strategy of a comparison file on identical clients (over ``seeds`` if given) and
    return the Markdown table; rerunning continues where it stopped."""
    from fedrep import compare as comparing

    only_list = list(only) if only else None
    if seeds:
        return comparing.compare_seeds(Path(comparison_file), Path(out), list(seeds), only_list,
                                       dict(settings or {}))
    return comparing.compare(Path(comparison_file), Path(out), only_list, dict(settings or {}))


# -- a finished (or stopped) run ----------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """A run folder and what can be done with it. Every answer is read from the folder, so a Run
    opened on another machine, or while the run continues, sees what is on disk."""

    path: Path

    @classmethod
    def open(cls, run_dir: str | Path) -> Run:
        from fedrep.results import RunDir

        return cls(RunDir.open(run_dir).path)

    @property
    def config(self) -> RunConfig:
        from fedrep.results import RunDir

        return RunDir(self.path).saved_config()

    @property
    def status(self) -> str:
        """``running``, ``completed``, ``failed``, ``interrupted``... as ``state.json`` says."""
        from fedrep.results import RunDir

        return str(RunDir(self.path).state().get("status", "unknown"))

    @property
    def last_round(self) -> int:
        from fedrep.results import RunDir

        return RunDir(self.path).last_completed_round()

    def metrics(self) -> list[dict[str, Any]]:
        """One row per completed round (``round``, ``train-loss``, ``accuracy-mean``, ...)."""
        from fedrep.results import RunDir

        return RunDir(self.path).read_metrics()

    def metrics_table(self, columns: Sequence[str] = ("round", "train-loss", "accuracy-mean",
                                                      "accuracy-std")) -> str:
        """The metrics as a fixed-width text table (``columns`` a row lacks are blank)."""
        rows = self.metrics()
        width = {c: max(len(c), 10) for c in columns}
        lines = ["  ".join(f"{c:>{width[c]}}" for c in columns)]
        for row in rows:
            cells = []
            for c in columns:
                value = row.get(c, "")
                text = f"{value:.4f}" if isinstance(value, float) else str(value)
                cells.append(f"{text:>{width[c]}}")
            lines.append("  ".join(cells))
        return "\n".join(lines)

    def plot(self, out: str | Path | None = None) -> Path:
        """Draw the run's plot (default ``RUN_DIR/plot.png``) and return its path."""
        from fedrep.plotting import plot_run

        return plot_run(self.path, out)

    def model_for(self, client: int, round: int | None = None) -> torch.nn.Module:
        """Client ``client``'s personalised model (the body of ``round``, default the last, and
        the client's own head of that round), in eval mode."""
        from fedrep.export import client_model

        model, _ = client_model(self.path, client, round)
        return model.eval()

    def export(self, client: int, out: str | Path, round: int | None = None,
               torchscript: bool = False) -> Path:
        """Write client ``client``'s model as one self-contained file (:func:`load_model`)."""
        from fedrep.export import export_client

        return export_client(self.path, client, round, out=Path(out), torchscript=torchscript)

    def evaluate(self, client: int, round: int | None = None) -> dict[str, float]:
        """Re-evaluate a client on its local test split (equals what the run reported)."""
        from fedrep.export import evaluate_client

        return evaluate_client(self.path, client, round)

    def personalize(self, data: str | Path | int, out: str | Path, epochs: int | None = None) -> Path:
        """Onboard a new client: a head trained on this run's final body from ``data`` (an .npz
        with x_train/y_train, or a partition id of the run's data set), exported to ``out``."""
        from fedrep.export import personalize

        return personalize(self.path, data, epochs, Path(out))


def open_run(run_dir: str | Path) -> Run:
    """A :class:`Run` for an existing run folder."""
    return Run.open(run_dir)


def load_model(path: str | Path) -> torch.nn.Module:
    """An exported model file (``fedrep export``, :meth:`Run.export`) as a ready model."""
    from fedrep.export import load_exported

    model, _ = load_exported(Path(path))
    return model.eval()
