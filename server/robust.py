"""Robust aggregation of the shared part with Flower's own aggregators (``aggregation``).

Flower 1.41 ships FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan as strategies whose
``aggregate_train`` combines the replies' single array record; the replies fedrep's clients send
for the shared part have exactly that shape (``arrays`` = the body, ``metrics`` with
``num-examples``), so the body is handed to them as it is. What they lack, and this module adds:
they pop arrays out of the messages they are given (so they get copies), and their median and
trimmed mean turn integer buffers (BatchNorm's batch counter) into floats (cast back, rounded, as
fedrep's weighted average does).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from fedrep.config import RunConfig
from fedrep.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from fedrep.records import to_record


def flower_aggregator(cfg: RunConfig, replies: int) -> Strategy:
    """Flower's strategy for ``cfg.aggregation``, sized for ``replies`` clients this round."""
    f = cfg.byzantine_clients
    if cfg.aggregation == "median":
        return FedMedian()
    if cfg.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.trim_fraction)
    if cfg.aggregation == "krum":
        return Krum(num_malicious_nodes=f)
    if cfg.aggregation == "multi-krum":
        return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=cfg.krum_select or replies - f)
    if cfg.aggregation == "bulyan":
        return Bulyan(num_malicious_nodes=f)
    raise ValueError(f"aggregation {cfg.aggregation!r} is not a robust aggregator")


def robust_aggregate(cfg: RunConfig, server_round: int, updates: list[tuple[dict[str, np.ndarray], float]]
                     ) -> dict[str, np.ndarray]:
    """The shared arrays Flower's aggregator makes of ``updates`` ((arrays, weight) per client,
    in partition order); each array keeps its dtype."""
    copies = [Message(RecordDict({ARRAYS: to_record({k: np.array(v) for k, v in arrays.items()}),
                                  METRICS: MetricRecord({NUM_EXAMPLES: weight})}),
                      dst_node_id=0, message_type=MessageType.TRAIN) for arrays, weight in updates]
    record, _ = flower_aggregator(cfg, len(updates)).aggregate_train(server_round, copies)
    if record is None:  # Bulyan with too few replies (the config check makes this a lost node)
        raise RuntimeError(f"round {server_round}: {cfg.aggregation} could not aggregate "
                           f"{len(updates)} replies (too few for byzantine-clients={cfg.byzantine_clients})")
    out = {}
    for key, template in updates[0][0].items():
        value = record[key].numpy()
        if np.issubdtype(template.dtype, np.integer):
            value = np.rint(value)
        out[key] = value.astype(template.dtype, copy=False)
    return out
