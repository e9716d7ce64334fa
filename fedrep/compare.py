"""``fedrep compare``: several strategies on identical partitions and seeds, one table, one plot.

A comparison file is TOML::

    strategies = ["fedrep", "fedper", "fedavg"]   # or "label=strategy" to run one strategy twice
    [config]                 # run-config keys shared by every run (same data split and seed)
    num-rounds = 100
    [overrides.fedavg]       # optional, per strategy
    local-epochs = 1

An optional ``[sweep]`` names one run-config key and its values (``target-domain = ["original",
"inverted"]`` for leave-one-domain-out): every strategy runs once per value, into
``OUT/<value>/<strategy>/``, each value gets its own table, and ``OUT/results.md`` pivots the
headline metric (target accuracy where there is one) to strategies x values, with the mean.

Each strategy runs as its own ``fedrep run`` (own process, own Ray) into ``OUT/<strategy>/``.
Finished runs are skipped and interrupted ones resumed, so re-running the command after a crash
continues where it stopped; raising ``num-rounds`` extends finished runs, and lowering it, or
any other change of setup, is refused rather than mixed into the table. The table (``results.md`` and
``results.csv``) and ``accuracy.png`` go to ``OUT``. Because every strategy sees the same clients
and test images, ``results.md`` also pairs them client by client against the file's first
strategy (mean difference ± standard error, wins and losses; ``paired.csv``): the table's ± is
the spread between clients, far too wide to tell two strategies apart.
"""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedrep.algorithms.aggregate import PAPER_METRIC
from fedrep.config import ConfigError, RunConfig, parse_run_config, read_toml
from fedrep.results import RunDir

# Run-config keys a comparison sets itself for every run.
COMPARE_OWNS = frozenset({"strategy", "run-dir", "resume", "out-dir"})


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategies: list[str] = Field(
        min_length=1, description="Strategy plugin names to run; 'label=strategy' names a variant "
        "(e.g. 'no-focus=kd3a' with its strategy-options under [overrides.no-focus]).")
    config: dict[str, Any] = Field(default_factory=dict, description="Shared run-config keys.")
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                 description="Per-strategy run-config keys.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict, description="At most one run-config key with the values to run every "
        "strategy at, e.g. target-domain = [\"original\", \"inverted\"].")

    @field_validator("sweep")
    @classmethod
    def _one_key(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if len(sweep) > 1:
            raise ValueError(f"sweep names {sorted(sweep)}; sweep one key per file")
        for key, values in sweep.items():
            if not values or len(set(map(str, values))) != len(values):
                raise ValueError(f"sweep {key} = {values}: give distinct values")
        return sweep

    @field_validator("strategies")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"strategies {names} list one name twice")
        return names


def _check_folder_name(name: str, what: str) -> None:
    """Labels and swept values name the run folders under --out; they must stay there."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise ConfigError(f"{what} {name!r} names a run folder under --out; use letters, digits "
                          "and _.+- (no slashes, not empty, not starting with a dot)")


def load_comparison(path: Path, sweep_value: Any = None, settings: dict[str, Any] | None = None
                    ) -> tuple[CompareConfig, dict[str, RunConfig]]:
    """Parse the file and validate every strategy's full run config before anything runs
    (at ``sweep_value`` of the sweep key, if the file sweeps one). ``settings`` (the command
    line's ``--set``) override the file for every strategy: the same comparison at another seed
    is ``--set seed=2`` into another ``--out``."""
    data = read_toml(path, "comparison file")
    try:
        spec = CompareConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors())
        raise ConfigError(f"comparison file {path}: {problems}") from None
    sources = [("[config]", spec.config), ("[sweep]", spec.sweep), ("--set", settings or {}),
               *((f"[overrides.{k}]", v) for k, v in spec.overrides.items())]
    for where, keys in sources:
        owned = sorted(set(keys) & COMPARE_OWNS)
        if owned:  # the comparison decides these; a silently ignored key misleads
            raise ConfigError(f"comparison file {path}: {where} sets {owned}; the comparison decides "
                              "them (list strategies in `strategies = [...]`, choose the folder "
                              "with --out)")
    labels = [name.partition("=")[0] for name in spec.strategies]
    for label in labels:
        _check_folder_name(label, f"comparison file {path}: strategy label")
    for key, values in spec.sweep.items():
        for value in values:
            _check_folder_name(str(value), f"comparison file {path}: [sweep] {key} value")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"comparison file {path}: strategies {spec.strategies} use one label twice")
    unknown = set(spec.overrides) - set(labels)
    if unknown:
        raise ConfigError(f"comparison file {path}: overrides for {sorted(unknown)}, which are not "
                          f"in strategies {labels}")
    swept = {}
    for key, values in spec.sweep.items():
        swept = {key: values[0] if sweep_value is None else sweep_value}
    configs = {}  # label -> config, in file order
    for name in spec.strategies:
        label, _, strategy = name.partition("=")
        values = {**spec.config, **swept, **spec.overrides.get(label, {}), **(settings or {}),
                  "strategy": strategy or label}
        where = f"{path} (strategy {name}" + "".join(f", {k} = {v!r}" for k, v in swept.items()) + \
            "".join(f", --set {k}={v!r}" for k, v in (settings or {}).items()) + ")"
        configs[label] = parse_run_config(values, where)
    return spec, configs


def _run_one(cfg: RunConfig, run_dir: Path) -> float:
    """Run (or resume) one strategy; seconds it took in this invocation."""
    from fedrep.config import toml_value

    started = time.perf_counter()
    if (run_dir / "state.json").is_file():
        _refuse_diverged(RunDir(run_dir))
        _check_same_setup(cfg, RunDir(run_dir))
    if _completed(run_dir) and RunDir(run_dir).saved_config().num_rounds >= cfg.num_rounds:
        return 0.0
    if (run_dir / "state.json").is_file():  # interrupted, or asked for more rounds: continue it
        cmd = ["run", "--resume", str(run_dir), "--rounds", str(cfg.num_rounds)]
    else:
        cmd = ["run"]
        for key, value in cfg.to_flower().items():
            if key not in ("run-dir", "resume"):
                cmd += ["--set", f"{key}={toml_value(value)}"]
        cmd += ["--set", f"run-dir={toml_value(str(run_dir))}"]
    proc = subprocess.run([sys.executable, "-m", "fedrep.cli", *cmd], check=False)
    if proc.returncode != 0:
        if (run_dir / "state.json").is_file():
            _refuse_diverged(RunDir(run_dir))
        raise StrategyFailed(f"{run_dir.name} failed (exit {proc.returncode}; {run_dir}); rerun the "
                             "same `fedrep compare` to resume it")
    return time.perf_counter() - started


class StrategyFailed(RuntimeError):
    """One strategy of a comparison did not finish; the others still run."""


def _refuse_diverged(run: RunDir) -> None:
    diverged = run.divergence()
    if diverged is not None:
        raise StrategyFailed(f"{run.path.name} diverged ({diverged}); change its settings and pass "
                             f"another --out, or delete {run.path}")


def _check_same_setup(cfg: RunConfig, run: RunDir) -> None:
    """A run folder left by another setup (the file was edited, or ``--set`` differs) must not be
    skipped or resumed as if it were this one: the table would mix two experiments."""
    try:
        run.check_resumable_with(cfg)
    except ConfigError as err:
        raise ConfigError(f"{cfg.strategy}: {err}. The comparison's setup changed since that "
                          "folder was run; pass another --out (or delete the folder)") from None


def summarize_run(name: str, run: RunDir) -> dict[str, Any]:
    rows = run.read_metrics()
    cfg = run.saved_config()
    final = next((r for r in reversed(rows) if "accuracy-mean" in r or "loss-mean" in r), {})
    trained = [r for r in rows if r.get("bytes-sent") is not None]
    sent = sum(r.get("bytes-sent", 0) for r in rows)
    received = sum(r.get("bytes-received", 0) for r in rows)
    out = {
        "strategy": name,
        "rounds": len(rows),
        "accuracy-mean": final.get("accuracy-mean"),
        "accuracy-std": final.get("accuracy-std"),
        "accuracy-finetuned-mean": final.get("accuracy-finetuned-mean"),
        PAPER_METRIC: final.get(PAPER_METRIC),
        "new-clients-accuracy": final.get("new-clients-accuracy-finetuned-mean"),
        "loss-mean": final.get("loss-mean"),
        "wall-seconds": sum(r.get("round-seconds", 0.0) for r in rows),
        "bytes-per-client": (sent + received) / cfg.num_clients,
        "bytes-per-round": (sent + received) / max(len(trained), 1),
    }
    if "representation-distance" in final:
        out["representation-distance"] = final["representation-distance"]
    if "target-accuracy" in final:  # domain adaptation: the target is what counts
        out["target-accuracy"] = final["target-accuracy"]
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| strategy | final mean local acc. ± std | after head fine-tune | paper's metric | rounds | "
             "wall time (s) | bytes per client |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{_fmt(r['accuracy-mean'])} ± {_fmt(r['accuracy-std'])}"
               if r.get("accuracy-mean") is not None else f"loss {_fmt(r.get('loss-mean'))}")
        if "representation-distance" in r:
            acc += f" (dist {r['representation-distance']:.2e})"
        if r.get("target-accuracy") is not None:
            acc = f"target {_fmt(r['target-accuracy'])} (all parties {acc})"
        lines.append(f"| {r['strategy']} | {acc} | {_fmt(r.get('accuracy-finetuned-mean'))} | "
                     f"{_fmt(r.get(PAPER_METRIC))} | {r['rounds']} | {_fmt(r['wall-seconds'], 1)} | "
                     f"{_bytes(r['bytes-per-client'])} |")
    lines.append("\nPaper's metric: test-size-weighted mean local accuracy averaged over the last 10 "
                 "rounds (official main_fedrep.py `accs10`; before the final head fine-tune).")
    new = [r for r in rows if r.get("new-clients-accuracy") is not None]
    if new:
        lines.append("\nNew clients (held out of training, then trained from the final model): "
                     + ", ".join(f"{r['strategy']} {_fmt(r['new-clients-accuracy'])}" for r in new) + ".")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def final_client_metrics(run: RunDir, new: bool = False) -> dict[int, dict[str, float]]:
    """Each client's evaluation metrics at the run's last evaluation round, by partition: the
    federation's clients, or (``new=True``) the held-out new clients (``new-clients``), whose
    last-round replies are their generalisation results.

    All strategies of a comparison share partitions and each client's test set, so these are
    paired samples: comparing them client by client removes the between-client spread that
    dominates the table's ± (the std of clients' accuracies, not an error bar).
    """
    from fedrep.algorithms.sampling import new_clients

    try:
        cfg = run.saved_config()
        held_out = new_clients(cfg.num_clients, cfg.new_clients, cfg.seed)
    except (ConfigError, OSError):  # a folder without its config: no new clients to tell apart
        held_out = frozenset()
    evaluations = [r for r in run.read_audit() if r["kind"] == "evaluate" and not r.get("error")
                   and (int(r["partition"]) in held_out) == new]
    if not evaluations:
        return {}
    last = max(r["round"] for r in evaluations)
    return {int(r["partition"]): r["metrics"] for r in evaluations if r["round"] == last}


PAIRED_METRICS = ("accuracy", "accuracy-finetuned")


def paired_differences(clients: dict[str, dict[int, dict[str, float]]], reference: str
                       ) -> list[dict[str, Any]]:
    """Per-client ``reference - other`` for each other strategy and each accuracy metric both
    report: mean, standard error of that mean, and how many clients each side wins."""
    rows: list[dict[str, Any]] = []
    ref = clients[reference]
    for name, other in clients.items():
        if name == reference:
            continue
        for metric in PAIRED_METRICS:
            shared = sorted(p for p in ref.keys() & other.keys()
                            if metric in ref[p] and metric in other[p])
            if len(shared) < 2:
                continue
            diffs = [ref[p][metric] - other[p][metric] for p in shared]
            mean = sum(diffs) / len(diffs)
            var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
            rows.append({"reference": reference, "strategy": name, "metric": metric,
                         "clients": len(diffs), "mean-difference": mean,
                         "standard-error": math.sqrt(var / len(diffs)),
                         "reference-better": sum(d > 0 for d in diffs),
                         "ties": sum(d == 0 for d in diffs),
                         "reference-worse": sum(d < 0 for d in diffs)})
    return rows


def paired_table(rows: list[dict[str, Any]]) -> str:
    """Markdown for :func:`paired_differences`, a row per strategy (empty when nothing pairs)."""
    if not rows:
        return ""
    ref = rows[0]["reference"]
    by_strategy: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_strategy.setdefault(r["strategy"], {})[r["metric"]] = r

    def cell(r: dict[str, Any] | None) -> str:
        return "-" if r is None else f"{r['mean-difference']:+.4f} ± {r['standard-error']:.4f}"

    lines = [f"Per client, {ref} minus each strategy at the last evaluation (same clients and test "
             "images; mean ± standard error of the mean):", "",
             f"| {ref} minus | mean local acc. | after head fine-tune | clients | "
             f"{ref} better / tie / worse (acc.) |", "|---|---|---|---|---|"]
    for name, metrics in by_strategy.items():
        first = metrics.get("accuracy") or metrics["accuracy-finetuned"]
        lines.append(f"| {name} | {cell(metrics.get('accuracy'))} | "
                     f"{cell(metrics.get('accuracy-finetuned'))} | {first['clients']} | "
                     f"{first['reference-better']} / {first['ties']} / {first['reference-worse']} |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs: dict[str, RunDir], out: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it was

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    metric = "accuracy-mean"
    for name, run in runs.items():
        rows = run.read_metrics()
        if any("target-accuracy" in r for r in rows):
            metric = "target-accuracy"
        elif not any(metric in r for r in rows):
            metric = "representation-distance"
        pts = [(r["round"], r[metric]) for r in rows if metric in r]
        ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 30 else None, label=name)
    if metric == "representation-distance":
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel({"accuracy-mean": "mean local accuracy", "target-accuracy": "target accuracy"}.get(
        metric, "distance to B*"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / ("distance.png" if metric == "representation-distance" else "accuracy.png")
    fig.savefig(path, dpi=110)
    return path


def compare(path: Path, out: Path, only: list[str] | None = None,
            settings: dict[str, Any] | None = None) -> Path:
    """Run the file's strategies (or just ``only``) and tabulate every finished one.

    ``only`` lets a long comparison be spread over several sessions or machines; the table always
    covers each strategy of the file whose run folder under ``out`` has completed.
    """
    spec, configs = load_comparison(path, settings=settings)
    if only:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise ConfigError(f"--only {unknown}: not in the strategies of {path} ({list(configs)})")
    failed: list[str] = []  # a failed strategy does not stop the others; reported at the end
    if not spec.sweep:
        _compare_at(configs, out, only, failed)
    else:
        ((key, values),) = spec.sweep.items()
        tables = {}
        for value in values:
            _, configs = load_comparison(path, value, settings)
            print(f"[fedrep compare] {key} = {value}", file=sys.stderr, flush=True)
            tables[str(value)] = _compare_at(configs, out / str(value), only, failed)
        write_sweep_table(key, list(configs), tables, out)
    if failed:
        raise StrategyFailed(f"{len(failed)} run{'s' if len(failed) > 1 else ''} did not finish (the "
                             f"tables in {out} have the others): " + "; ".join(failed))
    return out / "results.md"


def headline(row: dict[str, Any]) -> float | None:
    """The number a sweep table shows: target accuracy where there is one, else mean accuracy."""
    value = row.get("target-accuracy", row.get("accuracy-mean"))
    return None if value is None else float(value)


def write_sweep_table(key: str, labels: list[str], tables: dict[str, dict[str, dict[str, Any]]],
                      out: Path) -> None:
    """Strategies x swept values of the headline metric, the mean over values run for every
    strategy, and bytes per round (``OUT/results.md`` and ``OUT/results.csv``)."""
    values = list(tables)
    metric = "target accuracy" if any("target-accuracy" in r for t in tables.values()
                                      for r in t.values()) else "mean local accuracy"
    header = f"| strategy ({metric}) | " + " | ".join(f"{key} = {v}" for v in values) + \
        " | mean | bytes per round |"
    lines = [header, "|---" * (len(values) + 3) + "|"]
    records = []
    for label in labels:
        cells = [headline(tables[v][label]) if label in tables[v] else None for v in values]
        done = [c for c in cells if c is not None]
        mean = sum(done) / len(done) if len(done) == len(values) else None
        per_round = [tables[v][label]["bytes-per-round"] for v in values if label in tables[v]]
        lines.append(f"| {label} | " + " | ".join(_fmt(c) for c in cells) + f" | {_fmt(mean)} | "
                     f"{_bytes(max(per_round)) if per_round else '-'} |")
        records.append({"strategy": label, **{f"{key}={v}": c for v, c in zip(values, cells, strict=True)},
                        "mean": mean})
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def _compare_at(configs: dict[str, RunConfig], out: Path, only: list[str] | None,
                failed: list[str]) -> dict[str, dict[str, Any]]:
    """Run (or resume) into ``out``, write its table and plot; the finished runs' summaries.
    A strategy that does not finish is appended to ``failed``; the others still run."""
    out.mkdir(parents=True, exist_ok=True)
    for name in configs:
        if only and name not in only:
            continue
        run_dir = (out / name).resolve()
        print(f"[fedrep compare] {name} -> {run_dir}", file=sys.stderr, flush=True)
        try:
            _run_one(configs[name], run_dir)
        except StrategyFailed as err:  # tabulate the others, then report
            print(f"[fedrep compare] {err}", file=sys.stderr, flush=True)
            failed.append(str(err))
    runs = {name: RunDir((out / name).resolve()) for name in configs
            if _completed(out / name)}
    for name, run in list(runs.items()):
        if not run.read_metrics(warn=False):
            print(f"[fedrep compare] warning: {name}: {run.metrics_file} holds no finished round; left "
                  "out of the table (delete the folder and rerun to redo it)", file=sys.stderr, flush=True)
            del runs[name]
    summaries = {n: summarize_run(n, r) for n, r in runs.items()}
    write_table(list(summaries.values()), out)
    if len(runs) > 1:  # the first finished strategy of the file is the reference
        clients = {n: final_client_metrics(r) for n, r in runs.items()}
        paired = paired_differences(clients, next(iter(runs)))
        newcomers = paired_differences({n: final_client_metrics(r, new=True) for n, r in runs.items()},
                                       next(iter(runs)))
        if paired:
            with (out / "results.md").open("a") as fh:
                fh.write("\n" + paired_table(paired))
                if newcomers:
                    fh.write("\nThe new clients (held out of training, then trained from the final "
                             "model), paired the same way:\n\n" + paired_table(newcomers))
            with (out / "paired.csv").open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(paired[0]))
                writer.writeheader()
                writer.writerows(paired)
    plot_comparison(runs, out)
    return summaries


def _completed(run_dir: Path) -> bool:
    return (run_dir / "state.json").is_file() and RunDir(run_dir).state()["status"] == "completed"


# --- several seeds ------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); Nones for none."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def compare_seeds(path: Path, out: Path, seeds: list[int], only: list[str] | None = None,
                  settings: dict[str, Any] | None = None) -> Path:
    """Every strategy of the file on every seed (``OUT/seed-<s>/<strategy>/``, each seed a normal,
    resumable comparison with its own table), then ``OUT/results.md``: per strategy the paper's
    metric and the final accuracies as mean ± std over seeds, and the per-seed paired client
    differences against the file's first strategy as mean ± std over seeds; ``OUT/accuracy.png``
    draws each strategy's mean curve with its spread over seeds."""
    spec, configs = load_comparison(path, settings={**(settings or {}), "seed": seeds[0]})
    if spec.sweep:
        raise ConfigError(f"{path}: --seeds and a [sweep] cannot be combined; run the sweep once per "
                          "seed with --set seed=S --out DIR instead")
    labels = list(configs)
    failed: list[str] = []
    for seed in seeds:
        _, configs = load_comparison(path, settings={**(settings or {}), "seed": seed})
        print(f"[fedrep compare] seed {seed}", file=sys.stderr, flush=True)
        _compare_at(configs, out / f"seed-{seed}", only, failed)
    runs = {(label, seed): RunDir((out / f"seed-{seed}" / label).resolve())
            for label in labels for seed in seeds if _completed(out / f"seed-{seed}" / label)}
    rows = seed_summary(labels, seeds, runs)
    write_seed_table(rows, seeds, out)
    plot_seeds(labels, seeds, runs, out)
    if failed:
        raise StrategyFailed(f"{len(failed)} run{'s' if len(failed) > 1 else ''} did not finish (the "
                             f"tables in {out} have the others): " + "; ".join(failed))
    return out / "results.md"


def seed_summary(labels: list[str], seeds: list[int], runs: dict[tuple[str, int], RunDir]
                 ) -> list[dict[str, Any]]:
    """One row per strategy: mean/std over its finished seeds of the paper's metric, the final
    mean local accuracy and the fine-tuned one, and of the per-seed paired difference (first
    strategy minus this one, client by client at the last evaluation)."""
    reference = labels[0]
    rows = []
    for label in labels:
        done = [s for s in seeds if (label, s) in runs]
        summaries = [summarize_run(label, runs[label, s]) for s in done]
        row: dict[str, Any] = {"strategy": label, "seeds": len(done)}
        for key in (PAPER_METRIC, "accuracy-mean", "accuracy-finetuned-mean"):
            values = [float(x[key]) for x in summaries if x.get(key) is not None]
            row[f"{key}-mean"], row[f"{key}-std"] = _mean_std(values)
        diffs, tuned, better, worse = [], [], 0, 0
        for s in done:
            if label == reference or (reference, s) not in runs:
                continue
            pair = paired_differences({reference: final_client_metrics(runs[reference, s]),
                                       label: final_client_metrics(runs[label, s])}, reference)
            acc = next((p for p in pair if p["metric"] == "accuracy"), None)
            if acc:
                diffs.append(acc["mean-difference"])
                better += acc["reference-better"]
                worse += acc["reference-worse"]
            tuned += [p["mean-difference"] for p in pair if p["metric"] == "accuracy-finetuned"]
        row["paired-difference-mean"], row["paired-difference-std"] = _mean_std(diffs)
        row["paired-finetuned-mean"], row["paired-finetuned-std"] = _mean_std(tuned)
        row["paired-seeds"], row["reference-better"], row["reference-worse"] = len(diffs), better, worse
        rows.append(row)
    return rows


def write_seed_table(rows: list[dict[str, Any]], seeds: list[int], out: Path) -> None:
    reference = rows[0]["strategy"]

    def pm(row: dict[str, Any], key: str) -> str:
        mean, std = row[f"{key}-mean"], row[f"{key}-std"]
        return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"

    lines = [f"Seeds {', '.join(map(str, seeds))}: mean ± std over the seeds each strategy finished.", "",
             f"| strategy | seeds | paper's metric | final mean local acc. | after head fine-tune | "
             f"{reference} minus this, per client (mean ± std over seeds) | the same after both fine-tune | "
             f"{reference} better / worse |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paired = ("-" if r["paired-difference-mean"] is None else
                  f"{r['paired-difference-mean']:+.4f} ± {r['paired-difference-std']:.4f} "
                  f"({r['paired-seeds']} seeds)")
        wins = "-" if r["strategy"] == reference or not r["paired-seeds"] else \
            f"{r['reference-better']} / {r['reference-worse']}"
        tuned = ("-" if r["paired-finetuned-mean"] is None else
                 f"{r['paired-finetuned-mean']:+.4f} ± {r['paired-finetuned-std']:.4f}")
        lines.append(f"| {r['strategy']} | {r['seeds']} | {pm(r, PAPER_METRIC)} | {pm(r, 'accuracy-mean')} | "
                     f"{pm(r, 'accuracy-finetuned-mean')} | {paired} | {tuned} | {wins} |")
    lines += ["", "Paper's metric: test-size-weighted mean local accuracy averaged over the last 10 rounds "
              "(official main_fedrep.py `accs10`). Paired: per seed, the mean over clients of the "
              f"difference in final local accuracy ({reference} minus the strategy, same clients and "
              "test images); better / worse counts clients over all seeds."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_seeds(labels: list[str], seeds: list[int], runs: dict[tuple[str, int], RunDir], out: Path) -> Path:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it was

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for label in labels:
        curves: dict[int, list[float]] = {}
        for seed in seeds:
            if (label, seed) not in runs:
                continue
            for r in runs[label, seed].read_metrics(warn=False):
                value = r.get("accuracy-weighted-mean", r.get("accuracy-mean"))
                if value is not None:
                    curves.setdefault(r["round"], []).append(float(value))
        if not curves:
            continue
        rounds = sorted(curves)
        stats = [_mean_std(curves[r]) for r in rounds]
        mean = [m for m, _ in stats]
        spread = [s for _, s in stats]
        (line,) = ax.plot(rounds, mean, label=f"{label} ({max(len(v) for v in curves.values())} seeds)")
        ax.fill_between(rounds, [m - s for m, s in zip(mean, spread, strict=True)],
                        [m + s for m, s in zip(mean, spread, strict=True)], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("mean local accuracy (test-size-weighted)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    return path
