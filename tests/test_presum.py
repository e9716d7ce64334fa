"""The actor-side partial sums of a train round (fedrep.flower_runtime.presum), on Flower messages
built here: what is summed, what is left to the server, and that the sum is the server's."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedrep.algorithms.aggregate import weighted_sum
from fedrep.flower_runtime.presum import membership, presum
from fedrep.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PRESUM_ARRAYS,
    PRESUM_INFO,
    PRESUM_SAMPLED,
    PRESUM_WEIGHTS,
)
from fedrep.records import from_record, to_record


@pytest.fixture(autouse=True)
def in_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _job(partition: int, sampled: list[int]) -> tuple[Message, Context]:
    config = ConfigRecord({PRESUM_SAMPLED: sampled, PRESUM_WEIGHTS: "num-examples"})
    message = Message(RecordDict({CONFIG: config}), dst_node_id=100 + partition, message_type="train")
    context = Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition},
                      state=RecordDict(), run_config={})
    return message, context


def _reply(message: Message, partition: int, rng: np.random.Generator) -> Message:
    arrays = {"body.w": rng.standard_normal((3, 2)).astype(np.float32)}
    content = RecordDict({ARRAYS: to_record(arrays),
                          METRICS: MetricRecord({PARTITION_ID: partition, NUM_EXAMPLES: 10 + partition})})
    return Message(content, reply_to=message)


def test_a_whole_group_is_sent_as_the_servers_sum_and_a_partial_one_is_left_alone(monkeypatch):
    rng = np.random.default_rng(5)
    # 20 sampled: group 0 = ranks 0..15, group 1 = ranks 16..19 (4 members)
    sampled = list(range(0, 40, 2))
    jobs = [_job(p, sampled) for p in sampled[:16]] + [_job(p, sampled) for p in sampled[16:19]]
    assert membership(*jobs[0]).size == 16 and membership(*jobs[-1]).size == 4
    replies: list[Message | None] = [_reply(m, int(c.node_config["partition-id"]), rng) for m, c in jobs]
    replies[3] = None  # that client failed: not in the sum, the group still whole
    before = [from_record(r.content[ARRAYS]) if r is not None else None for r in replies]
    assert presum(jobs, replies) == 1
    leader = replies[0]
    assert leader is not None and PRESUM_ARRAYS in leader.content
    members = [r for r in replies[:16] if r is not None]
    assert list(leader.content[PRESUM_INFO]["members"]) == [int(r.content[METRICS][PARTITION_ID])
                                                            for r in members]
    assert all(len(r.content[ARRAYS]) == 0 for r in members)
    expected = weighted_sum([(before[i], 10.0 + sampled[i]) for i in range(16) if before[i] is not None])
    got = from_record(leader.content[PRESUM_ARRAYS])
    assert got["body.w"].dtype == np.float64 and got["body.w"].tobytes() == expected["body.w"].tobytes()
    # group 1 had 3 of its 4 members in this call: each reply keeps its model for the server
    assert all(PRESUM_INFO not in r.content and len(r.content[ARRAYS]) == 1 for r in replies[16:])
    # and nothing is summed when turned off, or for a message that did not ask
    monkeypatch.setenv("FEDREP_PRESUM", "0")
    fresh = [_reply(m, int(c.node_config["partition-id"]), rng) for m, c in jobs]
    assert presum(jobs, fresh) == 0
    monkeypatch.delenv("FEDREP_PRESUM")
    plain = Message(RecordDict({CONFIG: ConfigRecord({})}), dst_node_id=100, message_type="train")
    assert membership(plain, jobs[0][1]) is None


def test_a_group_whose_replies_differ_in_their_arrays_is_left_to_the_server():
    rng = np.random.default_rng(6)
    sampled = [1, 2]
    jobs = [_job(p, sampled) for p in sampled]
    replies = [_reply(m, p, rng) for (m, _), p in zip(jobs, sampled, strict=True)]
    replies[1].content[ARRAYS] = ArrayRecord()  # not a model: the server decides what that means
    assert presum(jobs, replies) == 0
    assert all(PRESUM_INFO not in r.content for r in replies)


def test_the_server_asks_for_sums_only_for_its_own_plain_mean_in_a_batched_simulation(monkeypatch):
    """Not under DP, not with a robust rule, not in a subclass with its own aggregate_train; and
    the sample rides in the train config only where fedrep's Ray workers run (a deployment's
    SuperNodes never pre-sum: no 10,000-entry list to every node for nothing)."""
    from flwr.server.superlink.fleet.vce import vce_api

    import fedrep.flower_runtime as runtime
    from fedrep.config import parse_run_config
    from server.strategies.base import SharedAveraging

    plain = SharedAveraging(parse_run_config({"strategy": "fedavg"}))
    assert plain._sums_on_workers()
    assert not SharedAveraging(parse_run_config({"strategy": "fedavg", "dp": "local",
                                                 "dp-noise-multiplier": 0.5}))._sums_on_workers()
    robust = parse_run_config({"strategy": "fedavg", "aggregation": "median"})
    assert not SharedAveraging(robust)._sums_on_workers()

    class OwnMean(SharedAveraging):
        def aggregate_train(self, server_round, replies):  # type: ignore[override]
            return super().aggregate_train(server_round, replies)

    assert not OwnMean(parse_run_config({"strategy": "fedavg"}))._sums_on_workers()
    monkeypatch.setattr(vce_api, "put_message_into_state", runtime.put_message_into_state)
    assert runtime.batched_workers()
    monkeypatch.setattr(vce_api, "put_message_into_state", lambda *args: None)
    assert not runtime.batched_workers()
