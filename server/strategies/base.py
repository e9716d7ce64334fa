"""The server half shared by FedRep, FedAvg and any strategy that averages what clients share.

A Flower ``Strategy`` (message API) with three changes from ``flwr``'s stock ``FedAvg``:

* it samples by *partition id*, deterministically in (seed, round), so that a resumed run picks
  the same clients (stock sampling uses the global ``random`` module and node ids, which are
  random per run);
* it learns each node's partition id with one ``query`` message the first time it sees the node,
  so nodes that join later (deployment) are picked up;
* evaluation reports the paper's metric, the unweighted mean of local accuracies, with its
  spread, instead of a sample-weighted average.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrep.algorithms.aggregate import summarize, weighted_average
from fedrep.algorithms.sampling import sample_clients
from fedrep.config import RunConfig

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
PARTITION_ID, NUM_EXAMPLES = "partition-id", "num-examples"


class SharedAveraging(Strategy):
    """Average the shared arrays the clients return, weighted by their sample counts."""

    def __init__(self, cfg: RunConfig, query_timeout: float = 600.0) -> None:
        self.cfg = cfg
        self.query_timeout = query_timeout
        self.partition_of: dict[int, int] = {}  # node id -> partition id
        self.last_failures: list[tuple[int, str]] = []

    # -- who is out there ------------------------------------------------------------------
    def wait_for_nodes(self, grid: Grid) -> set[int]:
        """Wait until all ``num-clients`` nodes are connected (up to ``wait-for-clients`` s), so
        that sampling sees the whole population; then go on with whoever is there."""
        deadline = time.monotonic() + self.cfg.wait_for_clients
        announced = False
        while True:
            connected = set(grid.get_node_ids())
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
        """Map every connected node to its partition id, asking only nodes not seen before."""
        if len(self.partition_of) >= self.cfg.num_clients:
            connected = set(grid.get_node_ids())
        else:
            connected = self.wait_for_nodes(grid)
        for gone in set(self.partition_of) - connected:
            log(WARNING, "node %s (partition %s) left", gone, self.partition_of.pop(gone))
        new = sorted(connected - set(self.partition_of))
        if new:
            question = RecordDict({CONFIG: ConfigRecord({"ask": PARTITION_ID})})
            msgs = [Message(question, dst_node_id=node, message_type=MessageType.QUERY) for node in new]
            for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
                if reply.has_error():
                    log(WARNING, "node %s did not answer the query: %s",
                        reply.metadata.src_node_id, reply.error.reason)
                    continue
                pid = int(reply.content[METRICS][PARTITION_ID])
                self.partition_of[reply.metadata.src_node_id] = pid
        return dict(self.partition_of)

    def _nodes_for(self, partitions: Iterable[int]) -> list[int]:
        node_of = {pid: node for node, pid in self.partition_of.items()}
        return [node_of[pid] for pid in partitions]

    def _messages(
        self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(content, dst_node_id=node, message_type=kind) for node in nodes]

    # -- Flower Strategy hooks ---------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├── %s: fraction-train %.2f, fraction-evaluate %.2f, seed %d",
            type(self).__name__, self.cfg.fraction_train, self.cfg.fraction_evaluate, self.cfg.seed)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        known = self.discover(grid)
        chosen = sample_clients(self.cfg.seed, server_round, known.values(), self.cfg.fraction_train)
        config["server-round"] = server_round
        return self._messages(arrays, config, self._nodes_for(chosen), MessageType.TRAIN)

    def _split_replies(self, replies: Iterable[Message]) -> list[Message]:
        ok, self.last_failures = [], []
        for reply in replies:
            if reply.has_error():
                self.last_failures.append((reply.metadata.src_node_id, reply.error.reason))
                log(WARNING, "node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
            else:
                ok.append(reply)
        # Arrival order is arbitrary; floating-point sums are not associative. Sorting by
        # partition makes aggregation bitwise reproducible (and resumed runs exact).
        return sorted(ok, key=lambda r: int(r.content[METRICS].get(PARTITION_ID, 0)))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok = self._split_replies(replies)
        if not ok:
            return None, None
        updates = [
            ({k: a.numpy() for k, a in r.content[ARRAYS].items()},
             float(r.content[METRICS][NUM_EXAMPLES]))
            for r in ok
        ]
        averaged = weighted_average(updates)
        losses = [float(r.content[METRICS]["train-loss"]) for r in ok]
        weights = [w for _, w in updates]
        metrics = MetricRecord(
            {
                "train-loss": summarize(losses, weights)["weighted-mean"],
                "train-clients": len(ok),
                "train-failures": len(self.last_failures),
            }
        )
        record = ArrayRecord()
        for key, value in averaged.items():
            record[key] = Array.from_numpy_ndarray(value)
        return record, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        known = self.discover(grid)
        # Salted round so evaluation sampling does not mirror training sampling.
        chosen = sample_clients(self.cfg.seed + 7919, server_round, known.values(),
                                self.cfg.fraction_evaluate)
        config["server-round"] = server_round
        return self._messages(arrays, config, self._nodes_for(chosen), MessageType.EVALUATE)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ok = self._split_replies(replies)
        if not ok:
            return None
        metrics = [r.content[METRICS] for r in ok]
        out: dict[str, float | int] = {"eval-clients": len(ok)}
        for key in ("loss", "accuracy"):
            values = [float(m[key]) for m in metrics if key in m]
            if values:
                out.update({f"{key}-{stat}": v for stat, v in summarize(values).items()})
        return MetricRecord(out)
