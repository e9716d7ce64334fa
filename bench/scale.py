"""Does memory grow with the clients sampled per round, or with the whole federation?

Runs FedRep on Fashion-MNIST (pathological, s=2) twice with the same number of clients per
round: 10,000 clients at 10% participation and 2,000 at 50% (1,000 trained per round either way,
and as many evaluated), and samples the memory of the whole process tree (driver, Ray, every
ClientApp worker) as the sum of proportional set sizes (``Pss`` in ``/proc/PID/smaps_rollup``,
so pages shared between workers count once). Prints peak memory and seconds per round; writes
``bench/out/scale.json``.

    python bench/scale.py                      # 10,000 vs 2,000 clients, 3 rounds each
    python bench/scale.py --clients 10000 --fraction 0.1 --rounds 2 --only
    python bench/scale.py --clients 100000 --dataset linear-synthetic   # 100,000 vs 20,000 clients
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.process_cpu import descendants  # noqa: E402
from fedrep.results import RunDir  # noqa: E402


def tree_pss_bytes(root: int) -> int:
    """Sum of Pss over ``root`` and all its descendants (0 for processes that vanished)."""
    total = 0
    for pid in descendants(str(root)):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


# Fashion-MNIST's 60,000 images cannot give 100,000 clients two classes each (fedrep refuses the
# partition); the paper's synthetic linear task (Sec. 5, experiments/linear-synthetic.toml) makes
# each client's samples on demand, so it scales to any federation.
LINEAR = ["--config", "experiments/linear-synthetic.toml"]


def measured_run(clients: int, fraction: float, rounds: int, workdir: Path, dataset: str) -> dict:
    run_dir = workdir / f"n{clients}"
    cmd = [sys.executable, "-m", "fedrep.cli", "run", *(LINEAR if dataset == "linear-synthetic" else []),
           "--num-clients", str(clients), "--rounds", str(rounds),
           "--set", f"fraction-train={fraction}", "--set", f"fraction-evaluate={fraction}",
           "--set", "final-finetune-epochs=0", "--set", f"run-dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    peak, samples = 0, []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            now = tree_pss_bytes(proc.pid)
            peak = max(peak, now)
            samples.append(now)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"run with {clients} clients failed:\n{err[-3000:]}")
    rows = RunDir(run_dir).read_metrics()
    per_round = [r["round-seconds"] for r in rows]
    sampled = round(clients * fraction)
    # what each round really did: a round that trained or evaluated fewer clients than sampled
    # (failures, a lost node) is not the workload this benchmark claims to time
    served = [{key: int(r.get(key) or 0) for key in ("train-clients", "train-failures", "eval-clients",
                                                      "eval-failures")} for r in rows]
    short = [i + 1 for i, s in enumerate(served)
             if s["train-clients"] != sampled or s["eval-clients"] != sampled]
    if short:
        raise SystemExit(f"run with {clients} clients: rounds {short} did not train and evaluate "
                         f"{sampled} clients each: {served}")
    final = rows[-1]
    return {"clients": clients, "fraction": fraction, "dataset": dataset,
            "sampled-per-round": sampled, "served-per-round": served,
            "rounds": len(rows), "peak-memory-bytes": peak, "seconds-per-round": per_round,
            "seconds-per-round-after-first": sum(per_round[1:]) / max(len(per_round) - 1, 1),
            "final-accuracy-mean": final.get("accuracy-mean"), "final-loss-mean": final.get("loss-mean")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="store_true", help="skip the smaller comparison run")
    parser.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "linear-synthetic"),
                        help="linear-synthetic (the paper's linear task) for federations past 30,000")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    runs = [(args.clients, args.fraction)]
    if not args.only:  # same clients per round out of a federation five times smaller
        runs.append((args.clients // 5, min(1.0, args.fraction * 5)))
    with tempfile.TemporaryDirectory(prefix="fedrep-scale-") as tmp:
        results = [measured_run(n, f, args.rounds, Path(tmp), args.dataset) for n, f in runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "scale.json" if args.dataset == "fashion-mnist" else f"scale-{args.dataset}-{args.clients}.json"
    (out / name).write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"{r['clients']:>6} clients, {r['sampled-per-round']} per round: peak memory "
              f"{r['peak-memory-bytes'] / 2**30:.2f} GiB, {r['seconds-per-round-after-first']:.1f} s/round "
              f"(rounds: {', '.join(f'{s:.1f}' for s in r['seconds-per-round'])})")
    if len(results) == 2:
        big, small = results
        print(f"5x the clients, the same clients per round: peak memory "
              f"{big['peak-memory-bytes'] / small['peak-memory-bytes']:.2f}x, seconds per round "
              f"{big['seconds-per-round-after-first'] / small['seconds-per-round-after-first']:.2f}x")


if __name__ == "__main__":
    main()
