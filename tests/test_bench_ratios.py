"""bench/: round_overhead.py's interleaved ratios; gpu_round.py's and gpu_simulation.py's CPU side and
their refusal without a GPU; ray_call.py's table."""

import os
import sys
from pathlib import Path

import pytest

from bench.round_overhead import busy_fraction, interleaved_ratios, wait_until_quiet


def test_each_run_is_divided_by_the_ideal_of_the_references_around_it() -> None:
    # references 6, 4, 8 s on 2 workers: ideals 2.5 s (between 6 and 4) and 3 s (between 4 and 8)
    assert interleaved_ratios([5.0, 3.0], [6.0, 4.0, 8.0], workers=2) == [2.0, 1.0]


def test_one_run_uses_the_mean_of_before_and_after() -> None:
    assert interleaved_ratios([4.31], [5.5, 5.0], workers=2) == [pytest.approx(4.31 / 2.625)]


def test_references_must_surround_every_run() -> None:
    with pytest.raises(ValueError, match="2 timed runs need 3 references"):
        interleaved_ratios([1.0, 2.0], [1.0, 2.0], workers=2)


def test_gpu_round_times_the_client_work_on_the_cpu(tmp_path) -> None:
    """bench/gpu_round.py's CPU side: real worker processes, real CIFAR-10-format files."""
    from bench.gpu_round import settings_for, timed_round
    from tests.fixtures_cifar import write_cifar_folder

    write_cifar_folder(tmp_path, "cifar10", per_batch=100)
    row = timed_round(settings_for(str(tmp_path), clients=4, fraction=0.5), "cpu", workers=1)
    assert row["device"] == "cpu" and row["workers"] == 1
    assert 0 < row["seconds"] < 60
    assert "gpu-utilisation-mean" not in row


def test_gpu_round_refuses_cuda_without_a_gpu() -> None:
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_round.py"
    done = subprocess.run([sys.executable, str(script), "--devices", "cuda"], capture_output=True, text=True)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr


def test_gpu_round_reports_a_failing_worker_instead_of_waiting(tmp_path) -> None:
    from bench.gpu_round import settings_for, timed_round
    from tests.fixtures_cifar import write_cifar_folder

    write_cifar_folder(tmp_path, "cifar10", per_batch=2)  # a class with no test image
    with pytest.raises(RuntimeError, match="worker failed: worker 0: PartitionError: .* no test images"):
        timed_round(settings_for(str(tmp_path), clients=4, fraction=0.5), "cpu", workers=1)


def test_ray_call_reports_the_driver_and_raylet_cost_of_each_way_of_sending_jobs(tmp_path) -> None:
    """bench/ray_call.py on a real private Ray: a row per reply size and way of sending the jobs."""
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "ray_call.py"
    out = tmp_path / "ray_call.json"
    done = subprocess.run([sys.executable, str(script), "--calls", "20", "--sizes", "0", "300000",
                           "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["reply_bytes"], r["jobs"]) for r in rows] == [
        (0, "ray.put"), (0, "in the call"), (300000, "ray.put"), (300000, "in the call")]
    assert all(r["wall_ms"] > 0 and r["driver_cpu_ms"] >= 0 and r["raylet_cpu_ms"] >= 0 for r in rows)


def test_the_references_wait_for_an_idle_machine_but_not_forever() -> None:
    """A busy machine (a thread spinning here) is seen as busy; the wait gives up at its bound."""
    import os
    import threading
    import time

    busy = busy_fraction(0.2)
    if busy is None:
        pytest.skip("no /proc/stat here")
    assert 0.0 <= busy <= 1.0
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        one_core = 1 / (os.cpu_count() or 1)
        assert busy_fraction(0.3) > 0.6 * one_core  # one core spins
        start = time.monotonic()
        waited = wait_until_quiet(max_s=1.0, busy_below=0.6 * one_core, window_s=0.2)
        assert 1.0 <= waited < 3.0 and time.monotonic() - start < 3.0
    finally:
        stop.set()
        spinner.join()


def test_process_cpu_counts_only_the_processes_under_its_own_run() -> None:
    """Another run's raylet on the machine (as under pytest -n 2) is not counted: the tree is."""
    import os
    import signal
    import subprocess
    import time

    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    from bench.process_cpu import descendants, parent_pid, process_seconds

    # a run: a parent with a grandchild named like a raylet; beside it, an unrelated "raylet"
    run = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, "
                            "'-c', 'import time; time.sleep(30)', 'raylet/' + 'raylet'])"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "raylet/raylet"])
    try:
        deadline = time.monotonic() + 20
        while len(descendants(str(run.pid))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = descendants(str(run.pid))
        assert str(run.pid) in tree and str(other.pid) not in tree and len(tree) == 2
        (child,) = tree - {str(run.pid)}
        assert parent_pid(child) == str(run.pid)
        counted = process_seconds(str(run.pid))
        assert set(counted) == {child} and counted[child][0] == "raylet"
        os.kill(int(child), signal.SIGKILL)
    finally:
        for proc in (other, run):
            proc.kill()
        for proc in (other, run):
            proc.wait()


@pytest.mark.e2e
def test_process_cpu_counts_each_process_of_real_runs_per_variant(tmp_path) -> None:
    """bench/process_cpu.py: two variants of this tree, real simulations, CPU from /proc."""
    import json
    import subprocess

    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(root / "bench" / "process_cpu.py"), str(root),
                           f"{root},FEDREP_RAY_BATCH=1", "--pairs", "1", "--rounds", "5",
                           "--set", "dataset=linear-synthetic", "--set", "model=linear",
                           "--set", "num-clients=40", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["means"]) == [str(root), f"{root},FEDREP_RAY_BATCH=1"]
    for mean in result["means"].values():
        assert set(mean) == {"round-s", "actor", "driver", "raylet", "gcs"}
        assert mean["round-s"] > 0 and mean["actor"] + mean["driver"] > 0
    assert "round" in done.stdout and "of the first" in done.stdout


@pytest.mark.e2e
def test_scale_bench_times_both_federations_and_checks_what_each_round_served(tmp_path) -> None:
    """bench/scale.py on real simulations: 50 clients at 20% against 10 at 100% (10 a round
    either way); memory and seconds per round of each, and every round served all 10."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "scale.py"), "--clients", "50",
                           "--fraction", "0.2", "--rounds", "2", "--dataset", "linear-synthetic",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    big, small = json.loads((tmp_path / "scale-linear-synthetic-50.json").read_text())
    assert (big["clients"], small["clients"]) == (50, 10)
    for run in (big, small):
        assert run["sampled-per-round"] == 10 and run["rounds"] == 2
        assert run["served-per-round"] == [{"train-clients": 10, "train-failures": 0,
                                            "eval-clients": 10, "eval-failures": 0}] * 2
        assert run["peak-memory-bytes"] > 0 and all(s > 0 for s in run["seconds-per-round"])
        assert run["final-loss-mean"] is not None
    assert "seconds per round" in done.stdout and "peak memory" in done.stdout


def test_pool_runs_gives_each_runs_median_and_the_pooled_verdict(tmp_path) -> None:
    """bench/pool_runs.py: per-run medians and the pooled median against hand-worked values; a run
    without the plain-loop ratios only counts for the ratio it has; a wrong file is named."""
    import json
    import subprocess

    from bench.pool_runs import pooled

    runs = [{"simulation-commit": "aaa", "flower-over-ideal-repeats": [1.2, 1.6, 1.4]},
            {"simulation-commit": "bbb", "flower-over-ideal-repeats": [1.5, 1.9],
             "flower-over-parallel-plain-repeats": [1.1, 1.3]}]
    ideal = pooled(runs, "flower-over-ideal-repeats", 1.5)
    assert [r["median"] for r in ideal["runs"]] == [1.4, 1.7]
    assert ideal["pooled-median"] == 1.5 and ideal["count"] == 5 and ideal["at-or-under-target"] == 3
    plain = pooled(runs, "flower-over-parallel-plain-repeats", 1.5)
    assert [r["commit"] for r in plain["runs"]] == ["bbb"] and plain["pooled-median"] == pytest.approx(1.2)
    assert pooled(runs[:1], "flower-over-parallel-plain-repeats", 1.5) is None

    script = Path(__file__).resolve().parents[1] / "bench" / "pool_runs.py"
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": runs}))
    cmd = [sys.executable, str(script), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "run 2 (bbb): median 1.70x" in done.stdout
    assert "pooled: median 1.500x of 5 (range 1.20-1.90); 3 of 5 at or under 1.5x" in done.stdout
    # one code change's runs alone, numbered as in the file
    done = subprocess.run(cmd + ["--from-run", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "run 2 (bbb): median 1.70x" in done.stdout and "run 1 (aaa)" not in done.stdout
    assert "pooled: median 1.700x of 2 (range 1.50-1.90); 1 of 2 at or under 1.5x" in done.stdout
    path.write_text("[]")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a runs file" in done.stderr


def test_gpu_simulation_summarises_the_samples_inside_the_timed_rounds() -> None:
    """Cores busy = tree CPU seconds per wall second between the first and last sample inside the
    window; GPU utilisation is the mean and memory the peak of those samples alone."""
    from bench.gpu_simulation import DeviceSampler

    sampler = DeviceSampler(root=1, gpu=False)
    sampler.samples = [(0.0, 1.0, 100, 9 * 2**30),  # before the window: not counted
                       (1.0, 2.0, 90, 2 * 2**30), (2.0, 5.0, 60, 4 * 2**30), (3.0, 8.0, 30, 3 * 2**30),
                       (4.0, 50.0, 0, 8 * 2**30)]  # after it
    summary = sampler.window(1.0, 3.0)
    assert summary["samples"] == 3
    assert summary["cpu-cores-busy"] == pytest.approx((8.0 - 2.0) / (3.0 - 1.0))
    assert summary["gpu-utilisation-mean"] == pytest.approx(60.0)
    assert summary["gpu-memory-peak-gib"] == pytest.approx(4.0)
    assert DeviceSampler(root=None, gpu=False).window(0.0, 1.0) == {"samples": 0}


def test_gpu_simulation_report_gives_each_gpu_share_as_a_speed_ratio_to_the_cpu_run() -> None:
    from bench.gpu_simulation import clients_at_a_time, report

    line = ("[fedrep] private local Ray: 1 node, 16 CPUs, 1 GPUs; client-cpus=1 client-gpus=0.25 "
            "-> 4 clients at a time")
    assert clients_at_a_time(line) == 4 and clients_at_a_time("no such line") is None
    cpu = {"client-gpus": 0.0, "clients-at-a-time": 16, "round-seconds-median-after-first": 9.0,
           "round-1-seconds": 20.0, "cpu-cores-busy": 5.5}
    gpu = {"client-gpus": 0.25, "clients-at-a-time": 4, "round-seconds-median-after-first": 6.0,
           "round-1-seconds": 19.0, "cpu-cores-busy": 3.5, "gpu-utilisation-mean": 94.0,
           "gpu-memory-peak-gib": 6.1}
    cpu_line, gpu_line = report([cpu, gpu])
    assert "CPU only" in cpu_line and "16 at a time" in cpu_line and "x the CPU" not in cpu_line
    assert "client-gpus 0.25" in gpu_line and "GPU busy  94.0%" in gpu_line
    assert "1.50x the CPU run" in gpu_line


def test_gpu_simulation_refuses_a_gpu_share_without_a_gpu() -> None:
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_simulation.py"
    done = subprocess.run([sys.executable, str(script), "--client-gpus", "0", "0.25"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "no CUDA device here" in done.stderr


@pytest.mark.e2e
def test_gpu_simulation_times_the_paper_cifar10_rounds_through_fedrep_run_on_cpus(tmp_path) -> None:
    """bench/gpu_simulation.py's CPU run, as CI can run it: a real ``fedrep run`` on
    CIFAR-10-format files, every round trained and evaluated as sampled, its process tree's CPU
    sampled between the end of round 1 and the end of the last."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_simulation.py"), "--client-gpus", "0",
                           "--clients", "20", "--per-batch", "500", "--rounds", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads((tmp_path / "gpu_simulation.json").read_text())
    (run,) = result["runs"]
    assert run["client-gpus"] == 0 and run["rounds"] == 3 and len(run["round-seconds"]) == 3
    assert run["clients-at-a-time"] == min(20, os.cpu_count() or 1)
    assert run["samples"] > 0 and 0 < run["cpu-cores-busy"] <= (os.cpu_count() or 1) + 0.5
    assert "gpu-utilisation-mean" not in run
    phases = run["phases-median-after-first"]
    assert set(phases) == {"train-phase-seconds", "evaluate-phase-seconds", "server-seconds"}
    assert phases["train-phase-seconds"] > 0 and sum(phases.values()) <= max(run["round-seconds"][1:]) + 1e-6
    assert result["cpus"]["os-cpu-count"] == os.cpu_count()
    assert "CPU only" in done.stdout and "s/round" in done.stdout and "[train " in done.stdout
    assert (tmp_path / "gpu_simulation-0.log").read_text().count("round ") >= 3


def test_offline_wheels_prunes_the_named_parts_and_their_record_lines(tmp_path) -> None:
    """bench/offline_wheels.py's rewrite of Ray's wheel: the members under the dropped folders go,
    with their RECORD lines; every other member and line stays, byte for byte."""
    import zipfile

    from bench.offline_wheels import prune_wheel

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    kept = {"pkg/__init__.py": b"x = 1\n", "pkg/core/bin": bytes(range(256)) * 40}
    record = b"pkg/__init__.py,sha256=a,6\npkg/core/bin,sha256=b,10240\npkg/jars/big.jar,sha256=c,4\n"
    with zipfile.ZipFile(wheel, "w") as out:
        members = {**kept, "pkg/jars/big.jar": b"java" * 1000, "pkg-1.0.dist-info/RECORD": record}
        for name, data in members.items():
            out.writestr(name, data)
    before, after = prune_wheel(wheel, ("pkg/jars/",))
    assert after < before
    with zipfile.ZipFile(wheel) as pruned:
        assert sorted(pruned.namelist()) == sorted([*kept, "pkg-1.0.dist-info/RECORD"])
        assert all(pruned.read(name) == data for name, data in kept.items())
        assert pruned.read("pkg-1.0.dist-info/RECORD").split(b"\n") == record.split(b"\n")[:2] + [b""]
