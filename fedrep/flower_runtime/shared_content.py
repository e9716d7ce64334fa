"""An actor call's messages as one pickle made ahead, with a round's model through Ray's object
store once, not once per call.

Why: every message of a phase carries the same content object (the strategy addresses one
``RecordDict`` to every sampled node), and each actor call put its jobs into Ray's object store
(``ray.put``) with that content pickled in. A ``ray.put`` always goes through the shared-memory
store: measured here, about 0.9 ms of the driver's CPU and 1.2 ms of the raylet's per call,
whatever the size, on cores the clients need (``bench/ray_call.py``), on top of pickling the model
once per call, about 55 calls a phase for 1,000 tiny clients on 2 actors. Now:

* the driver puts a content that messages share into the object store once, the first time it
  sees it repeated (:class:`ContentShare`), and the jobs carry a small :class:`SharedContent`
  handle in its place;
* the jobs are pickled into bytes when the call is prepared (ahead, while the actors work) and
  ride in the call itself, which Ray sends inline, without the store, below 100 KiB;
* each actor fetches a shared content once and keeps it (:class:`ContentCache`), so the
  ClientApp's decode cache (``clients/app.py``, by object identity) serves the whole phase.

Simulation only: a deployment's messages are untouched. A content seen once rides in its job
as before (a strategy that sends each node its own content gains nothing from the store), and
so does a small one (under :data:`SHARE_MIN_BYTES`).

As with several messages per call before, clients of one actor read one content object: a
ClientApp must not change a received message's content in place (none of fedrep's does).
"""

from __future__ import annotations

import itertools
import pickle
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import ray
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict
from flwr.app.error import Error

SHARE_MIN_BYTES = 64 * 1024  # below this a content rides inline (Ray inlines small call arguments too)
KEEP = 4  # contents the driver remembers: a round's train and evaluate ones, with room to spare
ACTOR_KEEP = 2  # contents each actor keeps: a phase reads one; every model kept costs its size per actor


@dataclass(frozen=True)
class SharedContent:
    """Stands in a job for a content in Ray's object store: the call carries its reference
    beside the pickled jobs (see :class:`Payload`)."""

    key: int  # unique in the driver's process


@dataclass(frozen=True)
class Payload:
    """What one actor call carries: its jobs pickled, and the object-store references of the
    shared contents they name, by key. The references sit inside a dict, so Ray does not
    resolve them per call: the actor fetches each once (:class:`ContentCache`)."""

    jobs: bytes
    refs: dict[int, Any]


@dataclass(frozen=True)
class Job:
    """One message as an actor call carries it: its metadata, its content (or a handle to it)
    or error, and the node's context."""

    metadata: Metadata
    content: RecordDict | SharedContent | None
    error: Error | None
    context: Context


def content_bytes(content: RecordDict) -> int:
    """The bytes of a content's arrays (what a copy of it costs)."""
    return sum(record.count_bytes() for record in content.values() if isinstance(record, ArrayRecord))


class ContentShare:
    """Driver side: which contents go to the actors by reference. Thread-safe (each actor's
    worker thread prepares its own calls). Holds the contents it remembers, so that their
    ``id`` cannot be reused by a new object while remembered."""

    def __init__(self, min_bytes: int = SHARE_MIN_BYTES, keep: int = KEEP) -> None:
        self.min_bytes, self.keep = min_bytes, keep
        self._shared: OrderedDict[int, tuple[RecordDict, SharedContent, Any]] = OrderedDict()  # + ref
        self._seen: OrderedDict[int, tuple[RecordDict, bool]] = OrderedDict()  # content, big enough
        self._serial = itertools.count(1)
        self._lock = threading.Lock()
        self.puts = 0

    def payload(self, pairs: list[tuple[Message, Context]]) -> Payload:
        """One call's payload: each content shared when it repeats within the call or was seen
        before, and is large enough; the rest pickled in. Raises what pickling raises."""
        # ids are safe here: the messages hold their contents alive for the whole call
        copies = Counter(id(m.content) for m, _ in pairs if m.has_content())
        jobs, refs = [], {}
        with self._lock:
            for message, context in pairs:
                if not message.has_content():
                    jobs.append(Job(message.metadata, None, message.error, context))
                    continue
                content, ref = self._content(message.content, copies[id(message.content)] > 1)
                if isinstance(content, SharedContent):
                    refs[content.key] = ref
                jobs.append(Job(message.metadata, content, None, context))
        return Payload(pickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL), refs)

    def _content(self, content: RecordDict, repeated: bool) -> tuple[RecordDict | SharedContent, Any]:
        """(``content`` itself, None), or (its handle, its object-store reference)."""
        key = id(content)
        shared = self._shared.get(key)
        if shared is not None and shared[0] is content:
            self._shared.move_to_end(key)
            return shared[1], shared[2]
        seen = self._seen.get(key)
        if seen is None or seen[0] is not content:
            seen = (content, content_bytes(content) >= self.min_bytes)
            _remember(self._seen, key, seen, self.keep)
            if not repeated:
                return content, None
        if not seen[1]:
            return content, None
        handle, ref = SharedContent(next(self._serial)), ray.put(content)
        self.puts += 1
        _remember(self._shared, key, (content, handle, ref), self.keep)
        return handle, ref


class ContentCache:
    """Actor side: the shared contents fetched so far, newest kept, each fetched once."""

    def __init__(self, keep: int = ACTOR_KEEP) -> None:
        self.keep = keep
        self._contents: OrderedDict[int, RecordDict] = OrderedDict()
        self.fetches = 0

    def jobs(self, payload: Payload) -> list[tuple[Message, Context]]:
        """The (message, context) pairs a call's payload stands for, each message as unpickling
        a sent Message would give it."""
        pairs = []
        for job in pickle.loads(payload.jobs):
            content = job.content
            if isinstance(content, SharedContent):
                content = self._fetch(content.key, payload.refs[content.key])
            pairs.append((rebuild_message(job.metadata, content, job.error), job.context))
        return pairs

    def _fetch(self, key: int, ref: Any) -> RecordDict:
        cached = self._contents.get(key)
        if cached is None:
            cached = ray.get(ref)
            self.fetches += 1
            _remember(self._contents, key, cached, self.keep)
        else:
            self._contents.move_to_end(key)
        return cached


def rebuild_message(metadata: Metadata, content: RecordDict | None, error: Error | None) -> Message:
    """A Message with these parts, built as unpickling builds one (``Message.__init__`` would
    reset ``metadata.delivered_at`` and re-check what the driver already checked);
    ``flower_runtime.internals_problems`` checks that Flower 1.41's layout still holds."""
    message = Message.__new__(Message)
    message.__dict__.update(_metadata=metadata, _content=content, _error=error)
    return message


def message_layout_problem() -> str | None:
    """Why :func:`rebuild_message` would not match this Flower's Message, or None."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=60.0, message_type="train")
    probe = Message(RecordDict(), metadata=metadata)
    if set(vars(probe)) != {"_metadata", "_content", "_error"}:
        return f"Message keeps {sorted(vars(probe))}, not _metadata/_content/_error"
    rebuilt = rebuild_message(probe.metadata, probe.content, None)
    if rebuilt.metadata is not probe.metadata or rebuilt.content is not probe.content or rebuilt.has_error():
        return "a Message rebuilt from its parts does not read them back"
    return None


def _remember(cache: OrderedDict, key: int, value: Any, keep: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > keep:
        cache.popitem(last=False)
