"""Hand queued messages to simulated nodes in one pass over the store, not one pass per node.

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

import os
import threading
from collections.abc import Callable, Container
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.date import now

ENV_VAR = "FEDREP_DISPATCH"
TICK_S = 0.1  # Flower's interval; a phase's messages leave within one tick of being sent
_STOCK: Callable[..., None] = vce_api.add_messages_to_queue
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
        _STOCK(state, queue, nodes_mapping, f_stop)
        return
    nodes = frozenset(nodes_mapping)
    while not f_stop.is_set():
        for msg in take_undelivered(state, nodes):
            queue.put(msg)
        f_stop.wait(TICK_S)


def install() -> str:
    """Make the Simulation Runtime started after this call use the dispatcher that
    ``FEDREP_DISPATCH`` names (``fast``, the default, or ``flower``); the name used."""
    choice = os.environ.get(ENV_VAR, "fast").strip().lower() or "fast"
    if choice not in ("fast", "flower"):
        raise ValueError(f"{ENV_VAR}={choice!r}: use 'fast' (one pass per tick, the default) or "
                         "'flower' (Flower's own per-node loop), or unset it")
    vce_api.add_messages_to_queue = add_messages_to_queue if choice == "fast" else _STOCK
    return choice
