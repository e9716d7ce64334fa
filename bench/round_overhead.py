"""How much does Flower's simulation cost over the bare arithmetic of one FedRep round?

Measures, side by side in one invocation:

* reference: the same round (local updates of the sampled clients, then evaluation of all
  clients) as one plain PyTorch loop in this process, data preloaded, 1 thread; timed before
  and after the simulations, and their mean used;
* ideal: reference / number of parallel client workers (what a perfect parallel engine gets);
* plain parallel: the reference loop split over that many processes started together, i.e. what
  the machine's cores actually give plain PyTorch (shared caches, memory bandwidth, clock);
* flower: the same round through ``fedrep run`` (Flower Simulation Runtime, Ray backend), taken
  from round 2 so that Ray actors are up and client data is cached, as in any long run
  (``--rounds N``: the median of rounds 2 to N+1, steadier on a machine whose speed drifts;
  ``--repeats K``: K simulations, each between two runs of the reference, each ratio against
  the mean of the two references beside it, the median ratio reported: this machine's speed
  drifts by more than the differences measured here, so one pair of runs can mislead; every
  reference first waits until the machine is idle, so that nothing left of a simulation can
  slow it and flatter the ratios: on this machine it never had to wait beyond the first check);
* flower-dispatch: the same with ``FEDREP_DISPATCH=flower``, i.e. Flower's own per-node message
  dispatch loop instead of :mod:`fedrep.flower_runtime` (what the one-pass dispatcher saves);
* stock: the same again with ``bench/stock_clientapp.py``, a ClientApp that re-parses the config,
  rebuilds the model and reloads and re-partitions its data on every message, as ClientApps
  written the usual way do;
* usual: FedRep written the usual way (``bench/usual_clientapp.py``: a ClientApp as Flower's
  documentation teaches it, head in ``context.state``, every head epoch through the whole
  network, nothing cached), driven by the same ServerApp: the ratio a user gets by switching;
* head-cache: the local update with and without head epochs on cached body features.

Prints the ratios and writes them to ``bench/out/round_overhead.json``.

    python bench/round_overhead.py                      # 100 clients x 600 images, CNN
    python bench/round_overhead.py --model mlp --fraction 0.1
    python bench/round_overhead.py --tiny --rounds 5    # 1,000 one-batch FedAvg clients: clients/s
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fedrep.algorithms.sampling import sample_clients
from fedrep.algorithms.training import EVAL, round_generator
from fedrep.config import parse_run_config
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.registry import get_strategy
from fedrep.results import RunDir


def reference_round(cfg, server_round: int, shard: int = 0, shards: int = 1, barrier=None,
                    device: str = "cpu") -> float:
    """Seconds for one round of the same arithmetic in one process (data preloaded); with
    ``shards`` > 1 only every ``shards``-th client from ``shard`` on, after ``barrier``; model
    and data on ``device`` (``bench/gpu_round.py``: ``cuda``)."""
    rule = get_strategy(cfg.strategy).client_rule(cfg)
    model = rule.prepare_model(build_model(cfg)).to(device)
    start_state = {k: v.clone() for k, v in model.state_dict().items()}
    sampled = sample_clients(cfg.seed, server_round, range(cfg.num_clients), cfg.fraction_train)
    trained = sampled[shard::shards]
    evaluated = list(range(cfg.num_clients))[shard::shards]
    datas = {c: load_client_data(cfg, c, device) for c in {*trained, *evaluated}}
    torch.set_num_threads(cfg.client_threads)
    model.load_state_dict(start_state)  # warm up (first-call kernel set-up), as Flower's round 2 is warm
    if trained:
        rule.fit(model, datas[trained[0]], round_generator(cfg.seed, 0, trained[0]))
    elif evaluated:  # a shard that trains nobody this round (many GPU workers, few sampled)
        rule.evaluate(model, datas[evaluated[0]], round_generator(cfg.seed, 0, evaluated[0], EVAL))
    _synchronize(device)
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    for client in trained:
        model.load_state_dict(start_state)
        rule.fit(model, datas[client], round_generator(cfg.seed, server_round, client))
    for client in evaluated:
        model.load_state_dict(start_state)
        rule.evaluate(model, datas[client], round_generator(cfg.seed, server_round, client, EVAL))
    _synchronize(device)
    return time.perf_counter() - t0


def _synchronize(device: str) -> None:
    """Wait for the GPU's queued kernels, so that a timer around them times them."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _shard(settings: dict, server_round: int, shard: int, shards: int, barrier, results) -> None:
    results.put(reference_round(parse_run_config(settings), server_round, shard, shards, barrier))


def parallel_reference_round(settings: dict, server_round: int, workers: int) -> float:
    """Wall seconds for the plain loop split over ``workers`` processes started together: what
    this machine's cores give plain PyTorch, the bound no engine can beat here."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_shard, args=(settings, server_round, i, workers, barrier, results))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    times = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return max(times)


def head_cache_speedup(cfg, clients: int) -> tuple[float, float]:
    """(seconds without, seconds with) head-feature caching for ``clients`` local updates."""
    times = []
    for cache in (False, True):
        c = cfg.model_copy(update={"cache_head_features": cache})
        rule = get_strategy(c.strategy).client_rule(c)
        model = rule.prepare_model(build_model(c))
        t0 = time.perf_counter()
        for client in range(clients):
            rule.fit(model, load_client_data(c, client), round_generator(c.seed, 1, client))
        times.append(time.perf_counter() - t0)
    return times[0], times[1]


def flower_round(settings: dict, workdir: Path, client_app: str | None = None,
                 dispatch: str = "fast", rounds: int = 1, repeat: int = 0) -> float:
    """Seconds of round 2 of a real ``fedrep run`` with ``settings`` (run-config keys); with
    ``rounds`` > 1, the median of rounds 2 to ``rounds`` + 1 (a noisy machine's seconds drift)."""
    label = client_app.split(":")[0].rsplit(".", 1)[-1] if client_app else "flower"
    run_dir = workdir / f"{label}-{dispatch}-run-{repeat}"
    cmd = [sys.executable, "-m", "fedrep.cli", "run", "--rounds", str(rounds + 1),
           "--set", f"run-dir={run_dir}"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    if client_app:
        cmd += ["--client-app", client_app]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=Path(__file__).resolve().parents[1],
                   env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FEDREP_DISPATCH": dispatch})
    return statistics.median(float(row["round-seconds"]) for row in RunDir(run_dir).read_metrics()[1:])


def busy_fraction(window_s: float) -> float | None:
    """The share of all CPUs' time not idle over ``window_s`` seconds (``/proc/stat``; None
    where there is none)."""
    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait
    first = sample()
    time.sleep(window_s)
    second = sample()
    if first is None or second is None or second[0] == first[0]:
        return None
    return 1 - (second[1] - first[1]) / (second[0] - first[0])


def wait_until_quiet(max_s: float = 60.0, busy_below: float = 0.1, window_s: float = 0.5) -> float:
    """Wait until the machine is idle (under ``busy_below`` of its CPUs busy over ``window_s``),
    at most ``max_s`` s; the seconds waited. A reference timed beside the last of a simulation's
    Ray processes would run slow and flatter every ratio against it; the bench records the
    waits (``quiet-waits-s``) so that a run shows whether that happened."""
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        busy = busy_fraction(window_s)
        if busy is None or busy < busy_below:
            break
    return time.monotonic() - start


def _timings(seconds: Sequence[float]) -> str:
    """How a reference's runs read in the report: before and after the one simulation, or every
    run when the simulations were repeated."""
    if len(seconds) == 2:
        return f"before {seconds[0]:.2f}, after {seconds[1]:.2f}"
    return "runs " + ", ".join(f"{s:.2f}" for s in seconds) + "; the two beside the median run count"


def interleaved_ratios(timed: Sequence[float], references: Sequence[float], workers: int) -> list[float]:
    """``timed[i]`` over the ideal of the references run just before and just after it
    (``references[i]`` and ``references[i + 1]``, their mean over ``workers``): each ratio
    against the machine's speed at the time, as its speed drifts."""
    if len(references) != len(timed) + 1:
        raise ValueError(f"{len(timed)} timed runs need {len(timed) + 1} references around them, "
                         f"got {len(references)}")
    return [t / ((before + after) / 2 / workers)
            for t, before, after in zip(timed, references[:-1], references[1:], strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=1.0, help="fraction-train")
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--max-train", type=int, default=0, help="cap per client (0 = 600)")
    parser.add_argument("--cache-clients", type=int, default=5,
                        help="clients timed for the head-cache speed-up")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    parser.add_argument("--tiny", action="store_true",
                        help="throughput of tiny clients: 1,000 FedAvg clients of one batch (10 images)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time fedrep's rounds 2..ROUNDS+1 and take their median (default: round 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="simulations, each between two reference runs; the median ratio counts")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock-ClientApp run")
    parser.add_argument("--no-usual", action="store_true", help="skip FedRep written the usual way")
    parser.add_argument("--no-flower-dispatch", action="store_true",
                        help="skip the run with Flower's own message dispatch loop")
    args = parser.parse_args()

    settings = {"num-clients": args.clients, "model": args.model, "fraction-train": args.fraction,
                "max-train-per-client": args.max_train,
                "final-finetune-epochs": 0}  # round 2 is the last: no extra fine-tune work
    if args.tiny:  # one local step per client call, evaluation on 10 images
        settings.update({"strategy": "fedavg", "num-clients": 1000 if args.clients == 100 else args.clients,
                         "max-train-per-client": 10, "max-test-per-client": 10, "batch-size": 10,
                         "local-epochs": 1})
    cfg = parse_run_config(settings)
    workers = max(1, int((os.cpu_count() or 1) // cfg.client_cpus))
    # The plain loops run before and after the simulations and count at their mean: this
    # machine's speed drifts by several percent over the minutes a run takes.
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    waited = [wait_until_quiet()]

    def quiet_reference() -> float:
        waited.append(wait_until_quiet())
        return reference_round(cfg, server_round=2)

    def quiet_parallel() -> float:
        waited.append(wait_until_quiet())
        return parallel_reference_round(settings, 2, workers)

    references, parallels = [quiet_reference()], [quiet_parallel()]
    with tempfile.TemporaryDirectory(prefix="fedrep-bench-") as tmp:
        flower_runs = []
        for repeat in range(args.repeats):
            flower_runs.append(flower_round(settings, Path(tmp), rounds=args.rounds, repeat=repeat))
            if repeat < args.repeats - 1:
                references.append(quiet_reference())
                parallels.append(quiet_parallel())
        dispatch_s = None if args.no_flower_dispatch else flower_round(settings, Path(tmp), dispatch="flower")
        stock_s = None if args.no_stock else flower_round(settings, Path(tmp), "bench.stock_clientapp:app")
        usual_s = (None if args.no_usual or cfg.strategy != "fedrep" else
                   flower_round(settings, Path(tmp), "bench.usual_clientapp:app"))
    # The last simulation's reference after it comes after the other runs (as with one repeat).
    references.append(quiet_reference())
    parallels.append(quiet_parallel())
    ratios = interleaved_ratios(flower_runs, references, workers)
    # against the plain loop in as many processes, run beside each simulation the same way
    plain_ratios = interleaved_ratios(flower_runs, parallels, 1)
    median_at = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
    flower_s = flower_runs[median_at]
    # the references beside the median run (the mean of all of them with one repeat)
    reference_s = (references[median_at] + references[median_at + 1]) / 2
    parallel_s = (parallels[median_at] + parallels[median_at + 1]) / 2
    ideal_s = reference_s / workers
    trained = len(sample_clients(cfg.seed, 2, range(cfg.num_clients), cfg.fraction_train))
    calls = trained + cfg.num_clients  # train + evaluate messages in the round
    result = {
        "strategy": cfg.strategy, "clients": cfg.num_clients, "fraction-train": cfg.fraction_train,
        "model": cfg.model, "workers": workers, "client-calls": calls,
        "reference-s": reference_s, "reference-before-after-s": references,
        "parallel-plain-before-after-s": parallels, "ideal-s": ideal_s, "flower-s": flower_s,
        "flower-over-ideal": flower_s / ideal_s, "flower-over-reference": flower_s / reference_s,
        "flower-calls-per-s": calls / flower_s, "ideal-calls-per-s": calls / ideal_s,
        "parallel-plain-s": parallel_s, "parallel-plain-over-ideal": parallel_s / ideal_s,
        "flower-over-parallel-plain": flower_s / parallel_s,
        "repeats": len(flower_runs), "flower-repeats-s": flower_runs, "references-s": references,
        "flower-over-ideal-repeats": ratios, "flower-over-parallel-plain-repeats": plain_ratios,
        "flower-over-parallel-plain-median": statistics.median(plain_ratios),
        "quiet-waits-s": waited,
    }
    if dispatch_s is not None:
        result.update({"flower-dispatch-s": dispatch_s, "flower-dispatch-over-ideal": dispatch_s / ideal_s,
                       "flower-dispatch-over-fast": dispatch_s / flower_s})
    if stock_s is not None:
        result.update({"stock-s": stock_s, "stock-over-ideal": stock_s / ideal_s,
                       "stock-over-flower": stock_s / flower_s})
    if usual_s is not None:
        result.update({"usual-s": usual_s, "usual-over-fedrep": usual_s / flower_s})
    if not args.tiny:
        plain_s, cached_s = head_cache_speedup(cfg, args.cache_clients)
        result.update({"head-cache-plain-s": plain_s, "head-cache-cached-s": cached_s,
                       "head-cache-speedup": plain_s / cached_s})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tiny_clients.json" if args.tiny else "round_overhead.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(f"one {cfg.strategy} round, {cfg.num_clients} clients (fraction {cfg.fraction_train}), "
          f"{cfg.model}, {workers} workers, {calls} client calls")
    print(f"  reference (1 process): {reference_s:8.2f} s   ({_timings(references)})")
    print(f"  ideal (/{workers} workers):   {ideal_s:8.2f} s   {calls / ideal_s:8.1f} calls/s")
    print(f"  plain loop, {workers} procs:  {parallel_s:8.2f} s   {calls / parallel_s:8.1f} calls/s   "
          f"({_timings(parallels)})")
    print(f"  Flower simulation:     {flower_s:8.2f} s   {calls / flower_s:8.1f} calls/s")
    if dispatch_s is not None:
        print(f"  Flower's dispatch:     {dispatch_s:8.2f} s   {calls / dispatch_s:8.1f} calls/s")
    if stock_s is not None:
        print(f"  stock ClientApp:       {stock_s:8.2f} s   {calls / stock_s:8.1f} calls/s")
    print(f"  Flower / ideal       = {flower_s / ideal_s:.2f}x"
          + (f"   (median of {len(ratios)}: " + ", ".join(f"{r:.2f}x" for r in ratios) + ")"
             if len(ratios) > 1 else ""))
    print(f"  Flower / reference   = {flower_s / reference_s:.2f}x")
    print(f"  plain {workers} procs / ideal = {parallel_s / ideal_s:.2f}x   (Flower / plain {workers} procs "
          f"= {flower_s / parallel_s:.2f}x" + (
              f"; median of {len(plain_ratios)}: {statistics.median(plain_ratios):.2f}x: "
              + ", ".join(f"{r:.2f}x" for r in plain_ratios) if len(plain_ratios) > 1 else "") + ")")
    print(f"  waited for an idle machine before the references: {sum(waited):.1f} s in all")
    if dispatch_s is not None:
        print(f"  Flower's dispatch / fast dispatch = {dispatch_s / flower_s:.2f}x")
    if stock_s is not None:
        print(f"  stock / ideal        = {stock_s / ideal_s:.2f}x")
        print(f"  stock / fedrep       = {stock_s / flower_s:.2f}x")
    if usual_s is not None:
        print(f"  FedRep the usual way: {usual_s:8.2f} s   {calls / usual_s:8.1f} calls/s")
        print(f"  usual way / fedrep   = {usual_s / flower_s:.2f}x")
    if "head-cache-speedup" in result:
        print(f"  head-feature cache speed-up of the local update = {result['head-cache-speedup']:.2f}x")


if __name__ == "__main__":
    main()
