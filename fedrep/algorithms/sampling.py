"""Which clients train in a round: a pure function of (seed, round, population, fraction).

Flower's stock strategies sample with the process-global ``random`` module, so a resumed run
would pick different clients. Here the choice depends only on the run seed, the round and the
sorted partition ids, so a resumed run, the in-process reference loop and a deployment with the
same partitions all pick the same clients.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def num_sampled(population: int, fraction: float) -> int:
    """max(1, int(fraction * population)): truncation, as the official code's
    ``max(int(frac * n), 1)``."""
    return max(1, min(population, int(fraction * population + 1e-9)))


def sample_clients(
    seed: int, server_round: int, partition_ids: Iterable[int], fraction: float
) -> list[int]:
    ids = np.array(sorted(set(partition_ids)), dtype=np.int64)
    if len(ids) == 0:
        return []
    k = num_sampled(len(ids), fraction)
    if k == len(ids):
        return ids.tolist()
    rng = np.random.default_rng([seed, 0x5A, server_round])
    return np.sort(rng.choice(ids, size=k, replace=False)).tolist()


def new_clients(num_clients: int, share: float, seed: int) -> frozenset[int]:
    """The partitions held out of training for the paper's generalisation experiment: a seeded
    random ``round(share * n)`` of them (at least one when ``share > 0``). They never train and
    are not evaluated during the run; after it, each learns from the final model alone."""
    if share <= 0:
        return frozenset()
    k = min(num_clients - 1, max(1, round(share * num_clients)))
    rng = np.random.default_rng([seed, 0x9E1D])
    return frozenset(int(p) for p in rng.choice(num_clients, size=k, replace=False))
