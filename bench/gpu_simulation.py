"""FedRep's CIFAR-10 rounds in Flower's Simulation Runtime, on CPUs and with fractional client-gpus.

What issue 23's fifth target asks: the CIFAR-10 FedRep workload run the way a user runs it
(``fedrep run``: the ServerApp, Ray and one ClientApp actor per ``client-cpus``/``client-gpus``
share), once on CPUs alone (``client-gpus = 0``) and once per GPU share asked for, with round
time and how busy the devices were. ``bench/gpu_round.py`` times the client arithmetic alone in
plain processes; this one has Flower and Ray in the loop.

Settings are the paper's CIFAR-10 run as ``experiments/paper/cifar10-n100-s2.toml`` holds it
(lgcollins/FedRep ``scripts/FedRep_cifar10_2shards.sh``: 100 clients of 2 classes, 10% trained per
round, 10 head epochs + 1 body epoch, batches of 10, the paper's CNN), with every client
evaluated every round (the official ``main_fedrep.py`` evaluates all clients each round) and no
final fine-tune. The data are CIFAR-10 *shaped* when no ``--data-dir`` is given: the official
python-pickle layout with random pixels, written by ``tests/fixtures_cifar.py`` at the real size
(50,000 training images); round time does not depend on the pixels.

Measured between the end of round 1 (Ray started, data loaded, models built) and the end of the
last round, sampled every 0.1 s: the CPU seconds of the run's whole process tree (driver, raylet,
GCS, every actor) per wall second, i.e. the cores kept busy, and with a GPU, NVML's utilisation
(the share of time some kernel ran) and the memory used on it.

    python bench/gpu_simulation.py --client-gpus 0 0.25          # CPU run, then 4 clients per GPU
    python bench/gpu_simulation.py --client-gpus 0 --rounds 3    # where no GPU is lent

Writes ``bench/out/gpu_simulation.json`` after every run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.process_cpu import cpu_seconds, descendants, wait_for_round  # noqa: E402
from fedrep.results import RunDir  # noqa: E402

PAPER = ROOT / "experiments" / "paper" / "cifar10-n100-s2.toml"


def paper_settings(data_dir: str, rounds: int, client_gpus: float, client_cpus: float,
                   clients: int | None = None) -> dict:
    """Run-config keys of the paper's CIFAR-10 run (``PAPER``'s ``[config]``) for ``rounds`` rounds."""
    settings = dict(tomllib.loads(PAPER.read_text())["config"])
    settings.update({"strategy": "fedrep", "data-dir": data_dir, "num-rounds": rounds, "eval-every": 1,
                     "final-finetune-epochs": 0, "client-gpus": client_gpus, "client-cpus": client_cpus})
    if clients is not None:
        settings["num-clients"] = clients
    return settings


class DeviceSampler:
    """Samples, every ``period`` seconds: the CPU seconds used so far by the process tree under
    ``root`` (0 when no root), and with ``gpu``, NVML's utilisation and memory used of GPU 0."""

    def __init__(self, root: int | None, gpu: bool, period: float = 0.1) -> None:
        self.root, self.period = root, period
        self.samples: list[tuple[float, float, int | None, int | None]] = []  # (t, cpu s, util %, bytes)
        self._nvml = self._handle = None
        if gpu:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_cpu(self) -> float:
        if self.root is None:
            return 0.0
        total = 0.0
        for pid in descendants(str(self.root)):
            try:
                total += cpu_seconds(pid)
            except OSError:  # ended between the scan and the read
                continue
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            util = memory = None
            if self._nvml is not None:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.samples.append((time.monotonic(), self._tree_cpu(), util, memory))

    def __enter__(self) -> DeviceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> dict:
        """Cores busy (tree CPU seconds per wall second) and, with a GPU, mean utilisation and
        peak memory, over the samples taken between ``start`` and ``end`` (monotonic seconds)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        out: dict = {"samples": len(inside)}
        if len(inside) >= 2 and self.root is not None:
            out["cpu-cores-busy"] = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
        gpu = [s for s in inside if s[2] is not None]
        if gpu:
            out["gpu-utilisation-mean"] = sum(s[2] for s in gpu) / len(gpu)
            out["gpu-memory-peak-gib"] = max(s[3] for s in gpu) / 2**30
        return out


def machine_cpus() -> dict:
    """What bounds the CPU run besides its actors: the CPUs Python sees (``os.cpu_count``, which
    also sizes Python's default thread pools), those this process may run on (affinity), and a
    cgroup CPU quota (``cpu.max``, v2) if one is set: a quota below the cores counted makes a
    machine with many busy threads stall in bursts."""
    out: dict = {"os-cpu-count": os.cpu_count(),
                 "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        out["cgroup-cpu-quota"] = None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        out["cgroup-cpu-quota"] = "unreadable"
    return out


def clients_at_a_time(stderr: str) -> int | None:
    """From the ``[fedrep] ... -> N clients at a time`` line ``fedrep run`` prints at start."""
    found = re.search(r"-> (\d+) clients at a time", stderr)
    return int(found.group(1)) if found else None


def timed_run(settings: dict, run_dir: Path, log: Path, timeout: float) -> dict:
    """One ``fedrep run`` of ``settings``, sampled from the end of round 1 to the end of the
    last; fails, with the run's last log lines, if it fails or a round served fewer clients than
    it sampled."""
    cmd = [sys.executable, "-m", "fedrep.cli", "run", "--set", f"run-dir={run_dir}"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    metrics = run_dir / "metrics.csv"
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})

    def failed(count: int) -> str:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        return (f"client-gpus={settings['client-gpus']}: the run ended or timed out before round {count} "
                f"(log {log}):\n{tail}")

    with DeviceSampler(proc.pid, gpu=float(settings["client-gpus"]) > 0) as sampler:
        start = wait_for_round(proc, metrics, 1, timeout, failed)
        end = wait_for_round(proc, metrics, settings["num-rounds"], timeout, failed)
    proc.wait(timeout=timeout)
    output = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"fedrep run exited {proc.returncode}:\n{output[-3000:]}")
    rows = RunDir(run_dir).read_metrics()
    sampled_train = round(settings["num-clients"] * settings["fraction-train"])
    short = [r["round"] for r in rows if int(r["train-clients"]) != sampled_train
             or int(r["eval-clients"]) != settings["num-clients"]]
    if short:
        raise RuntimeError(f"rounds {short} did not train {sampled_train} and evaluate "
                           f"{settings['num-clients']} clients")
    per_round = [float(r["round-seconds"]) for r in rows]
    # where the timed rounds went (server/loop.py: the server's waits for each phase, its own work)
    phases = {key: statistics.median(float(r[key]) for r in rows[1:])
              for key in ("train-phase-seconds", "evaluate-phase-seconds", "server-seconds")}
    return {"client-gpus": float(settings["client-gpus"]), "client-cpus": float(settings["client-cpus"]),
            "clients-at-a-time": clients_at_a_time(output), "rounds": len(rows),
            "round-seconds": per_round, "round-seconds-median-after-first": statistics.median(per_round[1:]),
            "round-1-seconds": per_round[0], "window-seconds": end - start,
            "phases-median-after-first": phases, "accuracy-mean-last": float(rows[-1]["accuracy-mean"]),
            **sampler.window(start, end)}


def report(rows: list[dict]) -> list[str]:
    """One line per run, each GPU run also as a ratio to the CPU run (``client-gpus`` 0)."""
    cpu = next((r for r in rows if r["client-gpus"] == 0), None)
    lines = []
    for r in rows:
        where = "CPU only" if r["client-gpus"] == 0 else f"client-gpus {r['client-gpus']:g}"
        line = (f"  {where:20s} {r['clients-at-a-time'] or '?':>3} at a time: "
                f"{r['round-seconds-median-after-first']:7.2f} s/round "
                f"(round 1 {r['round-1-seconds']:.1f} s), "
                f"CPU cores busy {r.get('cpu-cores-busy', float('nan')):5.2f}")
        if "phases-median-after-first" in r:
            phases = r["phases-median-after-first"]
            line += (f" [train {phases['train-phase-seconds']:.2f} + evaluate "
                     f"{phases['evaluate-phase-seconds']:.2f} + server {phases['server-seconds']:.2f} s]")
        if "gpu-utilisation-mean" in r:
            line += (f", GPU busy {r['gpu-utilisation-mean']:5.1f}%, "
                     f"GPU memory {r['gpu-memory-peak-gib']:.2f} GiB")
        if cpu is not None and r is not cpu:
            ratio = cpu["round-seconds-median-after-first"] / r["round-seconds-median-after-first"]
            line += f"; {ratio:.2f}x the CPU run's speed"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client-gpus", type=float, nargs="+", default=[0.0, 0.25],
                        help="one run per value; 0 = CPUs only (default: 0 0.25)")
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run; rounds 2.. are timed")
    parser.add_argument("--clients", type=int, help="num-clients (default: the paper's 100)")
    parser.add_argument("--data-dir", help="a real CIFAR-10 folder or archive (default: shaped data)")
    parser.add_argument("--per-batch", type=int, default=10000,
                        help="images per shaped training batch file (10,000 = the real size)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each run may take")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 (start-up) is not timed")
    import torch

    if any(g > 0 for g in args.client_gpus) and not torch.cuda.is_available():
        parser.error("--client-gpus > 0: no CUDA device here (use --client-gpus 0)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result: dict = {"command": " ".join(sys.argv), "torch": torch.__version__, "gpu": gpu_name,
                    "cpus": machine_cpus(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="fedrep-gpu-sim-") as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            from tests.fixtures_cifar import write_cifar_folder

            write_cifar_folder(Path(tmp) / "data", "cifar10", per_batch=args.per_batch)
            data_dir = str(Path(tmp) / "data")
        result["data"] = ("real" if args.data_dir
                          else f"CIFAR-10-shaped, {args.per_batch} images per batch file")
        for i, gpus in enumerate(args.client_gpus):
            settings = paper_settings(data_dir, args.rounds, gpus, args.client_cpus, args.clients)
            row = timed_run(settings, Path(tmp) / f"run-{i}", out / f"gpu_simulation-{i}.log",
                            args.timeout)
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            (out / "gpu_simulation.json").write_text(json.dumps(result, indent=2))
    print(f"FedRep, CIFAR-10 ({result['data']}), {settings['num-clients']} clients, "
          f"{settings['fraction-train']:g} trained per round, all evaluated; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs" + (f", {gpu_name}" if gpu_name else ""))
    print("\n".join(report(result["runs"])))


if __name__ == "__main__":
    main()
