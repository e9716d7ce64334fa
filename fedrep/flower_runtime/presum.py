"""A simulation worker sums each whole partial-sum group of a train round it ran, and sends the
group's sum instead of every model in it.

Why: with 1,000 one-batch clients a round, every train reply carries the whole model (about a
megabyte for the paper's CNN) from its Ray actor through the object store to the driver, which
copies each out (``batching.arrays_in_band``) and then reads each again to average them. On the
2-core machine here that copy and that sum were 1.0 of the driver's 1.5 CPU seconds a round,
beside two actors that need both cores. The actor already holds the replies, hot in its cache:
summing them there, and sending one float64 sum per group of ``SUM_GROUP`` clients, took the
driver from 1.87 to 1.24 CPU seconds a round and the round to 0.96x its time (interleaved
``bench/process_cpu.py`` runs with ``FEDREP_PRESUM=0``; README, Performance).

Why it changes no result: a train round's average is *defined* group by group
(:func:`fedrep.algorithms.aggregate.weighted_average` with :func:`sum_groups`): the groups are
consecutive ranks of the sorted sample, each group's :func:`weighted_sum` runs in rank order
from zero, and the server adds the groups' sums in order. The actor runs the same function on the
same float32 arrays with the same weights, so its sum has the same bits as the one the server
makes from the replies themselves; a group that did not run whole in one actor call (calls
follow the queue, not the groups) is sent model by model and the server sums it. A deployment,
whose SuperNodes never do this, gets the same bits too.

Only where the server asked for it (the train message's config names the sample and the
weighting: ``SharedAveraging`` does so for its plain mean, never under DP or a robust rule),
and only whole groups whose every member's reply has the same arrays. The group's first
successful reply carries the sum (``presum``) and the partitions in it (``presum-info``); every
member's ``arrays`` is emptied. ``FEDREP_PRESUM=0`` turns it off.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType

from fedrep.algorithms.aggregate import SUM_GROUP, sum_groups, weighted_sum
from fedrep.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NODE_PARTITION_ID,
    NUM_EXAMPLES,
    PARTITION_ID,
    PRESUM_ARRAYS,
    PRESUM_DTYPES,
    PRESUM_GROUP,
    PRESUM_INFO,
    PRESUM_MEMBERS,
    PRESUM_SAMPLED,
    PRESUM_WEIGHTS,
)
from fedrep.records import from_record, to_record

ENV_VAR = "FEDREP_PRESUM"
WEIGHTINGS = ("num-examples", "equal")


def enabled() -> bool:
    """``FEDREP_PRESUM`` is not ``0`` (on by default)."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


@dataclass(frozen=True)
class Membership:
    """Where one train message's reply belongs: its group, the group's size, its rank in the
    sample, and how replies are weighted."""

    group: int
    size: int
    rank: int
    weighting: str


def membership(message: Message, context: Context) -> Membership | None:
    """The message's group, when the server asked for pre-summing; else None."""
    if message.metadata.message_type != MessageType.TRAIN or not message.has_content():
        return None
    config = message.content.get(CONFIG)
    if not isinstance(config, ConfigRecord) or PRESUM_SAMPLED not in config:
        return None
    # the record's own list, not a copy: a copy per message would cost O(sample) each, 10^8
    # element copies a round at 10,000 sampled clients; bisect only reads it
    sampled = config[PRESUM_SAMPLED]
    if not isinstance(sampled, list):
        return None
    weighting = str(config.get(PRESUM_WEIGHTS, ""))
    partition = context.node_config.get(NODE_PARTITION_ID)
    if weighting not in WEIGHTINGS or partition is None:
        return None
    rank = bisect_left(sampled, int(partition))
    if rank == len(sampled) or sampled[rank] != int(partition):
        return None
    group = sum_groups([rank])[0]
    return Membership(group, min(SUM_GROUP, len(sampled) - group * SUM_GROUP), rank, weighting)


def _weight(reply: Message, weighting: str) -> float:
    return float(reply.content[METRICS][NUM_EXAMPLES]) if weighting == "num-examples" else 1.0


def presum(jobs: Sequence[tuple[Message, Context]], replies: Sequence[Message | None]) -> int:
    """Replace each whole group's models in ``replies`` (one per job; None or an error reply for a
    job that failed) by their sum on the group's first successful reply. Returns the number of
    groups summed."""
    if not enabled():
        return 0
    groups: dict[int, list[tuple[Membership, Message | None]]] = {}
    for (message, context), reply in zip(jobs, replies, strict=True):
        member = membership(message, context)
        if member is not None:
            groups.setdefault(member.group, []).append((member, reply))
    summed = 0
    for group, members in groups.items():
        if len(members) != members[0][0].size:  # part of the group ran elsewhere: the server sums it
            continue
        members.sort(key=lambda item: item[0].rank)
        ok = [reply for _, reply in members if reply is not None and not reply.has_error()]
        if not ok:
            continue
        weighting = members[0][0].weighting
        try:
            updates = [(from_record(reply.content[ARRAYS], writable=False), _weight(reply, weighting))
                       for reply in ok]
            partitions = [int(reply.content[METRICS][PARTITION_ID]) for reply in ok]
            total = weighted_sum(updates)
        except (KeyError, TypeError, ValueError):  # not a plain model reply: the server sees each
            continue
        ok[0].content[PRESUM_ARRAYS] = to_record(total)
        dtypes = [str(np.asarray(value).dtype) for value in updates[0][0].values()]
        ok[0].content[PRESUM_INFO] = ConfigRecord({PRESUM_GROUP: group, PRESUM_MEMBERS: partitions,
                                                   PRESUM_DTYPES: dtypes})
        for reply in ok:
            reply.content[ARRAYS] = ArrayRecord()
        summed += 1
    return summed
