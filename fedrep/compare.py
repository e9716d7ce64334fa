"""``fedrep compare``: several strategies on identical partitions and seeds, one table, one plot.

A comparison file is TOML::

    strategies = ["fedrep", "fedper", "fedavg"]   # or "label=strategy" to run one strategy twice
    [config]                 # run-config keys shared by every run (same data split and seed)
    num-rounds = 100
    [overrides.fedavg]       # optional, per strategy
    local-epochs = 1

Each strategy runs as its own ``fedrep run`` (own process, own Ray) into
``OUT/<strategy>/``. Finished runs are skipped and interrupted ones resumed, so re-running the
command after a crash continues where it stopped. The table (``results.md`` and ``results.csv``)
and ``accuracy.png`` go to ``OUT``.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedrep.config import ConfigError, RunConfig, parse_run_config
from fedrep.results import RunDir


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategies: list[str] = Field(
        min_length=1, description="Strategy plugin names to run; 'label=strategy' names a variant "
        "(e.g. 'no-focus=kd3a' with its strategy-options under [overrides.no-focus]).")
    config: dict[str, Any] = Field(default_factory=dict, description="Shared run-config keys.")
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                 description="Per-strategy run-config keys.")

    @field_validator("strategies")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"strategies {names} list one name twice")
        return names


def load_comparison(path: Path) -> tuple[CompareConfig, dict[str, RunConfig]]:
    """Parse the file and validate every strategy's full run config before anything runs."""
    if not path.is_file():
        raise ConfigError(f"comparison file {path} does not exist")
    try:
        spec = CompareConfig.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError) as err:
        raise ConfigError(f"comparison file {path}: {err}") from None
    labels = [name.partition("=")[0] for name in spec.strategies]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"comparison file {path}: strategies {spec.strategies} use one label twice")
    unknown = set(spec.overrides) - set(labels)
    if unknown:
        raise ConfigError(f"comparison file {path}: overrides for {sorted(unknown)}, which are not "
                          f"in strategies {labels}")
    configs = {}  # label -> config, in file order
    for name in spec.strategies:
        label, _, strategy = name.partition("=")
        values = {**spec.config, **spec.overrides.get(label, {}), "strategy": strategy or label}
        configs[label] = parse_run_config(values, f"{path} (strategy {name})")
    return spec, configs


def _run_one(cfg: RunConfig, run_dir: Path) -> float:
    """Run (or resume) one strategy; seconds it took in this invocation."""
    from fedrep.config import toml_value

    started = time.perf_counter()
    if _completed(run_dir):
        return 0.0
    if (run_dir / "state.json").is_file():
        cmd = ["run", "--resume", str(run_dir)]
    else:
        cmd = ["run"]
        for key, value in cfg.to_flower().items():
            if key not in ("run-dir", "resume"):
                cmd += ["--set", f"{key}={toml_value(value)}"]
        cmd += ["--set", f"run-dir={toml_value(str(run_dir))}"]
    proc = subprocess.run([sys.executable, "-m", "fedrep.cli", *cmd], check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg.strategy} failed (exit {proc.returncode}); rerun the same "
                           "`fedrep compare` to resume it")
    return time.perf_counter() - started


def summarize_run(name: str, run: RunDir) -> dict[str, Any]:
    rows = run.read_metrics()
    cfg = run.saved_config()
    final = next((r for r in reversed(rows) if "accuracy-mean" in r or "loss-mean" in r), {})
    sent = sum(r.get("bytes-sent", 0) for r in rows)
    received = sum(r.get("bytes-received", 0) for r in rows)
    out = {
        "strategy": name,
        "rounds": len(rows),
        "accuracy-mean": final.get("accuracy-mean"),
        "accuracy-std": final.get("accuracy-std"),
        "accuracy-finetuned-mean": final.get("accuracy-finetuned-mean"),
        "loss-mean": final.get("loss-mean"),
        "wall-seconds": sum(r.get("round-seconds", 0.0) for r in rows),
        "bytes-per-client": (sent + received) / cfg.num_clients,
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
    lines = ["| strategy | final mean local acc. ± std | after head fine-tune | rounds | "
             "wall time (s) | bytes per client |", "|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"{_fmt(r['accuracy-mean'])} ± {_fmt(r['accuracy-std'])}"
               if r.get("accuracy-mean") is not None else f"loss {_fmt(r.get('loss-mean'))}")
        if "representation-distance" in r:
            acc += f" (dist {r['representation-distance']:.2e})"
        if r.get("target-accuracy") is not None:
            acc = f"target {_fmt(r['target-accuracy'])} (all parties {acc})"
        lines.append(f"| {r['strategy']} | {acc} | {_fmt(r.get('accuracy-finetuned-mean'))} | "
                     f"{r['rounds']} | {_fmt(r['wall-seconds'], 1)} | "
                     f"{_bytes(r['bytes-per-client'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot_comparison(runs: dict[str, RunDir], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
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
    plt.close(fig)
    return path


def compare(path: Path, out: Path, only: list[str] | None = None) -> Path:
    """Run the file's strategies (or just ``only``) and tabulate every finished one.

    ``only`` lets a long comparison be spread over several sessions or machines; the table always
    covers each strategy of the file whose run folder under ``out`` has completed.
    """
    _, configs = load_comparison(path)
    if only:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            raise ConfigError(f"--only {unknown}: not in the strategies of {path} ({list(configs)})")
    out.mkdir(parents=True, exist_ok=True)
    for name in configs:
        if only and name not in only:
            continue
        run_dir = (out / name).resolve()
        print(f"[fedrep compare] {name} -> {run_dir}", file=sys.stderr, flush=True)
        _run_one(configs[name], run_dir)
    runs = {name: RunDir((out / name).resolve()) for name in configs
            if _completed(out / name)}
    write_table([summarize_run(n, r) for n, r in runs.items()], out)
    plot_comparison(runs, out)
    return out / "results.md"


def _completed(run_dir: Path) -> bool:
    return (run_dir / "state.json").is_file() and RunDir(run_dir).state()["status"] == "completed"
