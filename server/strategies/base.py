"""The server halves: :class:`Federation` (what every round program needs) and
:class:`SharedAveraging`, the single-phase round of FedRep, FedAvg and every strategy that
averages what clients share.

``SharedAveraging`` is a Flower ``Strategy`` (message API) with these changes from ``flwr``'s
stock ``FedAvg``:

* it samples by *partition id*, deterministically in (seed, round), so that a resumed run picks
  the same clients (stock sampling uses the global ``random`` module and node ids, which are
  random per run);
* it learns each node's partition id with one ``query`` message the first time it sees the node,
  so nodes that join later (deployment) are picked up; in a simulation it reads the ids from the
  Simulation Runtime instead (one Ray call per node saved, which is what made round 1 of a big
  federation slow);
* evaluation reports the unweighted mean of local accuracies with its spread, and the paper's
  test-size-weighted mean, instead of a train-sample-weighted average;
* it keeps a membership log (``events``): which partition's node was lost and when, and, when
  it answers again, whether it came back with its personal parameters or had to start fresh.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import DEBUG, INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrep.algorithms.aggregate import average_of_sums, sum_groups, summarize, weighted_average, weighted_sum
from fedrep.algorithms.attacks import attackers
from fedrep.algorithms.sampling import new_clients, sample_clients
from fedrep.config import RunConfig
from fedrep.flower_runtime import batched_workers, simulated_partitions
from fedrep.flower_runtime.presum import enabled as presum_enabled
from fedrep.protocol import (
    ACCURACY,
    ARRAYS,
    CONFIG,
    FINETUNE_EPOCHS,
    FINETUNED,
    LOSS,
    METRICS,
    NO_REPLY,
    NODE_NUM_PARTITIONS,
    NUM_EXAMPLES,
    ONBOARD_ACTION,
    PARTITION_ID,
    PRESUM_ARRAYS,
    PRESUM_DTYPES,
    PRESUM_GROUP,
    PRESUM_INFO,
    PRESUM_MEMBERS,
    PRESUM_SAMPLED,
    PRESUM_WEIGHTS,
    QUERY_ASK,
    SERVER_ROUND,
    TRAIN_LOSS,
    Restored,
    restored_of,
)
from fedrep.records import from_record, to_record
from fedrep.round_program import EvalOutcome, RoundProgram, TrainOutcome
from server.privacy import PrivacyLedger

# Error codes meaning "the node (or its ClientApp process) is gone", not "the client code failed".
NODE_GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.CLIENT_APP_CRASHED)


def _untrained(restored: Restored | None) -> bool:
    """A client that reports holding an initial head (one that reports nothing counts as trained)."""
    return restored is not None and restored.untrained


class Federation(RoundProgram):
    """What every server half needs whatever its round looks like: who is out there (nodes and
    their partition ids), the membership log, addressing messages and tracing replies to their
    node, and evaluation of the federation's clients (and of held-out new clients).

    Not a Flower ``Strategy``: a program with a round of its own (KD3A's two phases) subclasses
    this and implements :meth:`RoundProgram.train_round`; single-phase averaging is
    :class:`SharedAveraging`."""

    def __init__(self, cfg: RunConfig, options: object = None, query_timeout: float = 600.0) -> None:
        self.cfg = cfg
        self.options = options
        self.query_timeout = query_timeout
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self._node_of: dict[int, int] = {}  # partition id -> the node that last claimed it
        self.last_failures: list[tuple[int, str]] = []
        self.events: list[dict[str, object]] = []  # drained by the round loop into events.jsonl
        self.lost: dict[int, int] = {}  # partition id -> round it was lost in
        self.server_round = 0
        self._sent: list[Message] = []
        self._waited = False

    # -- who is out there ------------------------------------------------------------------
    def wait_for_nodes(self, grid: Grid) -> set[int]:
        """Wait until all ``num-clients`` nodes are connected (up to ``wait-for-clients`` s), so
        that sampling sees the whole population; then go on with whoever is there.

        Nodes are asked who they are as they connect, so a federation of the wrong size (``flwr
        run`` with the default number of SuperNodes) is refused at once, not after the wait."""
        deadline = time.monotonic() + self.cfg.wait_for_clients
        announced = False
        while True:
            connected = set(grid.get_node_ids())
            self._query_new(grid, connected)
            if len(connected) >= self.cfg.num_clients or time.monotonic() > deadline:
                break
            if not announced:
                log(INFO, "waiting for clients: %d of %d connected", len(connected),
                    self.cfg.num_clients)
                announced = True
            time.sleep(0.2)
        if len(connected) < self.cfg.num_clients:
            log(WARNING, "only %d of %d clients connected after %ss; going on with them",
                len(connected), self.cfg.num_clients, self.cfg.wait_for_clients)
        return connected

    def discover(self, grid: Grid) -> dict[int, int]:
        """Map every connected node to its partition id, asking only nodes not seen before.

        The first call waits for the whole population; a node whose query fails (for example
        because it cannot load its data) stops the run with that node's message."""
        if self._waited:
            connected = set(grid.get_node_ids())
        else:
            connected = self.wait_for_nodes(grid)
            self._waited = True
        for gone in sorted(set(self.partition_of) - connected):
            self._lose(gone, self.partition_of.pop(gone), "disconnected from the SuperLink")
        self._query_new(grid, connected)
        return dict(self.partition_of)

    def _query_new(self, grid: Grid, connected: set[int]) -> None:
        new = sorted(connected - set(self.partition_of))
        simulated = simulated_partitions()  # {} outside a simulation in this process
        if simulated:
            known = [node for node in new if node in simulated]
            for node in known:  # what the query would answer, without a message per node
                self._register(node, MetricRecord({PARTITION_ID: simulated[node],
                                                   NODE_NUM_PARTITIONS: len(simulated)}))
            new = [node for node in new if node not in simulated]
        if new:
            question = RecordDict({CONFIG: ConfigRecord({QUERY_ASK: PARTITION_ID})})
            msgs = [Message(question, dst_node_id=node, message_type=MessageType.QUERY) for node in new]
            for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error() and reply.error.reason.startswith(NO_REPLY):
                    continue  # not answered yet: asked again at the next discovery
                if reply.has_error():
                    raise RuntimeError(f"node {node} failed to start: {reply.error.reason}")
                self._register(node, reply.content[METRICS])

    def _register(self, node: int, info: MetricRecord) -> None:
        pid = int(info[PARTITION_ID])
        partitions = int(info.get(NODE_NUM_PARTITIONS, self.cfg.num_clients))
        if partitions != self.cfg.num_clients:
            raise RuntimeError(
                f"node {node} is partition {pid} of {partitions}, but num-clients="
                f"{self.cfg.num_clients}; start {self.cfg.num_clients} SuperNodes (simulation: "
                f"--federation-config 'num-supernodes={self.cfg.num_clients}') or set num-clients"
            )
        if not 0 <= pid < self.cfg.num_clients:
            raise RuntimeError(f"node {node} claims partition-id {pid}, outside 0..{partitions - 1}")
        owner = self._node_of.get(pid)
        if owner is not None and owner != node and self.partition_of.get(owner) == pid:
            raise RuntimeError(f"nodes {owner} and {node} both claim partition-id {pid}")
        self.partition_of[node] = pid
        self._node_of[pid] = node

    # -- membership log --------------------------------------------------------------------------
    def _event(self, kind: str, **info: object) -> None:
        event = {"round": self.server_round, "event": kind, **info}
        self.events.append(event)
        details = ", ".join(f"{k} {v}" for k, v in info.items())
        log(WARNING if kind == "node-lost" else INFO, "round %d: %s (%s)", self.server_round, kind, details)

    def _lose(self, node: int, partition: int | None, reason: str) -> None:
        if partition is None or partition in self.lost:
            return
        self.lost[partition] = self.server_round
        self._event("node-lost", node=node, partition=partition, reason=reason)

    def _returned(self, node: int, metrics: MetricRecord) -> None:
        partition = int(metrics.get(PARTITION_ID, -1))
        if partition not in self.lost:
            return
        since = self.lost.pop(partition)
        restored = restored_of(metrics)
        head = restored.description if restored is not None else "unknown"
        self._event("node-rejoined", node=node, partition=partition, lost_in_round=since, head=head)

    def drain_events(self) -> list[dict[str, object]]:
        events, self.events = self.events, []
        return events

    def _federation(self, known: dict[int, int]) -> list[int]:
        """The partitions that take part in training and evaluation: all but the new clients."""
        held_out = new_clients(self.cfg.num_clients, self.cfg.new_clients, self.cfg.seed)
        return [pid for pid in known.values() if pid not in held_out]

    def configure_new_clients(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                              grid: Grid) -> list[Message]:
        """Evaluate messages for the held-out new clients, each to train from the final model for
        ``new-client-epochs`` first (the paper's generalisation experiment)."""
        known = self.discover(grid)
        held_out = new_clients(self.cfg.num_clients, self.cfg.new_clients, self.cfg.seed)
        config[SERVER_ROUND] = server_round
        config[FINETUNE_EPOCHS] = self.cfg.new_client_epochs
        return self._messages(arrays, config, self._nodes_for(sorted(held_out & set(known.values()))),
                              MessageType.EVALUATE)

    def onboard(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                timeout: float, trained: set[int]) -> list[dict[str, Any]]:
        known = self.discover(grid)
        newcomers = sorted(set(known.values()) - trained)
        config[SERVER_ROUND] = server_round
        config[FINETUNE_EPOCHS] = self.cfg.new_client_epochs
        replies = self.send_and_collect(grid, RecordDict({ARRAYS: arrays, CONFIG: config}),
                                        self._nodes_for(newcomers), f"{MessageType.TRAIN}.{ONBOARD_ACTION}",
                                        timeout)
        rows = [{"partition": int(r.content[METRICS][PARTITION_ID]),
                 **{k: v for k, v in r.content[METRICS].items() if k != PARTITION_ID}} for r in replies]
        rows += [{"node": node, "error": reason} for node, reason in self.last_failures]
        return sorted(rows, key=lambda row: row.get("partition", -1))

    def _nodes_for(self, partitions: Iterable[int]) -> list[int]:
        node_of = {pid: node for node, pid in self.partition_of.items()}
        return [node_of[pid] for pid in partitions]

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        return self._address(RecordDict({ARRAYS: arrays, CONFIG: config}), nodes, kind)

    def _address(self, content: RecordDict, nodes: list[int], kind: str) -> list[Message]:
        """One message per node, remembered so that replies can be traced to their node."""
        self._sent = [Message(content, dst_node_id=node, message_type=kind) for node in nodes]
        return list(self._sent)

    def _sender(self, reply: Message) -> int:
        """The node a reply is about. Errors the SuperLink makes up for a vanished node carry the
        SuperLink as sender; the message they answer names the node (its id is set once sent)."""
        if reply.has_error():
            for sent in self._sent:
                if sent.metadata.message_id == reply.metadata.reply_to_message_id:
                    return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def send_and_collect(self, grid: Grid, content: RecordDict, nodes: list[int], kind: str,
                         timeout: float) -> list[Message]:
        """Send ``content`` as a ``kind`` message to each node and wait; the replies that are not
        errors (errors go to :attr:`last_failures` and, for vanished nodes, to the lost list)."""
        messages = self._address(content, nodes, kind)
        return self._split_replies(grid.send_and_receive(messages, timeout=timeout))

    def _split_replies(self, replies: Iterable[Message]) -> list[Message]:
        ok, self.last_failures = [], []
        for reply in replies:
            node = self._sender(reply)
            if reply.has_error():
                self.last_failures.append((node, reply.error.reason))
                # the round loop reports it (progress line, events.jsonl); the whole reason here
                log(DEBUG, "node %s failed: %s", node, reply.error.reason)
                if reply.error.code in NODE_GONE:
                    self._lose(node, self.partition_of.get(node), reply.error.reason)
            else:
                self._returned(node, reply.content[METRICS])
                ok.append(reply)
        # Arrival order is arbitrary; floating-point sums are not associative. Sorting by
        # partition makes aggregation bitwise reproducible (and resumed runs exact).
        return sorted(ok, key=lambda r: int(r.content[METRICS].get(PARTITION_ID, 0)))

    # -- RoundProgram: evaluation, membership ------------------------------------------------------
    def evaluate_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                       timeout: float) -> EvalOutcome:
        messages = list(self.configure_evaluate(server_round, arrays, config, grid))
        metrics = self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
        return EvalOutcome(dict(metrics or {}), arrays.count_bytes() * len(messages))

    def evaluate_new_clients(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                             grid: Grid, timeout: float) -> EvalOutcome:
        messages = self.configure_new_clients(server_round, arrays, config, grid)
        metrics = self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
        return EvalOutcome(dict(metrics or {}), arrays.count_bytes() * len(messages))

    def lost_partitions(self) -> dict[int, int]:
        return dict(self.lost)

    # -- evaluation messages (also SharedAveraging's Flower hooks) ----------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        known = self.discover(grid)
        # Salted round so evaluation sampling does not mirror training sampling.
        chosen = sample_clients(self.cfg.seed + 7919, server_round, self._federation(known),
                                self.cfg.fraction_evaluate)
        config[SERVER_ROUND] = server_round
        return self._messages(arrays, config, self._nodes_for(chosen), MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ok = self._split_replies(replies)
        if not ok:
            return None
        metrics = [r.content[METRICS] for r in ok]
        trained = [m for m in metrics if not _untrained(restored_of(m))]
        out: dict[str, float | int] = {
            "eval-clients": len(ok),
            "eval-failures": len(self.last_failures),
            "eval-untrained": len(metrics) - len(trained),
        }
        for key in (LOSS, ACCURACY, LOSS + FINETUNED, ACCURACY + FINETUNED):
            pairs = [(float(m[key]), float(m.get(NUM_EXAMPLES, 0))) for m in metrics if key in m]
            if pairs:  # mean over clients (ours) and weighted by test-set size (the paper's)
                values, sizes = zip(*pairs, strict=True)
                weights = sizes if sum(sizes) > 0 else None
                out.update({f"{key}-{stat}": v for stat, v in summarize(values, weights).items()})
        # The paper's curves are dominated by clients that have trained at least once; with 10%
        # participation many have not in early rounds, and they still hold the initial head.
        values = [float(m[ACCURACY]) for m in trained if ACCURACY in m]
        if values:
            out["accuracy-trained-mean"] = summarize(values)["mean"]
        if self.cfg.attack != "none":  # what an attack costs the clients that did not attack
            bad = attackers(self.cfg.num_clients, self.cfg.attack_share, self.cfg.seed)
            for key in (ACCURACY, ACCURACY + FINETUNED):
                honest = [float(m[key]) for m in metrics if key in m and int(m[PARTITION_ID]) not in bad]
                if honest:
                    out[f"{key}-honest-mean"] = summarize(honest)["mean"]
        return MetricRecord(out)


class SharedAveraging(Federation, Strategy):
    """Average the shared arrays the clients return, weighted by their sample counts (or equally,
    ``aggregation-weights``). A Flower ``Strategy`` whose hooks are the whole round, so Flower's
    own ``Strategy.start()`` runs it correctly too; fedrep's round loop drives the same hooks
    through :meth:`train_round`.

    With ``dp`` on, the shared part is released under differential privacy
    (:class:`server.privacy.PrivacyLedger`): central DP clips, averages equally and noises here;
    local DP's clients noise their own updates and this only accounts for them."""

    def __init__(self, cfg: RunConfig, options: object = None, query_timeout: float = 600.0) -> None:
        super().__init__(cfg, options, query_timeout)
        self.privacy: PrivacyLedger | None = PrivacyLedger(cfg) if cfg.dp != "none" else None
        self._sent_arrays: dict[str, Any] = {}
        self._sampled = 0
        self._rank_of: dict[int, int] = {}  # partition -> its rank in this round's sorted sample

    def state_dict(self) -> dict[str, Any]:
        return {"privacy": self.privacy.state_dict()} if self.privacy is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
            state = {k: v for k, v in state.items() if k != "privacy"}
        super().load_state_dict(state)

    def train_round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                    timeout: float) -> TrainOutcome:
        messages = list(self.configure_train(server_round, arrays, config, grid))
        if not messages:
            raise RuntimeError(f"round {server_round}: no client available to train")
        new_arrays, metrics = self.aggregate_train(server_round,
                                                   grid.send_and_receive(messages, timeout=timeout))
        return TrainOutcome(new_arrays, dict(metrics or {}), arrays.count_bytes() * len(messages))

    # -- Flower Strategy hooks ---------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├── %s: fraction-train %.2f, fraction-evaluate %.2f, seed %d",
            type(self).__name__, self.cfg.fraction_train, self.cfg.fraction_evaluate, self.cfg.seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.server_round = server_round
        known = self.discover(grid)
        chosen = sample_clients(self.cfg.seed, server_round, self._federation(known),
                                self.cfg.fraction_train)
        if self.privacy is not None:  # before any client trains: a refused round costs nothing
            self.privacy.check_budget(server_round, chosen)
            self._sent_arrays, self._sampled = from_record(arrays), len(chosen)
        config[SERVER_ROUND] = server_round
        self._rank_of = {partition: rank for rank, partition in enumerate(sorted(chosen))}
        if self._sums_on_workers() and presum_enabled() and batched_workers():
            config[PRESUM_SAMPLED] = sorted(chosen)
            config[PRESUM_WEIGHTS] = "equal" if self.cfg.equal_aggregation() else "num-examples"
        return self._messages(arrays, config, self._nodes_for(chosen), MessageType.TRAIN)

    def _sums_on_workers(self) -> bool:
        """Whether a simulation's workers may send a group's sum for its models
        (:mod:`fedrep.flower_runtime.presum`): only for this class's own plain mean, which knows
        how to read one; not under DP (each update is clipped, noised or measured) nor a robust
        rule (each update counts on its own), nor for a subclass with its own aggregation."""
        return (self.privacy is None and self.cfg.aggregation == "mean"
                and type(self).aggregate_train is SharedAveraging.aggregate_train)

    def _group_average(self, ok: list[Message], weights: list[float]) -> dict[str, Any]:
        """The round's mean, group by group (:func:`fedrep.algorithms.aggregate.weighted_average`
        with :func:`sum_groups` of each reply's rank in the sample): a group a worker summed
        arrives as one sum (its first reply's ``presum``), any other group is summed here; the
        same bits either way. ``ok`` is sorted by partition."""
        ranks = [self._rank_of.get(int(r.content[METRICS].get(PARTITION_ID, -1)), -1) for r in ok]
        if any(rank < 0 for rank in ranks):  # a reply from outside the sample (a plugin's own send)
            return weighted_average([(from_record(r.content[ARRAYS], writable=False), w)
                                     for r, w in zip(ok, weights, strict=True)])
        sums, dtypes = [], {}
        members_of: dict[int, list[int]] = {}
        for i, group in enumerate(sum_groups(ranks)):
            members_of.setdefault(group, []).append(i)
        for group, members in members_of.items():
            summed = [ok[i] for i in members if PRESUM_INFO in ok[i].content]
            if summed:
                info = summed[0].content[PRESUM_INFO]
                partitions = [int(ok[i].content[METRICS][PARTITION_ID]) for i in members]
                if (len(summed) != 1 or int(info[PRESUM_GROUP]) != group  # type: ignore[arg-type]
                        or [int(p) for p in info[PRESUM_MEMBERS]] != partitions):  # type: ignore[union-attr]
                    raise RuntimeError(f"round {self.server_round}: partial-sum group {group} came back "
                                       f"with members {list(info[PRESUM_MEMBERS])} but the replies "  # type: ignore[arg-type]
                                       f"of {partitions}; rerun with FEDREP_PRESUM=0 and report it")
                total = from_record(summed[0].content[PRESUM_ARRAYS], writable=False)
                dtypes = dtypes or dict(zip(total, map(np.dtype, info[PRESUM_DTYPES]), strict=True))  # type: ignore[arg-type]
                sums.append(total)
            else:
                updates = [(from_record(ok[i].content[ARRAYS], writable=False), weights[i]) for i in members]
                sums.append(weighted_sum(updates))
                dtypes = dtypes or {k: np.asarray(v).dtype for k, v in updates[0][0].items()}
        return average_of_sums(sums, float(sum(weights)), dtypes)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = self._split_replies(replies)
        if not ok:
            return None, None
        counts = [float(r.content[METRICS][NUM_EXAMPLES]) for r in ok]
        equal = self.cfg.equal_aggregation()  # aggregation-weights
        if self.cfg.aggregation == "mean" and not (self.privacy is not None and self.cfg.dp == "central"):
            averaged = self._group_average(ok, [1.0] * len(ok) if equal else counts)
        else:
            # read-only views of the replies' bytes: the aggregators only read them (no 1 MB copy each)
            updates = [(from_record(r.content[ARRAYS], writable=False), w)
                       for r, w in zip(ok, counts, strict=True)]
            if self.privacy is not None and self.cfg.dp == "central":
                averaged = self.privacy.release(server_round, self._sent_arrays, [a for a, _ in updates])
            else:
                from server.robust import robust_aggregate

                averaged = robust_aggregate(self.cfg, server_round,
                                            [(a, 1.0) for a, _ in updates] if equal else updates)
        finite = [(float(r.content[METRICS][TRAIN_LOSS]), w) for r, w in zip(ok, counts, strict=True)
                  if math.isfinite(float(r.content[METRICS][TRAIN_LOSS]))]
        metrics = MetricRecord({"train-clients": len(ok), "train-failures": len(self.last_failures)})
        if finite:  # no finite loss when a strategy took no local step (e.g. zero epochs)
            metrics[TRAIN_LOSS] = summarize(*zip(*finite, strict=True))["weighted-mean"]
        if self.privacy is not None:
            self.privacy.account(self._sampled, [int(r.content[METRICS][PARTITION_ID]) for r in ok])
            metrics.update(self.privacy.round_metrics())
        return to_record(averaged), metrics


class LocalOnlyAveraging(SharedAveraging):
    """Local-only's server: nothing is shared, so nothing is averaged; on the official schedule
    (``strategy-options={schedule = "official"}``, the default) every client trains every round."""

    def __init__(self, cfg: RunConfig, options: object = None) -> None:
        from fedrep.algorithms.local import local_server_config

        super().__init__(local_server_config(cfg, options), options)
