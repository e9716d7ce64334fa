"""Server-side arithmetic, free of Flower so it can be checked against hand computations."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

AVERAGE_BLOCK = 16384  # float64 elements per block of weighted_average: 128 KiB, in L2 with its product


PARALLEL_MIN_ELEMENTS = 8_000_000  # below this many multiply-adds a sum stays in the calling thread
_POOL: list[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="fedrep-average"))
    return _POOL[0]


def _threads() -> int:
    """Threads for one large sum: the cores this process may use, at most 4."""
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, min(4, len(usable)))


def _thread_chunks(blocks: int, work: int) -> list[tuple[int, int]]:
    """Contiguous runs of block indices, one per thread, when ``work`` is worth threads."""
    parts = min(blocks, _threads()) if work >= PARALLEL_MIN_ELEMENTS else 1
    bounds = [blocks * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)] if parts > 1 else [(0, blocks)]


def _accumulate(acc: np.ndarray, flat: list[np.ndarray], scales: list[float], starts: range) -> None:
    """acc[block] += float64(x_i[block]) * scale_i over i in order, for each block in ``starts``."""
    scratch = np.empty(min(acc.size, AVERAGE_BLOCK), dtype=np.float64)
    for start in starts:
        block = acc[start:start + AVERAGE_BLOCK]
        product = scratch[:block.size]
        for values, scale in zip(flat, scales, strict=True):
            np.multiply(values[start:start + AVERAGE_BLOCK], scale, out=product, dtype=np.float64)
            block += product


def weighted_average(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> dict[str, np.ndarray]:
    """sum_i w_i * theta_i / sum_i w_i per key: the one weighted average of the platform (FedAvg and
    FedRep bodies, weights = sample counts or equal; KD3A's domain-weighted models).

    Accumulates in float64 and returns each array in its input dtype; integer arrays (BatchNorm's
    ``num_batches_tracked``) are rounded to the nearest integer, so equal counts stay equal (a plain
    cast would truncate 2.9999 to 2)."""
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    keys = list(updates[0][0])
    for arrays, _ in updates[1:]:
        if list(arrays) != keys:
            raise ValueError(f"updates disagree on keys: {sorted(arrays)} vs {sorted(keys)}")
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    out: dict[str, np.ndarray] = {}
    scales = [weight / total for _, weight in updates]
    for key in keys:
        shape = np.shape(updates[0][0][key])
        acc = np.zeros(math.prod(shape), dtype=np.float64)
        flat = [np.asarray(arrays[key]).reshape(-1) for arrays, _ in updates]
        # Block by block, so that the float64 sum and product stay in cache across the updates:
        # per element the same operations in the same order as acc += float64(x_i) * w_i / total
        # over i (tests/test_fedrep_math.py checks it bit for bit), without a float64 copy of each
        # update; 1.09x faster for 1,000 paper-CNN models, measured beside an experiment run.
        # Large sums split their blocks over threads (NumPy lets go of the GIL for each block's
        # arithmetic): the same operations on each element, so the same bits, in less time
        # while the server waits on it between a round's phases.
        starts = range(0, acc.size, AVERAGE_BLOCK)
        chunks = _thread_chunks(len(starts), acc.size * len(flat))
        if len(chunks) == 1:
            _accumulate(acc, flat, scales, starts)
        else:
            parts = [starts[first:last] for first, last in chunks]
            n = len(parts)
            list(_pool().map(_accumulate, [acc] * n, [flat] * n, [scales] * n, parts))
        acc = acc.reshape(shape)
        dtype = np.asarray(updates[0][0][key]).dtype
        if np.issubdtype(dtype, np.integer):
            np.rint(acc, out=acc)
        out[key] = acc.astype(dtype)
    return out


def summarize(values: Sequence[float], weights: Sequence[float] | None = None) -> dict[str, float]:
    """Mean, std, min, max of per-client values (the paper reports the unweighted mean of local
    accuracies); ``weighted-mean`` too when weights are given."""
    arr = np.asarray(values, dtype=np.float64)
    out = {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        out["weighted-mean"] = float((arr * w).sum() / w.sum())
    return out


# The paper's headline number (official main_fedrep.py ``accs10``): the test-size-weighted mean
# local accuracy, averaged over the last 10 training rounds (evaluated every round there).
PAPER_WINDOW = 10
PAPER_METRIC = "accuracy-last10"
WEIGHTED_ACCURACY = "accuracy-weighted-mean"


def last_rounds_mean(per_round: Mapping[int, float | None], server_round: int,
                     window: int = PAPER_WINDOW) -> float | None:
    """Mean of ``per_round[r]`` over the ``window`` rounds ending at ``server_round`` (all rounds
    so far when fewer have run); None unless every one of them has a value. The official code
    divides by 10 even when fewer rounds ran (``accs10 += acc_test/10``); we average what ran."""
    rounds = range(max(1, server_round - window + 1), server_round + 1)
    values = [per_round.get(r) for r in rounds]
    if any(v is None for v in values):
        return None
    return float(np.mean(np.asarray(values, dtype=np.float64)))
