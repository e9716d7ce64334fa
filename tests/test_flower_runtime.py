"""The one-pass dispatcher hands out exactly what Flower's per-node loop hands out.

Both run against real in-memory LinkStates built the way Flower's simulation builds them, with
the same messages pushed through a real InMemoryGrid.
"""

from __future__ import annotations

import threading
import time
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedrep import flower_runtime as fast_dispatch
from fedrep.flower_runtime import take_undelivered

# partition -> messages for it, in push order; partition 2 gets two, 4 none
PUSHES = [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (2, "e"), (5, "f")]


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """Messages take their run and source from the process's task identity, as in a ServerApp."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))


def _federation(num_nodes: int = 6):
    """(state, grid, node id -> partition), as ``flwr.simulation.run_simulation`` sets them up."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(8))
    run.federation_id = NOOP_FEDERATION_ID
    run.primary_task_id = generate_rand_int_from_bytes(8)
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id = run.primary_task_id, run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    nodes = vce_api._register_nodes(num_nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def _push(grid, nodes, pushes=PUSHES, ttl: float | None = None) -> None:
    node_of = {partition: node for node, partition in nodes.items()}
    grid.push_messages([Message(RecordDict({"tag": ConfigRecord({"tag": tag})}), node_of[p], "train", ttl=ttl)
                        for p, tag in pushes])


def _tags(messages, nodes) -> list[tuple[int, str]]:
    return [(nodes[m.metadata.dst_node_id], str(m.content["tag"]["tag"])) for m in messages]


def test_same_messages_per_tick_as_flowers_loop():
    ours, stock = [], []
    state, grid, nodes = _federation()
    _push(grid, nodes)
    while batch := take_undelivered(state, frozenset(nodes)):
        ours.append(sorted(_tags(batch, nodes)))
    state, grid, nodes = _federation()
    _push(grid, nodes)
    while batch := [m for node in nodes for m in state.get_message_ins(node_id=node, limit=1)]:
        stock.append(sorted(_tags(batch, nodes)))
    assert ours == stock == [[(0, "a"), (1, "b"), (2, "c"), (3, "d"), (5, "f")], [(2, "e")]]


def test_delivered_once_and_other_nodes_left_alone():
    state, grid, nodes = _federation()
    _push(grid, nodes)
    mine = frozenset(node for node, partition in nodes.items() if partition in (0, 2))
    first = take_undelivered(state, mine)
    assert _tags(first, nodes) == [(0, "a"), (2, "c")]
    assert all(m.metadata.delivered_at for m in first)
    assert _tags(take_undelivered(state, mine), nodes) == [(2, "e")]
    assert take_undelivered(state, mine) == []
    others = frozenset(nodes) - mine
    assert sorted(_tags(take_undelivered(state, others), nodes)) == [(1, "b"), (3, "d"), (5, "f")]


def test_expired_messages_are_dropped_as_flower_drops_them():
    state, grid, nodes = _federation()
    _push(grid, nodes, [(0, "old")], ttl=0.05)
    time.sleep(0.1)
    _push(grid, nodes, [(1, "new")])
    assert _tags(take_undelivered(state, frozenset(nodes)), nodes) == [(1, "new")]
    assert len(state.message_ins_store) == 1


def test_dispatch_thread_feeds_the_worker_queue_and_stops():
    state, grid, nodes = _federation()
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=fast_dispatch.add_messages_to_queue, args=(state, queue, nodes, stop))
    thread.start()
    _push(grid, nodes)
    got = [queue.get(timeout=5) for _ in PUSHES]
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert sorted(_tags(got, nodes)) == sorted(PUSHES)


def test_install_follows_the_environment(monkeypatch):
    original = vce_api.add_messages_to_queue
    try:
        monkeypatch.setenv(fast_dispatch.ENV_VAR, "flower")
        assert fast_dispatch.install() == "flower"
        assert vce_api.add_messages_to_queue is fast_dispatch._STOCK
        monkeypatch.delenv(fast_dispatch.ENV_VAR)
        assert fast_dispatch.install() == "fast"
        assert vce_api.add_messages_to_queue is fast_dispatch.add_messages_to_queue
        monkeypatch.setenv(fast_dispatch.ENV_VAR, "quick")
        with pytest.raises(ValueError, match="FEDREP_DISPATCH='quick'.*'fast'"):
            fast_dispatch.install()
    finally:
        vce_api.add_messages_to_queue = original


def test_the_installed_flower_has_every_internal_fedrep_uses():
    """An upgrade that moves an internal fails here, not silently in the speed of every run."""
    from fedrep.flower_runtime import internals_problems

    assert internals_problems() == []


def test_a_mismatch_is_one_loud_line_and_flowers_dispatch(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]):
    from flwr.server.superlink.fleet.vce import vce_api

    problem = "_run_simulation lacks parameters ['run']"
    monkeypatch.setattr(fast_dispatch, "internals_problems", lambda: [problem])
    monkeypatch.delenv(fast_dispatch.ENV_VAR, raising=False)
    before = vce_api.add_messages_to_queue
    try:
        assert fast_dispatch.install() == "flower"
        assert vce_api.add_messages_to_queue is fast_dispatch._STOCK
    finally:
        vce_api.add_messages_to_queue = before
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no longer matches" in line and "_run_simulation lacks parameters" in line


def test_node_partitions_come_from_the_simulation_runtime(monkeypatch):
    """Installed, Flower's node registration also publishes its node -> partition mapping, the
    one each node's ``partition-id`` comes from, so the server needs no query per node."""
    original = vce_api._register_nodes
    try:
        monkeypatch.delenv(fast_dispatch.ENV_VAR, raising=False)
        fast_dispatch.install()
        assert vce_api._register_nodes is fast_dispatch._register_nodes
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        mapping = vce_api._register_nodes(num_nodes=5, state_factory=factory)
        assert sorted(mapping.values()) == list(range(5))
        assert dict(fast_dispatch.simulated_partitions()) == mapping
        with pytest.raises(TypeError):
            fast_dispatch.simulated_partitions()[1] = 2  # a read-only view
    finally:
        vce_api._register_nodes = original


def test_a_server_that_sees_nodes_mid_registration_waits_for_the_whole_mapping(monkeypatch):
    """Flower creates simulated nodes one by one and the ServerApp, already running, sees them
    as they appear. Reading the mapping then must wait for all of it: an empty answer made the
    server send hundreds of query messages in round 1 (a race seen in 1 of 4 runs)."""
    monkeypatch.delenv(fast_dispatch.ENV_VAR, raising=False)
    original = vce_api._register_nodes
    try:
        fast_dispatch.install()
        factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
        state = factory.state()
        assert factory.state() is state  # the in-memory factory hands out one state
        create = state.create_node
        seen: dict = {}

        def reader() -> None:
            seen["mapping"] = dict(fast_dispatch.simulated_partitions(wait_s=30))

        def create_slowly(*args, **kwargs):
            node = create(*args, **kwargs)
            if "thread" not in seen:  # one node exists: a server would see it now
                seen["thread"] = threading.Thread(target=reader)
                seen["thread"].start()
                time.sleep(0.3)  # the reader asks while 4 nodes are still to come
            return node

        monkeypatch.setattr(state, "create_node", create_slowly)
        mapping = vce_api._register_nodes(num_nodes=5, state_factory=factory)
        seen["thread"].join(timeout=30)
        assert seen["mapping"] == mapping and len(mapping) == 5
        # with nothing being registered there is nothing to wait for
        start = time.monotonic()
        assert dict(fast_dispatch.simulated_partitions(wait_s=30)) == mapping
        assert time.monotonic() - start < 1
    finally:
        vce_api._register_nodes = original
