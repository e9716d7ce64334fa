"""Several messages per Ray actor call in a simulation, instead of Flower's one.

Why: Flower 1.41's Ray backend (``vce/backend/raybackend.py``) sends every message to a client
actor in its own ``actor.run.remote(app_fn, message, cid, context)`` call and waits for it
before taking the next message. Each call costs the driver process about 5 ms whatever the
client does: Ray's actor-call submission, and pickling its arguments, among them the ClientApp
loader function with the whole ClientApp in its closure. For clients of one batch (about 2.4 ms
of arithmetic a message) that driver work, on a core the clients need too, made a round 4.3x
its ideal, with the actors idle half of the time waiting for their next call (py-spy).

What this does instead, simulation only (a deployment's SuperNodes are untouched):

* :class:`BatchClientAppActor` receives the ClientApp loader once, when it starts, and runs a
  *list* of (message, context) jobs per call, one after the other, returning one
  :class:`Outcome` per job (its reply, or the error Flower would have made of its exception).
  Messages of one call that carry the same content object (a round's model, sent to every
  sampled node) are pickled once.
* :class:`BatchedRayBackend` (a Flower ``RayBackend``) keeps one call in flight per actor, as
  Flower does. (Two, so that an actor's next call waits queued while the driver reads the
  previous replies, gained little once calls carry many messages, and a call queued behind a
  client that hangs would wait with it: tests/test_run_folder.py's hanging client showed it.)
* :func:`worker` replaces ``vce_api.worker``: it takes up to :meth:`BatchedRayBackend.batch_limit`
  waiting messages (never two for one node in one call, so each node's context goes in
  up to date), hands them to one actor call, and puts each reply (or error reply) where
  Flower's own worker puts it. With any other backend it is Flower's worker, unchanged.

The batch limit shrinks with the queue: a quarter of an even share of the waiting messages
per call slot, at most ``FEDREP_RAY_BATCH`` (default 32; 1 is one message a call). A round of
1,000 messages on 2 actors goes out in calls of up to 32 that shrink to one message each
as it drains, so neither actor waits long for the other at the end; a federation of
at most 8 nodes on 2 actors (most tests) always goes one message per call. A client that
hangs holds up the messages behind it in its call (at most the batch limit minus one), as
a hanging client holds up its actor under Flower's backend.

``FEDREP_DISPATCH=flower`` turns this off with the rest of :mod:`fedrep.flower_runtime`.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from logging import DEBUG, ERROR
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

import numpy as np
import ray
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.common.constant import ErrorCode
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources
from flwr.supercore import log

ENV_VAR = "FEDREP_RAY_BATCH"
DEFAULT_MAX_BATCH = 32
QUEUE_SHARE = 4  # a call takes at most 1/QUEUE_SHARE of an even share of what waits
STOCK_WORKER: Callable[..., None] = vce_api.worker
STOCK_BACKEND: type[RayBackend] = RayBackend


def max_batch_from_env() -> int:
    """``FEDREP_RAY_BATCH``: the most messages one actor call may carry (default 32)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_MAX_BATCH
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_VAR}={raw!r}: give the most messages one Ray actor call may carry, a "
                         f"whole number >= 1 (1 = one message a call, as Flower does; default "
                         f"{DEFAULT_MAX_BATCH}), or unset it")
    return value


def batch_limit(waiting: int, slots: int, max_batch: int) -> int:
    """How many of ``waiting`` messages one call takes: a ``QUEUE_SHARE``-th of an even share per
    call slot (rounded up), at least 1, at most ``max_batch``."""
    share = -(-waiting // (QUEUE_SHARE * max(1, slots)))
    return max(1, min(max_batch, share))


@dataclass(frozen=True)
class Outcome:
    """What running one message gave: its reply and the node's updated context, or the error
    code and reason Flower's own worker would have put in an error reply."""

    reply: Message | None
    context: Context
    runtime_s: float
    error_code: int | None = None
    reason: str = ""


def error_reason(ex: BaseException, trace: str = "") -> str:
    """Flower's error-reply reason for ``ex`` (``<class '...'>:<'TEXT'>``), with the client's
    traceback ahead of the text, as Ray's chained error gives it under Flower's backend."""
    return f"{type(ex)}:<'{trace}{ex}'>"


def _reply_arrays(outcomes: list[Outcome]) -> Iterator[Any]:
    """Every Array in the outcomes' replies."""
    for outcome in outcomes:
        if outcome.reply is not None and outcome.reply.has_content():
            for record in outcome.reply.content.array_records.values():
                yield from record.values()


def arrays_out_of_band(outcomes: list[Outcome]) -> list[Outcome]:
    """Each reply's array bytes as zero-copy NumPy views, which Ray's serializer writes into its
    object store once (out of band) instead of copying them into the pickle stream first: a
    call of 50 one-MB models returns in 33 ms instead of 60 on this machine, and the driver
    reads them in 10 ms instead of 26. :func:`arrays_in_band` undoes it on the driver."""
    for array in _reply_arrays(outcomes):
        if isinstance(array.data, bytes):
            array.data = np.frombuffer(array.data, dtype=np.uint8)
    return outcomes


def arrays_in_band(outcomes: list[Outcome]) -> list[Outcome]:
    """The replies' array data as the ``bytes`` Flower's Array holds (one copy each, out of the
    object store's shared memory)."""
    for array in _reply_arrays(outcomes):
        if isinstance(array.data, np.ndarray):
            array.data = array.data.tobytes()
    return outcomes


def run_jobs(app_fn: Callable[[], ClientApp], jobs: Sequence[tuple[Message, Context]]) -> list[Outcome]:
    """Run each (message, context) through the ClientApp, in order; an exception becomes that
    job's error outcome, as Flower's actor and worker turn it into an error reply."""
    outcomes = []
    for message, context in jobs:
        start = time.perf_counter()
        try:
            reply = app_fn()(message=message, context=context)
            outcomes.append(Outcome(reply, context, time.perf_counter() - start))
        except LoadClientAppError as ex:
            outcomes.append(Outcome(None, context, time.perf_counter() - start,
                                    ErrorCode.LOAD_CLIENT_APP_EXCEPTION, error_reason(ex)))
        except Exception as ex:  # a client's failure is its error reply, never the whole call's
            wrapped = ClientAppException(str(ex))
            outcomes.append(Outcome(None, context, time.perf_counter() - start,
                                    ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                    error_reason(wrapped, "".join(traceback.format_exception(ex)))))
    return outcomes


@ray.remote
class BatchClientAppActor:
    """A client worker: the ClientApp loader arrives once, with the actor; each call runs a list
    of messages (:func:`run_jobs`)."""

    def __init__(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    def run_batch(self, jobs: list[tuple[Message, Context]]) -> list[Outcome]:
        return arrays_out_of_band(run_jobs(self._app_fn, jobs))


class BatchedRayBackend(STOCK_BACKEND):  # type: ignore[misc,valid-type]
    """Flower's Ray backend (same Ray start, same client resources, as many actors), with
    several messages per actor call."""

    def __init__(self, backend_config: dict[str, Any]) -> None:
        super().__init__(backend_config)
        self.max_batch = max_batch_from_env()
        self._idle: Queue[Any] = Queue()
        self._actors: list[Any] = []
        self._slots = 0
        self._tally_lock = threading.Lock()
        self.calls = self.messages = self.largest_call = 0

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        count = pool_size_from_resources(self.client_resources)
        self._actors = [BatchClientAppActor.options(**self.client_resources).remote(app_fn)  # type: ignore
                        for _ in range(count)]
        for actor in self._actors:  # one call in flight per actor (see the module docstring)
            self._idle.put(actor)
        self._slots = count
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return self._slots

    def is_worker_idle(self) -> bool:
        return not self._idle.empty()

    def batch_limit(self, waiting: int) -> int:
        """Messages the next call takes when ``waiting`` messages wait (the one in hand included)."""
        return batch_limit(waiting, self._slots, self.max_batch)

    def process_batch(self, jobs: Sequence[tuple[Message, Context]]) -> list[Outcome]:
        """Run ``jobs`` in one call on the next free actor slot; raises only if the call itself
        fails (the actor died, Ray went down), not for a client's exception."""
        with self._tally_lock:
            self.calls += 1
            self.messages += len(jobs)
            self.largest_call = max(self.largest_call, len(jobs))
        actor = self._idle.get()
        try:
            return arrays_in_band(ray.get(actor.run_batch.remote(list(jobs))))
        finally:
            self._idle.put(actor)

    def tally(self) -> str:
        """One line: how the messages went out (``fedrep run --verbose`` logs it at the end)."""
        return (f"{type(self).__name__}: {self.messages} messages in {self.calls} actor calls "
                f"(at most {self.largest_call} a call, FEDREP_RAY_BATCH={self.max_batch}) on "
                f"{len(self._actors)} actors")

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """The one-message contract of Flower's ``Backend``."""
        outcome = self.process_batch([(message, context)])[0]
        if outcome.error_code is not None:
            raise ClientAppException(outcome.reason)
        assert outcome.reply is not None
        return outcome.reply, outcome.context

    def terminate(self) -> None:
        log(DEBUG, self.tally())
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []
        ray.shutdown()


def take_batch(first: Message, waiting: Queue[Message], limit: int) -> tuple[list[Message], Message | None]:
    """``first`` and up to ``limit - 1`` more messages from ``waiting`` for distinct nodes; a
    message for a node already in the batch ends it and is given back to go first next time."""
    batch, nodes = [first], {first.metadata.dst_node_id}
    while len(batch) < limit:
        try:
            message = waiting.get_nowait()
        except Empty:
            break
        if message.metadata.dst_node_id in nodes:
            return batch, message
        batch.append(message)
        nodes.add(message.metadata.dst_node_id)
    return batch, None


def worker(messageins_queue: Queue[Message], messageres_queue: Queue[Message],
           node_info_store: dict[int, Any], backend: Any, f_stop: threading.Event, metrics: Any) -> None:
    """Drop-in for Flower's ``vce_api.worker`` (same arguments, same replies): with a
    :class:`BatchedRayBackend`, several messages per actor call; else Flower's worker."""
    if not isinstance(backend, BatchedRayBackend):
        STOCK_WORKER(messageins_queue, messageres_queue, node_info_store, backend, f_stop, metrics)
        return
    held: Message | None = None
    while not f_stop.is_set():
        if held is None:
            try:
                held = messageins_queue.get(timeout=1.0)
            except Empty:
                continue
        batch, held = take_batch(held, messageins_queue, backend.batch_limit(messageins_queue.qsize() + 1))
        for reply in _run_batch(batch, node_info_store, backend, metrics):
            reply.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's worker does
            messageres_queue.put(reply)


def _run_batch(batch: list[Message], node_info_store: dict[int, Any], backend: BatchedRayBackend,
               metrics: Any) -> list[Message]:
    """Each message's reply: the ClientApp's, or an error reply; contexts updated on success."""
    replies: dict[int, Message] = {}
    jobs: list[tuple[int, Message, Context]] = []
    for i, message in enumerate(batch):
        try:
            context = node_info_store[message.metadata.dst_node_id].retrieve_context(
                run_id=message.metadata.run_id)
            jobs.append((i, message, context))
        except Exception as ex:  # an unknown node or run: that message's error reply, as Flower's
            replies[i] = _error_reply(message, ErrorCode.UNKNOWN, error_reason(ex))
    try:
        outcomes = backend.process_batch([(message, context) for _, message, context in jobs])
    except Exception as ex:  # the call failed as a whole: each of its messages gets the error
        log(ERROR, "An exception was raised when processing a message by %s: %s",
            type(backend).__name__, traceback.format_exc())
        outcomes = [Outcome(None, context, 0.0, ErrorCode.UNKNOWN, error_reason(ex))
                    for _, _, context in jobs]
    for (i, message, _), outcome in zip(jobs, outcomes, strict=True):
        metrics.add_clientapp_runtime(outcome.runtime_s)
        if outcome.error_code is None and outcome.reply is not None:
            node_info_store[message.metadata.dst_node_id].update_context(message.metadata.run_id,
                                                                         context=outcome.context)
            replies[i] = outcome.reply
        else:
            log(ERROR, "An exception was raised when processing a message by %s: %s",
                type(backend).__name__, outcome.reason)
            replies[i] = _error_reply(message, outcome.error_code or ErrorCode.UNKNOWN, outcome.reason)
    return [replies[i] for i in range(len(batch))]


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)
