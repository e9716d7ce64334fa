"""The wire protocol between fedrep's ServerApp and ClientApp: the one place that names what
crosses the network.

A Flower message carries a ``RecordDict``; fedrep uses three records in it: ``arrays`` (an
``ArrayRecord``: the shared parameters, or a state dict an action returns), ``config`` (a
``ConfigRecord``: what the server asks) and ``metrics`` (a ``MetricRecord``: what the client
reports). Every key inside them is a constant here, so the server and the client cannot drift
apart, and a reader finds the whole protocol on one page.

Message types: Flower's ``query`` (who are you: partition id and data sizes), ``train``,
``evaluate``, and a plugin's own ``train.<action>`` (KD3A's ``train.kd3a_source`` and
``train.kd3a_target``), whose further array records (``extra`` of an :class:`ActionResult`)
travel by name next to ``arrays``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

# --- records of a message --------------------------------------------------------------------------
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"

# --- config record keys (server -> client) -----------------------------------------------------------
QUERY_ASK = "ask"  # query: what the server asks (the PARTITION_ID)
SERVER_ROUND = "server-round"  # 1-based round the message belongs to
# How the server's stand-in error reply for an unanswered message begins (server/loop.py): a query
# left unanswered is asked again later, a round's message counts as that client's failure.
NO_REPLY = "no reply within"
RUN_DIR = "run-dir"  # the run folder (clients keep their head files under it)
FINETUNE_EPOCHS = "finetune-epochs"  # evaluate: fine-tune this many epochs first (last round, new clients)
NODE_ROLE = "node-role"  # a deployed node's declared role, added by the ClientApp from its node config
GATE = "gate"  # KD3A: this round's confidence gate
SOURCE_WEIGHTS = "source-weights"  # KD3A: the sources' domain weights, in partition order
# train, for the simulation runtime rather than the ClientApp: the round's sampled partitions
# (sorted) and how replies are weighted ("num-examples" or "equal"), so that a worker that ran a
# whole partial-sum group (fedrep.algorithms.aggregate.sum_groups) can send its sum instead of
# each model (fedrep.flower_runtime.presum). Sent only where the server's aggregate is that mean.
PRESUM_SAMPLED = "presum-sampled"
PRESUM_WEIGHTS = "presum-weights"

# --- records a simulation worker adds to a group's first reply (client -> server) --------------------
PRESUM_ARRAYS = "presum"  # ArrayRecord: the group's weighted_sum (float64), the group's ARRAYS emptied
# ConfigRecord: PRESUM_GROUP, PRESUM_MEMBERS (the partitions summed, in order) and PRESUM_DTYPES (the
# members' dtypes, in the sum's key order: the average is cast back to them)
PRESUM_INFO = "presum-info"
PRESUM_GROUP, PRESUM_MEMBERS, PRESUM_DTYPES = "group", "members", "dtypes"

# --- metric record keys (client -> server) -----------------------------------------------------------
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"  # train: samples trained on (aggregation weight); evaluate: test samples
TRAIN_LOSS = "train-loss"
LOCAL_STEPS = "local-steps"
PERSONAL_RESTORED = "personal-restored"  # a Restored code
NUM_TRAIN, NUM_TEST, NUM_PARTITIONS = "num-train", "num-test", "num-partitions"  # query replies
PASSED_FRACTION = "passed-fraction"  # KD3A target: share of its samples that passed the gate
LOSS, ACCURACY = "loss", "accuracy"  # evaluate; with FINETUNE_EPOCHS also "<key>-finetuned"
FINETUNED = "-finetuned"
# train.onboard: a node that has no head yet trains one on the (finished) run's body for
# FINETUNE_EPOCHS epochs, keeps it like any head (node state / client-state file) and reports
# its local test loss/accuracy before (LOSS/ACCURACY) and after (+FINETUNED). Never the head.
ONBOARD_ACTION = "onboard"

# --- node config keys (Flower's --node-config / the simulation's per-node config) --------------------
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DECLARED_ROLE = "role"


def focus_key(partition: int) -> str:
    """KD3A target -> server: the consensus focus of source ``partition``."""
    return f"focus-{partition}"


def source_record(partition: int) -> str:
    """KD3A server -> target: the array record holding source ``partition``'s whole model."""
    return f"source-{partition}"


def source_of_record(name: str) -> int:
    """The partition of a :func:`source_record` name."""
    return int(name.rsplit("-", 1)[1])


def teacher_bn_record(partition: int) -> str:
    """KD3A target -> server: source ``partition``'s BN statistics as the target's batches left them."""
    return f"source-{partition}-bn"


class Restored(IntEnum):
    """How a client got its personal part (its head) back before answering (PERSONAL_RESTORED)."""

    FRESH = 0  # no saved state survived: the initial head
    NODE_STATE = 1  # intact in Flower's node state (the same process served the previous round)
    FILE = 2  # read back from the client's own state file
    NONE = 3  # the strategy keeps nothing personal (FedAvg, FedProx)
    RESTARTED = 4  # its state file was damaged and on-damaged-head = "restart" gave it a fresh head

    @classmethod
    def of_source(cls, source: str) -> Restored:
        """From the client-state store's name for where the personal part came from."""
        return {"fresh": cls.FRESH, "node-state": cls.NODE_STATE, "file": cls.FILE, "none": cls.NONE,
                "restarted": cls.RESTARTED}[source]

    @property
    def untrained(self) -> bool:
        """The client holds an initial head (never trained, or restarted)."""
        return self in (Restored.FRESH, Restored.RESTARTED)

    @property
    def description(self) -> str:
        return RESTORED_DESCRIPTIONS[self]


RESTORED_DESCRIPTIONS = {
    Restored.FRESH: "fresh: its saved state did not survive",
    Restored.NODE_STATE: "intact in node state",
    Restored.FILE: "restored from its state file",
    Restored.NONE: "none to restore (nothing personal)",
    Restored.RESTARTED: "fresh: its state file was damaged (on-damaged-head = restart)",
}


def restored_of(metrics: Mapping[str, Any]) -> Restored | None:
    """The Restored code a reply reports; None when it reports none (a query reply, a failed
    client, or a client of an older fedrep)."""
    value = metrics.get(PERSONAL_RESTORED)
    if value is None:
        return None
    try:
        return Restored(int(value))
    except ValueError:
        return None


@dataclass(frozen=True)
class ActionResult:
    """What a plugin action (``train.<action>``) sends back: ``arrays`` (a state dict, the reply's
    ``arrays`` record), scalar ``metrics``, and further named state dicts, each sent as its own
    array record in the same reply."""

    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float | int] = field(default_factory=dict)
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
