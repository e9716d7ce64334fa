"""CPU seconds per round of each process of a simulation (driver, client actors, raylet, GCS),
for A/B comparisons of code trees or environment settings, interleaved.

Why: on this 2-core machine the wall-clock time of a round drifts by more than the changes
worth measuring (the same plain loop took 5.6 to 8.3 s within half an hour), while the CPU
each process spends per round moves much less. A change to the simulation's plumbing shows up
as CPU moved between the driver, the raylet and the actors; this counts it from ``/proc``
between the end of round 2 and the end of round ``R - 1`` of a real ``fedrep run``.

    # this tree against another checkout, 3 interleaved pairs, 1,000 one-batch clients
    python bench/process_cpu.py --pairs 3 . /path/to/other/checkout
    # environment variants of one tree: DIR,NAME=VALUE,...
    python bench/process_cpu.py . .,FEDREP_RAY_BATCH=8

Linux only (``/proc``). Writes ``bench/out/process_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# 1,000 FedAvg clients of one batch each: what bench/round_overhead.py --tiny runs
TINY = {"fraction-train": 1.0, "strategy": "fedavg", "num-clients": 1000, "max-train-per-client": 10,
        "max-test-per-client": 10, "batch-size": 10, "local-epochs": 1, "final-finetune-epochs": 0,
        "model": "cnn"}
KINDS = {"actor": "ClientAppActor", "driver": "fedrep.cli run", "raylet": "raylet/raylet",
         "gcs": "gcs_server"}


def _stat_fields(pid: str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces and
    parentheses), from the state on; OSError when the process is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: str) -> float:
    """User + system CPU seconds process ``pid`` has used (``/proc/PID/stat``); OSError when gone."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: str) -> str:
    """The parent of process ``pid`` (``/proc/PID/stat``); OSError when gone."""
    return _stat_fields(pid)[1]


def descendants(root: str) -> set[str]:
    """``root`` and every process below it: one simulation's Ray (its raylet and GCS are the
    driver's children, the actors the raylet's), not another run's sharing the machine."""
    children: dict[str, list[str]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                children.setdefault(parent_pid(pid), []).append(pid)
            except OSError:
                continue
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def process_seconds(root: str) -> dict[str, tuple[str, float]]:
    """pid -> (kind, CPU seconds used) for the processes of the simulation under ``root``."""
    found = {}
    for pid in descendants(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            kind = next((name for name, mark in KINDS.items() if mark in command), None)
            if kind is not None:
                found[pid] = (kind, cpu_seconds(pid))
        except OSError:
            continue
    return found


def cpu_per_round(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]],
                  rounds: int) -> dict[str, float]:
    """CPU seconds per round by kind, over processes alive at both samples."""
    out: dict[str, float] = {kind: 0.0 for kind in KINDS}
    for pid, (kind, seconds) in after.items():
        if pid in before:
            out[kind] += (seconds - before[pid][1]) / rounds
    return out


def rounds_written(metrics: Path) -> int:
    """The rounds a run has written to its ``metrics.csv`` so far (0 before the file exists)."""
    try:
        return max(0, len(metrics.read_text().splitlines()) - 1)
    except OSError:
        return 0


def wait_for_round(proc: subprocess.Popen, metrics: Path, count: int, timeout: float,
                   failed: Callable[[int], str], poll_s: float = 0.02) -> float:
    """Wait until the run ``proc`` has written round ``count`` to ``metrics``; the monotonic time
    it saw it. If the run ends or ``timeout`` seconds pass first, kill it and raise RuntimeError
    with ``failed(count)``."""
    deadline = time.monotonic() + timeout
    while rounds_written(metrics) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(failed(count))
        time.sleep(poll_s)
    return time.monotonic()


def measure(variant: str, settings: dict, rounds: int, timeout: float = 1800) -> dict[str, float]:
    """One run of ``variant`` (``DIR[,NAME=VALUE...]``): seconds and CPU seconds per round."""
    folder, *assignments = variant.split(",")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    env.update(item.split("=", 1) for item in assignments)
    with tempfile.TemporaryDirectory(prefix="fedrep-cpu-") as tmp:
        metrics = Path(tmp) / "run" / "metrics.csv"
        cmd = [sys.executable, "-m", "fedrep.cli", "run", "--rounds", str(rounds),
               "--set", f"run-dir={Path(tmp) / 'run'}"]
        for key, value in settings.items():
            cmd += ["--set", f"{key}={value}"]
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def failed(count: int) -> str:
            return (f"{variant}: the run ended before round {count}: "
                    f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")

        wait_for_round(proc, metrics, 2, timeout, failed)  # round 1 starts Ray and loads data
        before, start = process_seconds(str(proc.pid)), time.monotonic()
        wait_for_round(proc, metrics, rounds - 1, timeout, failed)  # the last may write end-of-run files
        after, end = process_seconds(str(proc.pid)), time.monotonic()
        counted = rounds - 3
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant}: fedrep run exited {proc.returncode}: {err.decode()[-2000:]}")
    return {"round-s": (end - start) / counted, **cpu_per_round(before, after, counted)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="DIR[,NAME=VALUE...]: a checkout to run from, "
                        "and environment settings; the first is the baseline")
    parser.add_argument("--pairs", type=int, default=2, help="interleaved runs of every variant")
    parser.add_argument("--rounds", type=int, default=9, help="rounds per run (rounds 3..R-1 counted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config settings over the tiny-client defaults")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "process_cpu.json")
    args = parser.parse_args()
    if args.rounds < 4:
        parser.error("--rounds: at least 4 (rounds 3 to R-1 are counted)")
    settings = {**TINY, **dict(item.split("=", 1) for item in args.overrides)}
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for pair in range(args.pairs):
        for variant in args.variants:
            row = measure(variant, settings, args.rounds)
            runs[variant].append(row)
            print(f"{pair} {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    means = {v: {k: statistics.mean(r[k] for r in rows) for k in rows[0]} for v, rows in runs.items()}
    base = args.variants[0]
    print("\nmean per round (CPU seconds by process, round wall seconds):")
    for variant, mean in means.items():
        total = sum(mean[k] for k in KINDS)
        relative = mean["round-s"] / means[base]["round-s"]
        ratio = "" if variant == base else f"   round {relative:.2f}x of the first"
        print(f"  {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items())
              + f", all CPU {total:.3f}{ratio}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "rounds": args.rounds, "runs": runs,
                                    "means": means}, indent=1))


if __name__ == "__main__":
    main()
