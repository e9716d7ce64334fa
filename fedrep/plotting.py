"""The run's picture: mean local accuracy (with its spread) and losses over rounds."""

from __future__ import annotations

from pathlib import Path

from fedrep.config import ConfigError
from fedrep.results import RunDir


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it was

    run = RunDir(run_dir)
    rows = run.read_metrics()
    if not rows:
        status = run.state().get("status") if run.state_file.is_file() else None
        if status == "running":
            raise ConfigError(f"{run.path} has no completed rounds to plot yet; wait for round 1")
        raise ConfigError(f"{run.path} has no completed rounds to plot (status: {status})")
    cfg = run.saved_config()
    evald = [r for r in rows if "accuracy-mean" in r]
    has_dist = any("representation-distance" in r for r in rows)
    panels = 1 + bool(evald) + has_dist
    fig = Figure(figsize=(5 * panels, 3.8))
    axes = fig.subplots(1, panels, squeeze=False)
    axes = list(axes[0])
    if evald:
        ax = axes.pop(0)
        x = [r["round"] for r in evald]
        mean = [r["accuracy-mean"] for r in evald]
        std = [r["accuracy-std"] for r in evald]
        ax.plot(x, mean, marker="o", label="mean local accuracy")
        ax.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2, label="± 1 std")
        trained = [r for r in evald if "accuracy-trained-mean" in r]
        if trained:
            ax.plot([r["round"] for r in trained], [r["accuracy-trained-mean"] for r in trained],
                    linestyle="--", label="clients that have trained")
        tuned = [r for r in evald if "accuracy-finetuned-mean" in r]
        if tuned:
            ax.plot([r["round"] for r in tuned], [r["accuracy-finetuned-mean"] for r in tuned],
                    marker="*", markersize=12, linestyle="none", label="after final head fine-tune")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    ax = axes.pop(0)
    ax.plot([r["round"] for r in rows], [r.get("train-loss") for r in rows], label="train loss")
    evl = [r for r in rows if "loss-mean" in r]
    if evl:
        ax.plot([r["round"] for r in evl], [r["loss-mean"] for r in evl], label="local test loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_yscale("log" if cfg.dataset == "linear-synthetic" else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_dist:
        ax = axes.pop(0)
        dr = [r for r in rows if "representation-distance" in r]
        ax.semilogy([r["round"] for r in dr], [r["representation-distance"] for r in dr])
        ax.set_xlabel("round")
        ax.set_ylabel("principal-angle distance to B*")
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{cfg.strategy} · {cfg.dataset} · {cfg.partition} · n={cfg.num_clients}")
    fig.tight_layout()
    target = Path(out) if out else run.path / "plot.png"
    fig.savefig(target, dpi=110)
    return target
