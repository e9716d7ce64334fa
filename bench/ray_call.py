"""What one Ray actor call costs the driver and the raylet, beside the clients' work.

Why it matters: in a simulation of tiny clients (bench/round_overhead.py --tiny) the driver and
the raylet share the cores with the client actors, so their CPU time per call comes out of the
clients' training. This measures it for calls shaped like fedrep's batched ones (32 jobs of
about 2 KB each: metadata and a node's context) with the jobs either put into the object store
first (``ray.put``, what fedrep did before shared_content.py) or carried in the call itself, and
replies of several sizes (a call of 32 one-batch evaluations returns kilobytes; of 32 trained
paper-CNN models, 30 MB). Two actors, one call in flight each, as fedrep's worker threads do.

    python bench/ray_call.py            # prints a table, writes bench/out/ray_call.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import ray

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.process_cpu import cpu_seconds, parent_pid  # noqa: E402

JOBS, JOB_BYTES = 32, 2000


@ray.remote(num_cpus=1)
class Replier:
    """Returns a reply of ``size`` bytes (out of band, as fedrep's actors return models)."""

    def run(self, jobs, size: int):
        return np.ones(size // 4, np.float32) if size else [0] * JOBS

    def pid(self) -> int:
        return os.getpid()


def _driver_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(actors, raylet: str, size: int, put_jobs: bool, calls: int) -> dict[str, float]:
    """Per call: wall ms, driver CPU ms, raylet CPU ms."""
    def loop(actor) -> None:
        for _ in range(calls // len(actors)):
            jobs = ["x" * JOB_BYTES for _ in range(JOBS)]
            ray.get(actor.run.remote(ray.put(jobs) if put_jobs else jobs, size))

    threads = [threading.Thread(target=loop, args=(actor,)) for actor in actors]
    driver0, raylet0, wall0 = _driver_cpu(), cpu_seconds(raylet), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    per_call = 1e3 / calls
    return {"wall_ms": (time.perf_counter() - wall0) * per_call,
            "driver_cpu_ms": (_driver_cpu() - driver0) * per_call,
            "raylet_cpu_ms": (cpu_seconds(raylet) - raylet0) * per_call}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 200_000, 30_000_000],
                        help="reply bytes per call")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "ray_call.json")
    args = parser.parse_args()
    ray.init(include_dashboard=False, num_cpus=2, logging_level="WARNING")
    try:
        actors = [Replier.remote() for _ in range(2)]
        ray.get([actor.run.remote(None, 0) for actor in actors])
        # this Ray's raylet: the actors' parent (another Ray on the machine has its own)
        raylet = parent_pid(str(ray.get(actors[0].pid.remote())))
        rows = []
        for size in args.sizes:
            for put_jobs in (True, False):
                measure(actors, raylet, size, put_jobs, 20)  # warm
                row = {"reply_bytes": size, "jobs": "ray.put" if put_jobs else "in the call",
                       **measure(actors, raylet, size, put_jobs, args.calls)}
                rows.append(row)
                print(f"reply {size:>11,} B, jobs {row['jobs']:<11}: wall {row['wall_ms']:6.2f} ms/call, "
                      f"driver {row['driver_cpu_ms']:5.2f} ms, raylet {row['raylet_cpu_ms']:5.2f} ms",
                      flush=True)
    finally:
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"calls": args.calls, "jobs_per_call": JOBS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
