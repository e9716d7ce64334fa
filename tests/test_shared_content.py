"""A content that many messages carry goes through the object store once, and each actor fetches
it once (fedrep.flower_runtime.shared_content). Ray's store is stood in for by a dict here;
tests/test_flower_batching.py runs the real thing against Flower's own dispatch, bit for bit."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedrep.flower_runtime import shared_content
from fedrep.flower_runtime.shared_content import (
    ContentCache,
    ContentShare,
    SharedContent,
    message_layout_problem,
    rebuild_message,
)


@pytest.fixture
def store(monkeypatch) -> dict:
    """ray.put / ray.get on a dict; the dict counts what was put."""
    objects: dict = {}

    def put(value):
        ref = f"ref-{len(objects)}"
        objects[ref] = pickle.dumps(value)  # what crosses to the actor is a copy
        return ref

    monkeypatch.setattr(shared_content.ray, "put", put)
    monkeypatch.setattr(shared_content.ray, "get", lambda ref: pickle.loads(objects[ref]))
    return objects


def _model(seed: int, floats: int = 600) -> RecordDict:
    values = np.random.default_rng(seed).standard_normal(floats).astype(np.float32)
    return RecordDict({"arrays": ArrayRecord({"w": Array(values)}), "config": ConfigRecord({"round": 3})})


def _message(content: RecordDict, node: int) -> Message:
    metadata = Metadata(run_id=7, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="3", created_at=1.0, ttl=60.0, message_type="train")
    message = Message(content, metadata=metadata)
    message.metadata.delivered_at = "2026-12-04T12:00:00"  # set at dispatch; the actor sees it as sent
    return message


def _context(node: int) -> Context:
    return Context(run_id=7, node_id=node, node_config={"partition-id": node}, state=RecordDict(),
                   run_config={"seed": 1})


def _weights(message: Message) -> np.ndarray:
    return message.content["arrays"]["w"].numpy()


def test_a_repeated_large_content_goes_through_the_store_once_and_each_actor_fetches_it_once(store):
    share = ContentShare(min_bytes=1000)  # the models here: 2,400 bytes of floats
    model, own, config = _model(0), _model(1), RecordDict({"config": ConfigRecord({"round": 3})})
    first = [_message(model, 1), _message(model, 2), _message(own, 3), _message(config, 4),
             _message(config, 5)]
    payload = share.payload([(m, _context(m.metadata.dst_node_id)) for m in first])
    assert share.puts == 1 and len(store) == 1 and len(payload.refs) == 1
    jobs = pickle.loads(payload.jobs)
    # the repeated model by handle; a content seen once, and a small one, ride in the call
    assert isinstance(jobs[0].content, SharedContent) and jobs[1].content == jobs[0].content
    assert [type(job.content) for job in jobs[2:]] == [RecordDict] * 3
    # the model's floats are not in the call, ``own``'s are
    assert model["arrays"]["w"].data not in payload.jobs and own["arrays"]["w"].data in payload.jobs
    later = share.payload([(_message(model, 6), _context(6)), (_message(own, 7), _context(7))])
    # the model by the same handle, no second put; ``own`` was seen before: now it is shared too
    assert share.puts == 2 and len(later.refs) == 2 and jobs[0].content.key in later.refs

    actor = ContentCache()
    pairs = actor.jobs(payload) + actor.jobs(later)
    assert actor.fetches == 2  # the model once for both calls, ``own`` once
    received = [message for message, _ in pairs]
    assert received[0].content is received[1].content is received[5].content  # one object: decoded once
    for sent, got in zip([*first, _message(model, 6), _message(own, 7)], received, strict=True):
        assert got.metadata == sent.metadata  # delivered_at included
        assert list(got.content) == list(sent.content)
        if "arrays" in sent.content:
            np.testing.assert_array_equal(_weights(got), _weights(sent))
    assert [context.node_id for _, context in pairs] == [1, 2, 3, 4, 5, 6, 7]


def test_only_the_newest_contents_are_remembered(store):
    share, actor = ContentShare(min_bytes=0, keep=2), ContentCache(keep=2)
    models = [_model(seed) for seed in range(3)]
    for model in models:  # each repeated within its call: shared
        actor.jobs(share.payload([(_message(model, 1), _context(1)), (_message(model, 2), _context(2))]))
    assert share.puts == 3 and actor.fetches == 3
    again = share.payload([(_message(models[0], 3), _context(3))])
    assert share.puts == 3  # models[0] was forgotten (kept: the newest 2), so it rides inline now
    assert isinstance(pickle.loads(again.jobs)[0].content, RecordDict) and not again.refs
    actor.jobs(share.payload([(_message(models[2], 4), _context(4))]))
    assert actor.fetches == 3  # the newest is still held by the actor


def test_a_message_rebuilt_from_its_parts_is_the_message_unpickled():
    assert message_layout_problem() is None  # the installed Flower keeps the layout relied on
    sent = _message(_model(0), 9)
    rebuilt = rebuild_message(sent.metadata, sent.content, None)
    copy = pickle.loads(pickle.dumps(sent))
    assert vars(rebuilt).keys() == vars(copy).keys()
    assert rebuilt.metadata == copy.metadata and not rebuilt.has_error()
