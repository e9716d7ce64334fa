"""Every use of Flower's *internals* (anything outside its public API), in one module.

Three things fedrep needs are not public in Flower 1.41: starting the Simulation Runtime in this
process with our own Ray and run object (:func:`run_simulation`, which wires
``flwr.simulation.run_simulation._run_simulation``), a faster hand-off of messages to the
simulated nodes (below), and which simulated node holds which partition
(:func:`simulated_partitions`: the ServerApp runs in this process and would otherwise send every
node a query message in round 1, 100,000 Ray calls in a 100,000-client federation).
:func:`internals_problems` checks, before a simulation starts, that the
installed Flower still has every internal these rely on; a mismatch is one loud warning line
(the fast dispatch is then off, and says so) rather than a silent fallback, and
``tests/test_flower_runtime.py`` fails on it, so an upgrade cannot lose the speed-up unnoticed.

Hand queued messages to simulated nodes in one pass over the store, not one pass per node.

Flower 1.41's Simulation Runtime moves messages from its in-memory LinkState to the Ray workers
in a thread (``vce_api.add_messages_to_queue``) that, every 0.1 s, asks the state for each
node's next message, and each ask scans and re-validates every stored message. That is
nodes x messages validations per tick whether or not anything is waiting: 10,000 for a
100-client round, which kept the driver process at ~14% of a core. The driver runs at nice 0
and Ray's workers at nice 15, so that time came straight out of the clients' training; at
10,000 nodes the same loop needs 10^8 validations per tick and saturates a core.

This replacement does what ``get_message_ins(node, limit=1)`` does for every node at once: it
picks, in arrival order, at most one undelivered message per simulated node, lets Flower's own
check drop expired or out-of-federation ones, and marks the rest delivered. One scan per tick.
Any other LinkState (a future Flower's, say) gets Flower's loop unchanged, and so does every run
with ``FEDREP_DISPATCH=flower`` in the environment (to compare, or to rule this out).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections.abc import Callable, Container, Mapping
from pathlib import Path
from queue import Empty, Queue
from types import MappingProxyType
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

ENV_VAR = "FEDREP_DISPATCH"
TICK_S = 0.1  # Flower's interval; a phase's messages leave within one tick of being sent
_STOCK: Callable[..., None] = vce_api.add_messages_to_queue
_STOCK_STORE: Callable[..., None] = vce_api.put_message_into_state
# Set when the ServerApp of this process has pushed messages: the dispatch loop looks at once
# instead of at its next 0.1 s tick. Never set in a deployment.
_pushed = threading.Event()
# How many replies of simulated nodes this process has stored in its LinkState, ever: the
# server pulls once when all it waits for are in (:func:`wait_for_replies`), not after every
# burst (each pull re-validates every awaited message: 0.36 s of driver CPU a round of 1,000
# tiny clients, on cores the clients need). Never counts in a deployment.
_stored = 0
_stored_changed = threading.Condition()
_STOCK_REGISTER: Callable[..., dict[int, int]] | None = getattr(vce_api, "_register_nodes", None)
_simulated_nodes: dict[int, int] = {}  # node id -> partition id of the newest simulation here
_registered = threading.Event()  # cleared while simulated nodes are being registered here
_registered.set()
REGISTRATION_WAIT_S = 300.0  # registering 100,000 nodes takes seconds; a bound, not an expected wait
_INTERNALS = ("lock", "message_ins_store", "_check_stored_messages")


def take_undelivered(state: InMemoryLinkState, nodes: Container[int]) -> list[Message]:
    """At most one undelivered message per node in ``nodes``, oldest first, now marked delivered."""
    with state.lock:
        waiting = [(msg_id, msg.metadata.dst_node_id) for msg_id, msg in state.message_ins_store.items()
                   if msg.metadata.delivered_at == "" and msg.metadata.dst_node_id in nodes]
        if not waiting:
            return []
        state._check_stored_messages({msg_id for msg_id, _ in waiting})  # drops expired ones
        taken: list[Message] = []
        served: set[int] = set()
        for msg_id, node in waiting:
            msg = state.message_ins_store.get(msg_id)
            if msg is not None and node not in served:
                served.add(node)
                taken.append(msg)
        delivered_at = now().isoformat()
        for msg in taken:
            msg.metadata.delivered_at = delivered_at
        return taken


def add_messages_to_queue(state: Any, queue: Queue[Message], nodes_mapping: dict[int, int],
                          f_stop: threading.Event) -> None:
    """Drop-in for Flower's ``vce_api.add_messages_to_queue`` (same arguments, same contract)."""
    if not (isinstance(state, InMemoryLinkState) and all(hasattr(state, a) for a in _INTERNALS)):
        print(f"fedrep: warning: the simulation's LinkState is a {type(state).__name__}, not the "
              "InMemoryLinkState the fast dispatch knows; using Flower's own dispatch (slower)",
              file=sys.stderr, flush=True)
        _STOCK(state, queue, nodes_mapping, f_stop)
        return
    nodes = frozenset(nodes_mapping)
    while not f_stop.is_set():
        for msg in take_undelivered(state, nodes):
            queue.put(msg)
        if _pushed.wait(TICK_S):  # cleared before the next take, so no push goes unseen
            _pushed.clear()


def notify_pushed() -> None:
    """The ServerApp pushed messages: the simulation's dispatch loop should look now."""
    _pushed.set()


def put_message_into_state(state: Any, queue: Queue[Message], f_stop: threading.Event) -> None:
    """Flower's ``vce_api.put_message_into_state`` (store each reply of a simulated node in the
    LinkState), which also counts the reply for :func:`wait_for_replies`."""
    global _stored
    while not f_stop.is_set():
        try:
            reply = queue.get(timeout=1.0)
        except Empty:
            continue
        state.store_message_res(reply)
        with _stored_changed:
            _stored += 1
            _stored_changed.notify_all()


def replies_stored() -> int:
    """How many replies of simulated nodes this process has stored so far (0 in a deployment)."""
    return _stored


def batched_workers() -> bool:
    """Whether this process runs its simulations with fedrep's dispatch and Ray workers (the
    ones that can pre-sum a train round's groups, :mod:`fedrep.flower_runtime.presum`): False in
    a deployment's ServerApp, whose SuperNodes never do, so the server does not send them the
    round's sample for nothing."""
    return vce_api.put_message_into_state is put_message_into_state


def wait_for_replies(target: int, interval: float) -> bool:
    """Sleep until :func:`replies_stored` reaches ``target``, or ``interval`` seconds; whether to
    pull now: the target was reached, or this process does not count replies (a deployment's
    ServerApp, or Flower's own store loop), so that only a pull can tell. Read the count before
    a pull and wait for it plus the replies still missing after that pull: a reply stored
    meanwhile can then only wake the server early (one more pull), never late."""
    with _stored_changed:
        reached = _stored_changed.wait_for(lambda: _stored >= target, timeout=interval)
    return reached or vce_api.put_message_into_state is not put_message_into_state


def _register_nodes(num_nodes: int, state_factory: Any) -> dict[int, int]:
    """Flower's ``vce_api._register_nodes``, which also gives the mapping it builds (node id ->
    partition id, the ``partition-id`` each node's ``node_config`` gets) to
    :func:`simulated_partitions`."""
    assert _STOCK_REGISTER is not None
    _registered.clear()  # before the first node exists: whoever sees a node waits for the mapping
    try:
        _simulated_nodes.clear()
        _simulated_nodes.update(_STOCK_REGISTER(num_nodes, state_factory))
    finally:
        _registered.set()
    return dict(_simulated_nodes)


def simulated_partitions(wait_s: float = REGISTRATION_WAIT_S) -> Mapping[int, int]:
    """Node id -> partition id of the simulated nodes of the newest simulation started in this
    process (empty in a deployment, or when Flower's internals changed): the answer a ``query``
    message would get from each of them, without the message. A read-only view, not a copy.

    While this process is registering simulated nodes, waits (up to ``wait_s`` s) for the
    whole mapping: Flower creates the nodes one by one, and the ServerApp, already running,
    sees them as they appear; reading the mapping then would find it empty and send hundreds
    of query messages in round 1 (it did, in some runs: a race)."""
    _registered.wait(wait_s)
    return MappingProxyType(_simulated_nodes)


def install() -> str:
    """Make the Simulation Runtime started after this call use the dispatcher that
    ``FEDREP_DISPATCH`` names (``fast``, the default, or ``flower``); the name used. When the
    installed Flower no longer has what the fast dispatch relies on, it stays off, with one
    warning line on stderr, and ``"flower"`` is returned."""
    # Ray only here: a deployment's ServerApp imports this module (the wake events, the pull
    # interval) and its images have no Ray, which simulation alone needs.
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedrep.flower_runtime import batching

    choice = os.environ.get(ENV_VAR, "fast").strip().lower() or "fast"
    if choice not in ("fast", "flower"):
        raise ValueError(f"{ENV_VAR}={choice!r}: use 'fast' (one pass per tick, the default) or "
                         "'flower' (Flower's own per-node loop), or unset it")
    problems = internals_problems() if choice == "fast" else []
    if problems:
        print(f"fedrep: warning: the installed Flower {flwr_version()} no longer matches what fedrep's fast "
              f"message dispatch expects ({'; '.join(problems)}); using Flower's own dispatch, rounds "
              "will be slower. Install flwr 1.41.* or report this.", file=sys.stderr, flush=True)
        choice = "flower"
    vce_api.add_messages_to_queue = add_messages_to_queue if choice == "fast" else _STOCK
    if choice == "fast":
        batching.max_batch_from_env()  # a bad FEDREP_RAY_BATCH fails here, before Ray starts
    vce_api.put_message_into_state = put_message_into_state if choice == "fast" else _STOCK_STORE
    vce_api.worker = batching.worker if choice == "fast" else batching.STOCK_WORKER
    vce_api.ThreadPoolExecutor = batching.WorkerThreadPool if choice == "fast" else batching.STOCK_THREAD_POOL
    raybackend.RayBackend = batching.BatchedRayBackend if choice == "fast" else batching.STOCK_BACKEND
    if _STOCK_REGISTER is not None and list(inspect.signature(_STOCK_REGISTER).parameters) == [
            "num_nodes", "state_factory"]:
        vce_api._register_nodes = _register_nodes
    else:
        print(f"fedrep: warning: the installed Flower {flwr_version()} has no vce_api._register_nodes"
              "(num_nodes, state_factory); the server will ask every simulated node its partition "
              "in round 1 (slower for big federations)", file=sys.stderr, flush=True)
    return choice


# What Flower's own HttpGrid.send_and_receive sleeps between pulls on a deployment (hard-coded
# there); the in-memory grid of a simulation carries its own pull_interval (0.1 s).
DEPLOYED_PULL_INTERVAL = 3.0


def pull_interval(grid: Any) -> float:
    """Seconds between two pulls while waiting for replies, as Flower's own grid would wait."""
    return grid.pull_interval if isinstance(grid, InMemoryGrid) else DEPLOYED_PULL_INTERVAL


def flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


# What the simulation wiring passes to Flower's private _run_simulation.
RUN_SIMULATION_PARAMETERS = ("num_supernodes", "exit_event", "server_app_attr", "client_app_attr",
                             "backend_name", "backend_config", "server_app_context", "app_dir", "run",
                             "verbose_logging", "is_app")


def internals_problems() -> list[str]:
    """What the installed Flower lacks of the internals this module uses; [] when all is there."""
    import importlib

    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    from fedrep.flower_runtime import batching  # imports Ray: simulation only (see install)
    from fedrep.flower_runtime.shared_content import message_layout_problem

    problems = []
    params = getattr(vce_api, "add_messages_to_queue", None)
    if params is None or list(inspect.signature(_STOCK).parameters)[:4] != [
            "state", "queue", "nodes_mapping", "f_stop"]:
        problems.append("vce_api.add_messages_to_queue(state, queue, nodes_mapping, f_stop) changed")
    init = inspect.getsource(InMemoryLinkState.__init__)  # instance attributes: set in __init__
    missing = [a for a in ("lock", "message_ins_store")
               if f"self.{a} " not in init and f"self.{a}:" not in init]
    if missing or not hasattr(InMemoryLinkState, "_check_stored_messages"):
        problems.append(f"InMemoryLinkState lacks {missing or ['_check_stored_messages']}")
    # (the package attribute run_simulation is a function that shadows the module of that name)
    run_sim = getattr(importlib.import_module("flwr.simulation.run_simulation"), "_run_simulation", None)
    if run_sim is None:
        problems.append("flwr.simulation.run_simulation._run_simulation is gone")
    else:
        absent = [p for p in RUN_SIMULATION_PARAMETERS if p not in inspect.signature(run_sim).parameters]
        if absent:
            problems.append(f"_run_simulation lacks parameters {absent}")
    if not hasattr(Run, "create_empty") or not all(a in vars(type(TaskIdentity)) or a in vars(TaskIdentity)
                                                  for a in ("task_id", "run_id", "node_id")):
        problems.append("Run.create_empty or TaskIdentity changed")
    if list(inspect.signature(_STOCK_STORE).parameters) != ["state", "queue", "f_stop"]:
        problems.append("vce_api.put_message_into_state(state, queue, f_stop) changed")
    if list(inspect.signature(batching.STOCK_WORKER).parameters) != [
            "messageins_queue", "messageres_queue", "node_info_store", "backend", "f_stop", "metrics"]:
        problems.append("vce_api.worker(messageins_queue, messageres_queue, node_info_store, backend, "
                        "f_stop, metrics) changed")
    if "ThreadPoolExecutor()" not in inspect.getsource(vce_api.run_api):
        problems.append("vce_api.run_api no longer starts its workers in a ThreadPoolExecutor()")
    layout = message_layout_problem()
    if layout is not None:
        problems.append(layout)
    backend_source = inspect.getsource(batching.STOCK_BACKEND.__init__)
    if "self.client_resources " not in backend_source or "from .backend.raybackend import RayBackend" \
            not in inspect.getsource(vce_api.start_vce):
        problems.append("RayBackend.client_resources, or start_vce's RayBackend import, changed")
    return problems


def run_simulation(run_config: dict[str, Any], num_supernodes: int, server_app: str, client_app: str,
                   backend_config: dict[str, Any], app_dir: Path, verbose: bool) -> None:
    """Flower's Simulation Runtime, in this process, on the Ray instance already started: what
    ``flwr run`` does in a subprocess, without a SuperLink, so that ``fedrep run`` keeps the
    run's context (Ctrl-C, SIGTERM, the run-folder lock) and starts in seconds."""
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    run = Run.create_empty(run_id=generate_rand_int_from_bytes(8))
    run.primary_task_id = generate_rand_int_from_bytes(8)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=dict(run_config))
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr=server_app,
        client_app_attr=client_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        verbose_logging=verbose,
        is_app=True,
    )
