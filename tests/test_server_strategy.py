"""The server half with real Flower records and messages (no Grid needed for the hooks)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedrep.config import parse_run_config
from fedrep.records import from_record, to_record
from server.strategies.base import SharedAveraging


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch):
    """Messages are stamped with the process's task identity, as in a running ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _reply(arrays: dict, metrics: dict) -> Message:
    """A message with a reply's content (the hooks read only content and error state)."""
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays:
        content["arrays"] = to_record(arrays)
    return Message(content, dst_node_id=5, message_type=MessageType.TRAIN)


def test_aggregate_train_is_weighted_and_order_independent():
    strategy = SharedAveraging(parse_run_config({"num-clients": 3}))
    replies = [
        _reply({"w": np.array([1.0, 2.0], np.float32)},
               {"num-examples": 100, "train-loss": 1.0, "partition-id": 2}),
        _reply({"w": np.array([3.0, 6.0], np.float32)},
               {"num-examples": 300, "train-loss": 2.0, "partition-id": 0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(from_record(arrays)["w"], [2.5, 5.0])
    assert metrics["train-loss"] == pytest.approx(1.75) and metrics["train-clients"] == 2
    again, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert np.array_equal(from_record(again)["w"], from_record(arrays)["w"])


def test_aggregate_evaluate_reports_unweighted_mean_and_trained_only():
    strategy = SharedAveraging(parse_run_config({"num-clients": 3}))
    replies = [
        _reply({}, {"num-examples": 10, "accuracy": 1.0, "loss": 0.1, "partition-id": 0,
                    "personal-restored": 1}),
        _reply({}, {"num-examples": 90, "accuracy": 0.5, "loss": 0.9, "partition-id": 1,
                    "personal-restored": 1}),
        _reply({}, {"num-examples": 50, "accuracy": 0.0, "loss": 2.0, "partition-id": 2,
                    "personal-restored": 0}),
    ]
    m = strategy.aggregate_evaluate(1, replies)
    assert m["accuracy-mean"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3, not sample-weighted
    assert m["accuracy-trained-mean"] == pytest.approx(0.75)
    assert m["eval-untrained"] == 1 and m["eval-clients"] == 3


@pytest.mark.parametrize(("info", "message"), [
    ({"partition-id": 7, "num-partitions": 3}, r"claims partition-id 7, outside 0\.\.2"),
    ({"partition-id": 1, "num-partitions": 2}, "num-supernodes=3"),
])
def test_nodes_must_match_the_federation(info, message):
    strategy = SharedAveraging(parse_run_config({"num-clients": 3}))
    with pytest.raises(RuntimeError, match=message):
        strategy._register(11, MetricRecord(info))


def test_two_nodes_cannot_share_a_partition():
    strategy = SharedAveraging(parse_run_config({"num-clients": 3}))
    strategy._register(11, MetricRecord({"partition-id": 1, "num-partitions": 3}))
    with pytest.raises(RuntimeError, match="both claim partition-id 1"):
        strategy._register(12, MetricRecord({"partition-id": 1, "num-partitions": 3}))


def _error_reply(node: int, code: int, reason: str) -> Message:
    from flwr.app import Error

    sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=code, reason=reason), reply_to=sent)


def test_membership_log_names_lost_node_and_how_it_came_back():
    from flwr.common.constant import ErrorCode

    strategy = SharedAveraging(parse_run_config({"num-clients": 3}))
    for node, pid in ((11, 0), (12, 1), (13, 2)):
        strategy._register(node, MetricRecord({"partition-id": pid, "num-partitions": 3}))
    weights = {"w": np.ones(2, np.float32)}
    ok = _reply(weights, {"num-examples": 10, "train-loss": 1.0, "partition-id": 0, "personal-restored": 1})
    strategy.server_round = 2
    strategy.aggregate_train(2, [ok, _error_reply(12, ErrorCode.NODE_UNAVAILABLE, "node unavailable"),
                                 _error_reply(13, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "bug")])
    lost = strategy.drain_events()
    # Only the unreachable node counts as lost; a client that raised is a failure, not a departure.
    assert [(e["event"], e["partition"], e["node"]) for e in lost] == [("node-lost", 1, 12)]
    assert strategy.drain_events() == []
    strategy.server_round = 5
    back = _reply(weights, {"num-examples": 10, "train-loss": 1.0, "partition-id": 1,
                            "personal-restored": 2})  # came back with its head file
    strategy.aggregate_train(5, [back])
    (event,) = strategy.drain_events()
    assert event == {"round": 5, "event": "node-rejoined", "node": back.metadata.src_node_id,
                     "partition": 1, "lost_in_round": 2, "head": "restored from its state file"}
    assert strategy.lost == {}


def test_a_diverged_round_stops_the_run_instead_of_spreading_nan():
    from server.loop import check_finite

    good = {"body.weight": np.ones((2, 2), dtype=np.float32), "body.num_batches_tracked": np.array(3)}
    check_finite(4, good, {"train-loss": 0.3})  # fine: nothing raised
    bad = {**good, "body.bias": np.array([0.0, np.nan], dtype=np.float32)}
    with pytest.raises(FloatingPointError, match=r"round 4: .*\['body.bias'\].*smaller lr.*rounds 1-3"):
        check_finite(4, bad, {"train-loss": float("nan")})
