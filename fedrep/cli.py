"""``fedrep``: run, resume and plot federated runs; list strategy plugins.

Precedence of configuration, lowest to highest: built-in defaults (== ``[tool.flwr.app.config]``),
``--config FILE``, the named flags, ``--set key=value``. Everything is validated before anything
starts, and a bad key or value exits with status 2 and a message naming it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedrep import __version__
from fedrep.api import RunFailed, flwr_command
from fedrep.config import (
    ConfigError,
    RunConfig,
    load_experiment_file,
    parse_override,
)
from fedrep.interrupts import Terminated, stop_on_sigterm

FLAG_KEYS = {
    "strategy": "strategy",
    "num_clients": "num-clients",
    "classes_per_client": "classes-per-client",
    "rounds": "num-rounds",
    "seed": "seed",
    "out": "out-dir",
    "dataset": "dataset",
    "model": "model",
    "partition": "partition",
    "partition_file": "partition-file",
    "data_dir": "data-dir",
}


def prefer_installed_packages() -> None:
    """Import the app's own packages (``fedrep``, ``server``, ``clients``) from where fedrep is
    installed, never from the working directory: ``python -m`` puts the working directory first
    on ``sys.path``, and a ``clients.py`` or ``clients/`` there would replace the ClientApp package
    (in this process, and in the Ray workers, which inherit this ``sys.path``). The working
    directory stays on the path, after the install, for ``--client-app`` modules of one's own."""
    import fedrep

    root = str(Path(fedrep.__file__).resolve().parent.parent)
    cwd = os.getcwd()
    rest = [p for p in sys.path if p not in ("", cwd, root)]
    sys.path[:] = [root, *rest, cwd]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a federated experiment")
    run.add_argument("--config", help="experiment file (flat TOML, run-config keys)")
    run.add_argument("--strategy", help="strategy plugin name (see `fedrep strategies`)")
    run.add_argument("--num-clients", type=int, help="number of clients n")
    run.add_argument("--classes-per-client", type=int, help="s for the pathological split")
    run.add_argument("--rounds", type=int, help="communication rounds")
    run.add_argument("--seed", type=int, help="run seed")
    run.add_argument("--out", help="parent folder for the run folder (default: runs)")
    run.add_argument("--dataset", help="fashion-mnist | cifar10 | cifar100 | femnist | sent140 | pfllib | "
                     "linear-synthetic | fmnist-domains | digit-five (docs/data.md)")
    run.add_argument("--model", help="default: the official one for the data set (see `fedrep config`)")
    run.add_argument("--partition", help="pathological | dirichlet | iid | natural | file")
    run.add_argument("--partition-file", metavar="PATH",
                     help="partition = file: a fedrep JSON of index lists (`fedrep config "
                     "--partition-schema`) or a PFLlib folder (with --dataset pfllib)")
    run.add_argument("--data-dir", metavar="DIR", help="where the data set's files are (docs/data.md)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any run-config key, e.g. --set head-epochs=5 (repeatable)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    run.add_argument("--from-round", type=int, metavar="N",
                     help="with --resume: continue from round N's checkpoint, dropping later rounds "
                          "(e.g. when the newest checkpoint is damaged)")
    run.add_argument("--onboard", action="store_true",
                     help="with --resume on a finished run: train no round; every client that never "
                          "trained in it gets a head on the final body and keeps it (onboarded.jsonl)")
    run.add_argument("--restart-damaged-heads", action="store_true",
                     help="a client whose head file cannot be read starts from a fresh head (an "
                          "event in events.jsonl) instead of stopping the run; sets "
                          "on-damaged-head=restart")
    run.add_argument("--engine", choices=("simulation", "flwr"), default="simulation",
                     help="'simulation': Flower's Simulation Runtime in this process (default); "
                          "'flwr': drive `flwr run` against a local SuperLink")
    run.add_argument("--app", default=".", help="Flower app folder for --engine flwr")
    run.add_argument("--superlink", metavar="CONNECTION",
                     help="with --engine flwr: submit to this deployed SuperLink (a connection in "
                          "$FLWR_HOME/config.toml, see deploy/README.md) instead of a local one")
    run.add_argument("--client-app", default=None, metavar="MODULE:ATTR",
                     help="simulation only: a different ClientApp object (default clients.app:app), "
                          "e.g. bench.stock_clientapp:app, the per-call-rebuild reference of bench/")
    run.add_argument("-v", "--verbose", action="store_true", help="Flower debug logs")

    plot = sub.add_parser("plot", help="(re)draw a run's plot")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/plot.png)")

    comp = sub.add_parser("compare", help="run several strategies on identical splits; one table")
    comp.add_argument("config", help="comparison file (TOML: strategies, [config], [overrides.*])")
    comp.add_argument("--out", help="output folder (default runs/compare-<file name>)")
    comp.add_argument("--only", help="comma-separated subset of the file's strategies to run now; "
                      "the table still lists every finished one")
    comp.add_argument("--seeds", metavar="S1,S2,...",
                      help="run every strategy on every seed (OUT/seed-<s>/) and report mean ± std "
                      "over seeds with the paired per-client differences")
    comp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a run-config key for every strategy, over the file's, e.g. --set seed=2 "
                      "(repeatable; use another --out)")

    export = sub.add_parser("export", help="write a client's personalised model as one file")
    export.add_argument("run_dir")
    who = export.add_mutually_exclusive_group(required=True)
    who.add_argument("--client", type=int, metavar="K", help="the client (partition id)")
    who.add_argument("--all", action="store_true", help="every client that has a model")
    export.add_argument("--round", type=int, metavar="R", help="default: the last completed round")
    export.add_argument("--out", help="file (--client) or folder (--all); default RUN_DIR/exports")
    export.add_argument("--torchscript", action="store_true",
                        help="also write FILE.torchscript.pt (torch.jit.load, no fedrep needed)")

    predict = sub.add_parser("predict", help="class predictions of an exported model")
    predict.add_argument("model_file")
    predict.add_argument("--input", nargs="+", required=True, metavar="FILE",
                         help=".npy arrays (model inputs) and/or image files (converted as the run's data)")
    predict.add_argument("--out", help="write the predictions as .npy (or .csv) instead of printing them")

    evaluate = sub.add_parser("evaluate", help="re-evaluate a client on its local test split")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--client", type=int, required=True, metavar="K")
    evaluate.add_argument("--round", type=int, metavar="R", help="default: the last completed round")

    personal = sub.add_parser("personalize", help="onboard a new client: a head on the run's final "
                              "body from its data (FedAvg-style runs: fine-tune), exported")
    personal.add_argument("run_dir")
    personal.add_argument("--data", required=True, metavar="FILE_OR_PARTITION",
                          help=".npz with x_train, y_train (and optionally x_test, y_test), or a "
                               "partition id of the run's data set")
    personal.add_argument("--epochs", type=int, help="default: the run's new-client-epochs")
    personal.add_argument("--round", type=int, metavar="R", help="the body of round R (default: the last)")
    personal.add_argument("--out", help="model file (default RUN_DIR/exports/...)")
    personal.add_argument("--torchscript", action="store_true", help="also write a TorchScript copy")

    track = sub.add_parser("track", help="mirror a run folder's metrics to TensorBoard / MLflow")
    track.add_argument("run_dir")
    track.add_argument("--tracking", default="tensorboard",
                       help="tensorboard, mlflow or both comma-separated (default tensorboard)")

    sub.add_parser("strategies", help="list installed strategy plugins")
    conf = sub.add_parser("config", help="list every run-config key with its default and meaning")
    conf.add_argument("--partition-schema", action="store_true",
                      help="print the schema of a partition-file (partition = \"file\") instead")
    return parser


def resolve_run_config(args: argparse.Namespace, local: bool = True) -> RunConfig:
    """Merge defaults, file, flags and --set into one validated config with run-dir decided
    (:func:`fedrep.api.settle_config`)."""
    from fedrep.api import settle_config

    values: dict[str, Any] = {}
    if args.config:
        values.update(load_experiment_file(args.config))
    for attr, key in FLAG_KEYS.items():
        if getattr(args, attr, None) is not None:
            values[key] = getattr(args, attr)
    for item in args.set:
        key, value = parse_override(item)
        values[key] = value
    if getattr(args, "restart_damaged_heads", False):
        values["on-damaged-head"] = "restart"
    if getattr(args, "onboard", False):
        values["onboard"] = True
    if args.resume and not local:
        # A deployment's run folder is on the ServerApp's host: the ServerApp opens it, and refuses
        # settings other than the run's (so give the run's settings again, as first submitted).
        values.update({"resume": True, "run-dir": str(args.resume)})
        return settle_config(values, local=False)
    return settle_config(values, resume=args.resume, local=local)


def _flwr_submit(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Run on a deployment: submit, stream the run's log, and report how the SuperLink says it
    ended (``flwr run --stream`` exits 0 even when the ServerApp fails)."""
    app, connection = args.app, args.superlink
    import json

    flwr, overrides = flwr_command(cfg)
    submitted = subprocess.run([flwr, "run", app, connection, "--format", "json", *overrides],
                               capture_output=True, text=True, check=False)
    try:
        run_id = str(json.loads(submitted.stdout[submitted.stdout.index("{"):])["run-id"])
    except (ValueError, KeyError):
        raise RunFailed(f"`flwr run {app} {connection}` did not start a run:\n"
                        f"{(submitted.stdout + submitted.stderr).strip()[-2000:]}") from None
    print(f"[fedrep] run {run_id} submitted to {connection}; results go to {cfg.run_dir} on the "
          "ServerApp's host (Ctrl-C stops watching; the run goes on)", file=sys.stderr, flush=True)
    args.interrupt_hint = (f"stopped watching; run {run_id} goes on (`flwr log {run_id} {connection} "
                           f"--stream` to watch again, `flwr stop {run_id} {connection}` to stop it)")
    # A SuperLink restart (its state on a volume) does not end the run: the ServerApp and the
    # SuperNodes reconnect and go on, but the log stream breaks. Watch again while the SuperLink
    # says the run is not finished, and wait out an unreachable SuperLink for a while.
    unreachable_since: float | None = None
    while True:
        subprocess.run([flwr, "log", run_id, connection, "--stream"], check=False)
        status, details = _flwr_status(flwr, connection, run_id)
        if status.startswith("finished"):
            break
        if status == "unknown":
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > SUPERLINK_GRACE_S:
                raise RunFailed(f"the SuperLink behind {connection} has been unreachable for "
                                f"{SUPERLINK_GRACE_S:.0f}s; run {run_id} may still go on when it is back "
                                f"(`flwr ls {connection} --run-id {run_id}`); if it ended unfinished, "
                                f"continue it with `fedrep run --resume RUN_DIR --engine flwr --superlink "
                                f"{connection}` (deploy/README.md, 'A lost SuperLink')")
            print(f"[fedrep] lost the SuperLink behind {connection}; waiting for it (run {run_id} is "
                  "kept in its database)", file=sys.stderr, flush=True)
            time.sleep(10)
            continue
        unreachable_since = None
        print(f"[fedrep] the log stream ended while run {run_id} is {status}; watching again (the log "
              "starts over)", file=sys.stderr, flush=True)
        time.sleep(2)
    if status != "finished:completed":
        raise RunFailed(f"run {run_id} on {connection} ended {status}: {details}. Every completed round "
                        f"is kept in {cfg.run_dir} on the ServerApp's host; continue from the last one with "
                        f"this command plus `--resume {cfg.run_dir}`")


SUPERLINK_GRACE_S = 600.0


def _flwr_status(flwr: str, connection: str, run_id: str) -> tuple[str, str]:
    """The SuperLink's status of a run ("unknown" while it cannot be reached). The log stream can
    end a moment before the status is final, so a running status is asked again for a while."""
    import json

    status, details = "unknown", ""
    for _ in range(15):
        listed = subprocess.run([flwr, "ls", connection, "--run-id", run_id, "--format", "json"],
                                capture_output=True, text=True, check=False)
        try:
            row = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"][0]
            status, details = row["status"], row.get("status-details", "")
        except (ValueError, KeyError, IndexError):
            status = "unknown"
        if status.startswith("finished"):
            break
        time.sleep(2)
    return status, details


def cmd_run(args: argparse.Namespace) -> int:
    if args.superlink:
        if args.engine != "flwr":
            raise ConfigError("--superlink needs --engine flwr (the simulation runs in this process)")
        cfg = resolve_run_config(args, local=False)
        from fedrep.registry import get_strategy

        get_strategy(cfg.strategy)  # the data lives on the nodes; they check it when queried
        _flwr_submit(cfg, args)
        print(f"results: {cfg.run_dir} on the ServerApp's host (compose: the fedrep-results volume)")
        return 0
    if args.client_app and args.engine != "simulation":
        raise ConfigError("--client-app works with --engine simulation; a deployment's ClientApp is "
                          "the app folder's [tool.flwr.app.components] clientapp")
    if args.from_round is not None and not args.resume:
        raise ConfigError("--from-round needs --resume RUN_DIR")
    if args.client_app:
        from fedrep.simulation import check_component

        check_component(args.client_app)
    cfg = resolve_run_config(args)
    from fedrep.api import execute

    args.interrupt_hint = f"continue with `fedrep run --resume {cfg.run_dir}`"
    if not execute(cfg, args.engine, args.verbose, args.app, args.client_app, args.from_round):
        print(f"results: {cfg.run_dir}")
        return 0
    print(f"results: {cfg.run_dir}")
    for name in ("metrics.csv", "metrics.jsonl", "plot.png", "checkpoints/"):
        print(f"  {Path(cfg.run_dir) / name}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fedrep.plotting import plot_run
    from fedrep.results import RunDir

    RunDir.open(args.run_dir)
    out = None
    if args.out:
        out = Path(args.out) / "plot.png" if Path(args.out).is_dir() else Path(args.out)
        _check_image_path(out)
    print(plot_run(args.run_dir, out))
    return 0


def _check_image_path(out: Path) -> None:
    """matplotlib picks the format from the suffix; fail before plotting, not in savefig."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = out.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ConfigError(f"--out {out}: {'.' + suffix if suffix else 'no suffix'} is not an image "
                          f"format matplotlib writes; end the name in one of "
                          f"{', '.join('.' + f for f in sorted(formats))}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create {out.parent} ({err.strerror})") from None


def cmd_strategies(_: argparse.Namespace) -> int:
    from fedrep.registry import describe

    rows = describe()
    if not rows:
        print("no strategy plugins installed (entry-point group 'fedrep.strategies')")
        return 1
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  [{row['package']}: {row['target']}]")
        print(f"{'':<{width}}  {row['description']}")
        if row.get("config-keys"):
            print(f"{'':<{width}}  config keys: {row['config-keys']}")
        if row["options"]:
            print(f"{'':<{width}}  strategy-options (TOML inline table: --set "
                  f"'strategy-options={{{row['options'][0][0]}}}'):")
            for assignment, description in row["options"]:
                print(f"{'':<{width}}    {assignment}" + (f"  # {description}" if description else ""))
    _print_shared_part_options()
    return 0


def _print_shared_part_options() -> None:
    """The keys every strategy with an averaged shared part takes (all but local and kd3a):
    robust aggregation, attacks and differential privacy, each with its source."""
    from fedrep.algorithms.privacy_keys import PrivacyKeys
    from fedrep.algorithms.robust_keys import RobustKeys

    print("\nFor every strategy that averages a shared part (not local, not kd3a), these keys "
          "(`fedrep config` has them all):")
    for section in (RobustKeys, PrivacyKeys):
        for name, field in section.model_fields.items():
            print(f"  {field.alias or name} = {field.default!r}: {field.description}")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give whole numbers separated by commas, e.g. --seeds 1,2,3"
                          ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {text!r}: give distinct seeds >= 0, e.g. --seeds 1,2,3")
    return seeds


def cmd_compare(args: argparse.Namespace) -> int:
    from fedrep.compare import compare, compare_seeds

    path = Path(args.config)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{path.stem}"
    settings = dict(parse_override(item) for item in args.set)
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    args.interrupt_hint = f"rerun `fedrep compare {args.config}` with the same options to continue"
    if args.seeds:
        if "seed" in settings:
            raise ConfigError("--seeds and --set seed=... together: give the seeds with --seeds only")
        table = compare_seeds(path, out, _seed_list(args.seeds), only, settings)
    else:
        table = compare(path, out, only, settings)
    print(table.read_text())
    print(f"results: {out.resolve()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedrep import export

    if args.all:
        summary = export.export_all(args.run_dir, args.out or Path(args.run_dir) / "exports", args.round,
                                    args.torchscript)
        for client, reason in sorted(summary.skipped.items()):
            print(f"[fedrep] skipped client {client}: {reason}", file=sys.stderr)
        print(f"exported {len(summary.written)} clients of round {summary.round}: "
              f"{Path(next(iter(summary.written.values()))).parent}")
        return 0
    path = export.export_client(args.run_dir, args.client, args.round, out=args.out,
                                torchscript=args.torchscript)
    print(f"exported: {path}" + (f" (+ {export.torchscript_path(path)})" if args.torchscript else ""))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from fedrep import export

    model, meta = export.load_exported(args.model_file)
    predictions = export.predict(model, export.read_inputs(args.input, meta), meta)
    if args.out:
        out = Path(args.out)
        if out.suffix == ".csv":
            np.savetxt(out, predictions, fmt="%d" if predictions.dtype.kind in "iu" else "%.6g",
                       delimiter=",")
        else:
            np.save(out, predictions)
        print(f"{len(predictions)} predictions: {out}")
    else:
        print("\n".join(str(p) for p in predictions.tolist()))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedrep.export import evaluate_client

    result = evaluate_client(args.run_dir, args.client, args.round)
    print(json.dumps(result, indent=2))
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    from fedrep.export import personalize

    data: str | int = int(args.data) if args.data.strip().isdigit() else args.data
    path = personalize(args.run_dir, data, args.epochs, args.out, round=args.round,
                       torchscript=args.torchscript)
    print(f"exported: {path}")
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    from fedrep.tracking import replay

    rows = replay(args.run_dir, args.tracking)
    print(f"mirrored {rows} rounds of {args.run_dir} to {args.tracking}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from fedrep.config import RunConfig

    if getattr(args, "partition_schema", False):
        from fedrep.data.partition_file import PARTITION_FILE_SCHEMA

        print(PARTITION_FILE_SCHEMA)
        return 0

    defaults = RunConfig().to_flower()
    width = max(len(k) for k in defaults)
    for name, field in RunConfig.model_fields.items():
        key = name.replace("_", "-")
        print(f"{key:<{width}}  = {defaults[key]!r:<16} {field.description or ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    prefer_installed_packages()
    stop_on_sigterm()
    args = _parser().parse_args(argv)
    try:
        code = _dispatch(args)
        _release_run_locks()
        return code
    except KeyboardInterrupt as stop:  # outermost: Ctrl-C while torch is still importing is covered too
        hint = getattr(args, "interrupt_hint", "nothing was started")  # set as a command gets going
        how, code = ("terminated (SIGTERM)", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        print(f"fedrep: {how}; {hint}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        _release_run_locks()
        # Flower's client threads may still wait on Ray actors that are gone; the interpreter
        # would join them at exit and hang. Everything worth keeping is already on disk.
        os._exit(code)


def _release_run_locks() -> None:
    """Release the run folders this process holds, so that the next run does not report taking
    over a lock (the kernel would drop them at exit anyway)."""
    runlock = sys.modules.get("fedrep.runlock")
    if runlock is not None:
        runlock.release_all()


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; expected failures become one line and an exit code."""
    handlers = {"run": cmd_run, "plot": cmd_plot, "strategies": cmd_strategies,
                "config": cmd_config, "compare": cmd_compare, "export": cmd_export,
                "predict": cmd_predict, "evaluate": cmd_evaluate, "personalize": cmd_personalize,
                "track": cmd_track}
    from fedrep.data.store import DataError
    from fedrep.registry import PluginError

    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, PluginError) as err:
        print(f"fedrep: error: {err}", file=sys.stderr)
        return 2
    except (RunFailed, RuntimeError, FloatingPointError) as err:  # started, did not complete
        if getattr(args, "verbose", False):
            traceback.print_exc()
        more = " (add -v for the traceback)" if hasattr(args, "verbose") else ""
        print(f"fedrep: run failed: {err}{more}", file=sys.stderr)
        if err.__cause__ is not None:
            print(f"  caused by: {type(err.__cause__).__name__}: {err.__cause__}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `fedrep config | head`
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except OSError as err:  # a file the command had to read or write
        where = f": {err.filename}" if err.filename else ""
        hint = getattr(args, "interrupt_hint", None)
        then = f"; fix that (e.g. free space), then {hint}" if hint else ""
        print(f"fedrep: error: {err.strerror or err}{where}{then}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
