"""Several messages per Ray actor call (fedrep.flower_runtime.batching): the same results as one
message a call, a client's failure stays its own, and the rules that size a call."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common.constant import ErrorCode

from conftest import fedrep_cli
from fedrep.flower_runtime.batching import (
    ENV_VAR,
    BatchedRayBackend,
    batch_limit,
    max_batch_from_env,
    run_jobs,
    take_batch,
)
from fedrep.flower_runtime.shared_content import ContentShare
from fedrep.results import RunDir, client_error_text


def _message(node: int, tag: str) -> SimpleNamespace:
    """What take_batch reads of a Message: its destination node."""
    return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node), tag=tag)


def test_take_batch_takes_distinct_idle_nodes_and_passes_over_the_rest_in_order():
    waiting: Queue = Queue()
    for node, tag in [(2, "b"), (3, "c"), (1, "d"), (4, "e"), (9, "x")]:
        waiting.put(_message(node, tag))
    # node 1 twice: its second message waits; node 9 busy (a call of it not read back yet)
    batch, passed = take_batch([_message(1, "a")], waiting, limit=10, busy={9})
    assert [m.tag for m in batch] == ["a", "b", "c", "e"] and [m.tag for m in passed] == ["d", "x"]
    assert waiting.empty()
    # passed-over messages go first, in order, once their nodes are free
    waiting.put(_message(5, "f"))
    batch, passed = take_batch(passed, waiting, limit=10, busy=set())
    assert [m.tag for m in batch] == ["d", "x", "f"] and passed == []
    # the limit: the rest stays in the queue, untouched
    for node, tag in [(6, "g"), (7, "h"), (8, "i")]:
        waiting.put(_message(node, tag))
    batch, passed = take_batch([], waiting, limit=2, busy=set())
    assert [m.tag for m in batch] == ["g", "h"] and passed == [] and waiting.qsize() == 1


def test_batch_limit_shrinks_with_the_queue():
    # 4 call slots: a call takes a quarter of an even share of what waits, between 1 and the cap
    assert [batch_limit(w, 4, 32) for w in (1, 16, 17, 100, 1000, 2000)] == [1, 1, 2, 7, 32, 32]
    assert batch_limit(1000, 4, 1) == 1 and batch_limit(1000, 0, 32) == 32
    # from SUM_GROUP (16) on, whole partial-sum groups: 25 -> 16, a FEDREP_RAY_BATCH of 24 -> 16
    assert batch_limit(200, 2, 32) == 16 and batch_limit(1000, 2, 24) == 16 and batch_limit(90, 2, 32) == 12


def test_the_cap_comes_from_the_environment_with_a_clear_error(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert max_batch_from_env() == 32
    monkeypatch.setenv(ENV_VAR, "5")
    assert max_batch_from_env() == 5
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(ValueError, match=rf"{ENV_VAR}='{bad}'.*whole number >= 1"):
            max_batch_from_env()


def test_a_failing_job_is_its_own_error_and_the_others_run():
    def app_fn():
        def app(message, context):
            if message == "bad":
                raise ValueError("bad input on partition 7")
            return f"reply to {message}"
        return app

    outcomes = run_jobs(app_fn, [("ok1", "ctx1"), ("bad", "ctx2"), ("ok2", "ctx3")])
    assert [o.reply for o in outcomes] == ["reply to ok1", None, "reply to ok2"]
    assert [o.context for o in outcomes] == ["ctx1", "ctx2", "ctx3"]
    failed = outcomes[1]
    assert failed.error_code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    # the reason Flower's backend gives (the server's client_error_text reads the client's line)
    assert failed.reason.startswith("<class 'flwr.clientapp.client_app.ClientAppException'>:<'")
    assert "Traceback" in failed.reason and client_error_text(failed.reason) == "bad input on partition 7"
    assert all(o.runtime_s >= 0 for o in outcomes)


def _run(tmp_path: Path, name: str, env: dict[str, str]) -> tuple[RunDir, str | None]:
    """A 2-round run of 40 clients whose representation (2,000 x 10 floats, 80 KB) is large
    enough to go through the object store once (shared_content.SHARE_MIN_BYTES); with the
    backend's tally ("calls largest shared") when fedrep's dispatch ran."""
    run = tmp_path / name
    proc = fedrep_cli("run", "--verbose", "--dataset", "linear-synthetic", "--model", "linear",
                      "--num-clients", "40", "--rounds", "2", "--set", "fraction-train=1.0",
                      "--set", "linear-dim=2000", "--set", "linear-rank=10",
                      "--set", "final-finetune-epochs=0", "--set", f"run-dir={run}",
                      "--client-app", "failing_clientapp:app", cwd=Path(__file__).parent,
                      env={**os.environ, **env})
    tally = re.search(rf"{BatchedRayBackend.__name__}: (\d+) messages in (\d+) actor calls \(at most (\d+)"
                      r".*; (\d+) shared contents", proc.stdout + proc.stderr)
    if tally is None:
        return RunDir(run), None
    messages, calls, largest, shared = map(int, tally.groups())
    assert messages == 2 * (40 + 40)  # train + evaluate, 2 rounds
    return RunDir(run), f"{calls} {largest} {shared}"


@pytest.mark.e2e
def test_batched_calls_give_the_one_message_a_call_result_bit_for_bit(tmp_path: Path):
    """40 clients, all trained and evaluated, partition 1 raising on every message: with several
    messages a call, with one, and with Flower's own dispatch (a copy of the model in every
    message), the same failures and the same model, bit for bit."""
    batched, batched_calls = _run(tmp_path, "batched", {ENV_VAR: "32"})
    single, single_calls = _run(tmp_path, "single", {ENV_VAR: "1"})
    stock, stock_calls = _run(tmp_path, "flower", {"FEDREP_DISPATCH": "flower"})
    assert batched_calls is not None and single_calls is not None and stock_calls is None
    calls, largest, shared = map(int, batched_calls.split())
    assert largest > 1 and calls < 160, batched_calls
    # each round's train and evaluate model went through the object store once, however sent
    assert shared == 4 and single_calls == "160 1 4", (batched_calls, single_calls)
    for run in (batched, single, stock):
        failed = {(e["partition"], e["kind"]) for e in run.read_events() if e["event"] == "client-failed"}
        assert failed == {(1, "train"), (1, "evaluate")}, failed
        assert [row["train-clients"] for row in run.read_metrics()] == [39, 39]
    ours = batched.load_checkpoint(2)
    for other in (single, stock):
        theirs = other.load_checkpoint(2)
        assert set(ours) == set(theirs)
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@dataclass
class _ContentlessMessage:
    """What an actor call reads of a Message without content (its tag rides as the error)."""

    metadata: SimpleNamespace
    tag: str

    @property
    def error(self) -> str:
        return self.tag

    def has_content(self) -> bool:
        return False


def test_a_nodes_next_message_waits_until_its_previous_call_is_read_back(monkeypatch):
    """The pipelined worker starts a node's next call only after the driver has read back the
    context its previous call left (here with Ray stubbed: calls run when read back)."""
    from fedrep.flower_runtime import batching

    monkeypatch.setattr(batching.ray, "get", lambda pending: pending)
    backend = object.__new__(batching.BatchedRayBackend)
    backend.__dict__.update(max_batch=32, _ready=Queue(), _lock=__import__("threading").Lock(),
                            _busy=batching.Counter(), _deferred=[], _idle_threads=0, _slots=2,
                            _share=ContentShare(), calls=0, messages=0, largest_call=0, _used=set(),
                            batch_limit=lambda waiting: 32)
    contexts = {7: 0, 8: 0}

    class Node:
        def __init__(self, node):
            self.node = node

        def retrieve_context(self, run_id):
            return contexts[self.node]

        def update_context(self, run_id, context):
            contexts[self.node] = context

    store = {n: Node(n) for n in contexts}

    class Actor:  # "runs" a job: the node's context + 1, read back in collect
        class run_batch:  # noqa: N801 (Ray's call syntax)
            @staticmethod
            def remote(payload):
                return [batching.Outcome(SimpleNamespace(tag=f"reply {job.error}", has_content=lambda: False),
                                         job.context + 1, 0.0) for job in pickle.loads(payload.jobs)]

    def message(node, tag):
        return _ContentlessMessage(SimpleNamespace(dst_node_id=node, run_id=1), tag)

    waiting: Queue = Queue()
    for node, tag in [(7, "x1"), (8, "y"), (7, "x2")]:
        waiting.put(message(node, tag))
    metrics = SimpleNamespace(add_clientapp_runtime=lambda s: None)
    first = backend.next_call(waiting, store, timeout=0)
    assert [m.tag for m in first.batch] == ["x1", "y"]
    pending = backend.submit(Actor, first)
    backend.finished(first)  # done on the actor, replies not read yet: x2 must not go
    assert backend.next_call(waiting, store, timeout=0) is None
    assert [r.tag for r in backend.collect(first, pending, store, metrics)] == ["reply x1", "reply y"]
    second = backend.next_call(waiting, store, timeout=0)
    assert [m.tag for m in second.batch] == ["x2"] and second.jobs[0][2] == 1  # x1's context
    assert [r.tag for r in backend.collect(second, backend.submit(Actor, second), store, metrics)] == [
        "reply x2"]
    assert contexts == {7: 2, 8: 1} and not backend._busy


@pytest.mark.e2e
def test_every_actor_is_sent_calls_however_few_cores_the_driver_has(tmp_path: Path):
    """Flower's run_api runs one worker loop per actor in a default-sized ThreadPoolExecutor,
    min(32, cores + 4) threads: actors beyond that were never sent a message (8 actors on 2
    cores used 6). With more actors than that and every training message held for a second,
    each actor must be sent calls. The round's metrics say how long each phase waited."""
    import math

    cores = os.cpu_count() or 1
    default_threads = min(32, cores + 4)
    client_cpus = math.floor(cores / (default_threads + 2) * 1000) / 1000
    proc = fedrep_cli("run", "--verbose", "--dataset", "linear-synthetic", "--model", "linear",
                      "--num-clients", str(2 * (default_threads + 2)), "--rounds", "1",
                      "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.1",
                      "--set", f"client-cpus={client_cpus}", "--set", "final-finetune-epochs=0",
                      "--set", f"run-dir={tmp_path / 'run'}", "--client-app", "slow_clientapp:app",
                      cwd=Path(__file__).parent)
    output = proc.stdout + proc.stderr
    found = re.search(r"on (\d+) actors \((\d+) sent calls\)", output)
    assert found is not None, output[-3000:]
    actors, used = map(int, found.groups())
    assert actors > default_threads and used == actors, found.group(0)
    # where the round went: waiting for the training replies (each client sleeps 1 s), for the
    # evaluation replies, and the server's own work, adding up to the round
    (row,) = RunDir(tmp_path / "run").read_metrics()
    assert 1.0 <= row["train-phase-seconds"] < row["round-seconds"]
    assert 0 < row["evaluate-phase-seconds"] < row["round-seconds"]
    parts = row["train-phase-seconds"] + row["evaluate-phase-seconds"] + row["server-seconds"]
    assert row["server-seconds"] > 0 and parts == pytest.approx(row["round-seconds"], abs=1e-6)


@pytest.mark.e2e
def test_partial_sums_on_the_actors_give_the_servers_average_bit_for_bit(tmp_path: Path):
    """FedRep with 160 clients, all trained, partition 1 failing: the actors send whole groups of
    16 as one sum (fewer bytes reach the server, the messages log says so) and the rounds' bodies
    are those of the server summing every model itself (FEDREP_PRESUM=0), bit for bit; no head
    ever left a client."""
    runs, tallies = {}, {}
    for name, env in (("presum", {}), ("server", {"FEDREP_PRESUM": "0"})):
        run = tmp_path / name
        proc = fedrep_cli("run", "--verbose", "--dataset", "linear-synthetic", "--model", "linear",
                          "--num-clients", "160", "--rounds", "2", "--set", "fraction-train=1.0",
                          "--set", "fraction-evaluate=0.1", "--set", "final-finetune-epochs=0",
                          "--set", f"run-dir={run}", "--client-app", "failing_clientapp:app",
                          cwd=Path(__file__).parent, env={**os.environ, **env})
        found = re.search(r"; (\d+) partial-sum groups summed on the actors", proc.stdout + proc.stderr)
        assert found is not None, (proc.stdout + proc.stderr)[-3000:]
        runs[name], tallies[name] = RunDir(run), int(found.group(1))
    assert tallies["server"] == 0 and tallies["presum"] > 0, tallies
    presum, server = runs["presum"], runs["server"]
    for run in (presum, server):
        assert [row["train-clients"] for row in run.read_metrics()] == [159, 159]
    received = [[row["bytes-received"] for row in run.read_metrics()] for run in (presum, server)]
    assert all(ours < theirs for ours, theirs in zip(*received, strict=True)), received
    for server_round in (1, 2):
        ours, theirs = presum.load_checkpoint(server_round), server.load_checkpoint(server_round)
        assert set(ours) == set(theirs) and all(not key.startswith("head") for key in ours)
        for key in ours:
            assert ours[key].tobytes() == theirs[key].tobytes(), (server_round, key)
    rows = [row for row in presum.read_audit() if row["kind"] == "train"]
    summed = [row for row in rows if any(name.startswith("presum/") for name in row["arrays"])]
    assert len(summed) == tallies["presum"]
    assert not any("head" in name for row in rows for name in row["arrays"])
