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


SUM_GROUP = 16  # updates per partial sum of a train round (see weighted_average)


def sum_groups(ranks: Sequence[int]) -> list[int]:
    """The partial-sum group of each update, from its rank among the round's sampled clients
    (the position of its partition in the sorted sample): ``SUM_GROUP`` consecutive ranks a group.
    A function of the sample alone, so the same on a server that sums every reply itself and in
    a simulation whose workers pre-sum whole groups (``fedrep.flower_runtime.presum``)."""
    return [rank // SUM_GROUP for rank in ranks]


def _check_updates(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> list[str]:
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    keys = list(updates[0][0])
    for arrays, _ in updates[1:]:
        if list(arrays) != keys:
            raise ValueError(f"updates disagree on keys: {sorted(arrays)} vs {sorted(keys)}")
    return keys


def weighted_sum(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """sum_i float64(theta_i) * w_i per key, in the updates' order, from zero: one group's partial
    sum, float64, in the updates' shapes. Bit for bit the same wherever it runs (the server, or a
    simulation worker pre-summing a group), since it is the same NumPy operations in the same order."""
    keys = _check_updates(updates)
    weights = [float(weight) for _, weight in updates]
    out: dict[str, np.ndarray] = {}
    for key in keys:
        shape = np.shape(updates[0][0][key])
        acc = np.zeros(math.prod(shape), dtype=np.float64)
        flat = [np.asarray(arrays[key]).reshape(-1) for arrays, _ in updates]
        # Block by block, so that the float64 sum and product stay in cache across the updates:
        # per element the same operations in the same order as acc += float64(x_i) * w_i over i
        # (tests/test_fedrep_math.py checks it bit for bit), without a float64 copy of each
        # update; 1.09x faster for 1,000 paper-CNN models, measured beside an experiment run.
        # Large sums split their blocks over threads (NumPy lets go of the GIL for each block's
        # arithmetic): the same operations on each element, so the same bits.
        starts = range(0, acc.size, AVERAGE_BLOCK)
        chunks = _thread_chunks(len(starts), acc.size * len(flat))
        if len(chunks) == 1:
            _accumulate(acc, flat, weights, starts)
        else:
            parts = [starts[first:last] for first, last in chunks]
            n = len(parts)
            list(_pool().map(_accumulate, [acc] * n, [flat] * n, [weights] * n, parts))
        out[key] = acc.reshape(shape)
    return out


def average_of_sums(sums: Sequence[Mapping[str, np.ndarray]], total_weight: float,
                    dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """(sum_g sums_g) / total_weight per key, the partial sums added in order from zero, each
    result in ``dtypes``' type; integer arrays (BatchNorm's ``num_batches_tracked``) are rounded
    to the nearest integer, so equal counts stay equal (a plain cast would truncate 2.9999 to 2)."""
    if not sums:
        raise ValueError("average_of_sums needs at least one partial sum")
    if total_weight <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    out: dict[str, np.ndarray] = {}
    for key, dtype in dtypes.items():
        acc = np.zeros(np.shape(sums[0][key]), dtype=np.float64)
        for partial in sums:
            acc += partial[key]
        acc /= total_weight
        if np.issubdtype(dtype, np.integer):
            np.rint(acc, out=acc)
        out[key] = acc.astype(dtype)
    return out


def weighted_average(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    groups: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """sum_i w_i * theta_i / sum_i w_i per key: the one weighted average of the platform (FedAvg and
    FedRep bodies, weights = sample counts or equal; KD3A's domain-weighted models).

    ``groups`` (non-decreasing, one per update; :func:`sum_groups`) splits the sum into partial
    sums of consecutive updates (:func:`weighted_sum`), added in order and divided by the total
    weight (:func:`average_of_sums`): the arithmetic of a train round, whose partial sums a
    simulation's workers may have made already. None: one group. Accumulates in float64 and
    returns each array in its input dtype. Sum, then divide, as the official FedRep code does
    (lgcollins/FedRep ``main_fedrep.py``: ``w_glob[key] += w_local[key]*lens[idx]``, then
    ``torch.div(w_glob[k], total_len)``; there in float32, in one sequence)."""
    keys = _check_updates(updates)
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    groups = [0] * len(updates) if groups is None else list(groups)
    if len(groups) != len(updates) or any(b < a for a, b in zip(groups, groups[1:], strict=False)):
        raise ValueError(f"groups: one non-decreasing group id per update, got {groups[:8]}... "
                         f"for {len(updates)} updates")
    bounds = [0] + [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]] + [len(groups)]
    sums = [weighted_sum(updates[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    dtypes = {key: np.asarray(updates[0][0][key]).dtype for key in keys}
    return average_of_sums(sums, total, dtypes)


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
