"""One FedRep round of CIFAR-10 client work on the CPU and on a shared GPU, side by side.

Why this script and not ``fedrep run --set client-gpus=...``: the GPU machine this project is
lent has no package registry, and Ray's wheel alone is larger than what may be carried to it, so
Flower's Simulation Runtime cannot start there. What fractional ``client-gpus`` does is still
measurable without it: ``client-gpus = 1/K`` lets Ray place K client workers on one GPU, each a
process that moves its model and data to ``cuda`` (``clients/app.py``: ``device_for``) and holds
itself to its share of the GPU's memory (``limit_gpu_memory``). Here K spawned processes do the
same client arithmetic (``bench/round_overhead.py``'s ``reference_round``: the rule's ``fit`` and
``evaluate`` as the ClientApp calls them, data on the device through
:func:`fedrep.data.federated.load_client_data`), split the round's clients
between them, and the round's wall time is compared with the same work in the same number of CPU
processes. GPU utilisation is sampled with NVML (``nvidia-ml-py``) while the GPU runs.

The data are CIFAR-10 *shaped* (the official python-pickle archive layout, random pixels, written
by ``tests/fixtures_cifar.py``): round time does not depend on the pixels, and the real archive
cannot be downloaded there. Settings are the paper's CIFAR-10 run (``scripts/FedRep_cifar10_2shards.sh``
in lgcollins/FedRep: 100 clients, 2 shards each, 10 head epochs + 1 body epoch, batches of 10).

    python bench/gpu_round.py --workers 4 --devices cpu cuda     # prints a table, writes JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu_simulation import DeviceSampler  # noqa: E402
from bench.round_overhead import reference_round  # noqa: E402
from fedrep.config import parse_run_config  # noqa: E402


def settings_for(data_dir: str, clients: int, fraction: float) -> dict:
    return {"dataset": "cifar10", "data-dir": data_dir, "num-clients": clients, "fraction-train": fraction,
            "strategy": "fedrep", "final-finetune-epochs": 0}


def _shard(settings: dict, device: str, shard: int, shards: int, barrier, results) -> None:
    """Worker ``shard`` of ``shards``: every ``shards``-th sampled client's local update, then
    every ``shards``-th client's evaluation, on ``device``; puts its seconds after the barrier,
    or, if it fails, breaks the barrier and puts the error, so the parent does not wait forever."""
    try:
        if device == "cuda":  # the share of the GPU a client-gpus = 1/shards worker is held to
            torch.cuda.set_per_process_memory_fraction(1.0 / shards, 0)
        results.put(reference_round(parse_run_config(settings), 2, shard, shards, barrier, device))
    except BaseException as err:
        barrier.abort()
        results.put(f"worker {shard}: {type(err).__name__}: {err}")


def timed_round(settings: dict, device: str, workers: int) -> dict:
    """Wall seconds of the round's client work in ``workers`` processes started together on
    ``device`` (the slowest worker's), with GPU utilisation when on the GPU."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers + 1), ctx.Queue()
    procs = [ctx.Process(target=_shard, args=(settings, device, i, workers, barrier, results))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        barrier.wait()  # every worker has its data and a warm model
        with DeviceSampler(root=None, gpu=device == "cuda", period=0.05) as sampler:
            start = time.monotonic()
            times = [results.get() for _ in procs]
            end = time.monotonic()
    except threading.BrokenBarrierError:
        raise RuntimeError(f"a {device} worker failed: {results.get()}") from None
    finally:
        for proc in procs:
            proc.join()
    if failed := [t for t in times if isinstance(t, str)]:
        raise RuntimeError(f"a {device} worker failed: {failed[0]}")
    out = {"device": device, "workers": workers, "seconds": max(times)}
    if device == "cuda":
        out.update(sampler.window(start, end))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction-train (the paper's 0.1)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4],
                        help="client processes per device (client-gpus = 1/W on the GPU)")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--per-batch", type=int, default=10000,
                        help="images per CIFAR-10 training batch file (10,000 = the real size)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here (use --devices cpu)")

    from tests.fixtures_cifar import write_cifar_folder

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedrep-gpu-") as tmp:
        write_cifar_folder(Path(tmp), "cifar10", per_batch=args.per_batch)
        settings = settings_for(tmp, args.clients, args.fraction)
        for device in args.devices:
            for workers in args.workers:
                rows.append(timed_round(settings, device, workers))
                print(json.dumps(rows[-1]), flush=True)
    cpu = {r["workers"]: r["seconds"] for r in rows if r["device"] == "cpu"}
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    print(f"one FedRep round's client work, CIFAR-10 shaped, {args.clients} clients, "
          f"fraction {args.fraction}, torch {torch.__version__}{gpu}")
    for r in rows:
        line = f"  {r['device']:4s} x{r['workers']:<2d} workers: {r['seconds']:8.2f} s"
        if "gpu-utilisation-mean" in r:
            line += f"   GPU busy {r['gpu-utilisation-mean']:5.1f}%  peak {r['gpu-memory-peak-gib']:.2f} GiB"
        if r["device"] != "cpu" and r["workers"] in cpu:
            line += f"   {cpu[r['workers']] / r['seconds']:.2f}x the CPU with as many workers"
        print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_round.json").write_text(json.dumps({"clients": args.clients, "fraction": args.fraction,
                                                    "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
