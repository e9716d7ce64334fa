"""Consensus quality and consensus focus (KD3A paper, section "Consensus Focus"; official
``lib/utils/federated_utils.py::calculate_consensus_focus``).

Consensus quality of a set ``T`` of sources is the summed confidence of the consensus that ``T``
alone reaches, over the samples where someone in ``T`` passes the gate::

    Q(T) = sum_n conf_n(T) * 1[some source in T is confident on n],   Q({}) = 0

with ``conf_n(T)`` the winning class's sum of confident max-probabilities (``n_i`` times their mean;
see :mod:`~fedrep.algorithms.kd3a.vote`). Q is monotone: adding a source only adds a non-negative
ballot to one class or turns a 0-weight sample into a positive one, so every marginal contribution,
and hence every consensus focus below, is >= 0. A malicious or irrelevant source is therefore driven
towards, not below, zero weight.

Consensus focus of source ``k`` is its marginal contribution to Q. The official code computes the
**exact Shapley value**: Q of all ``2^S`` subsets, then the average over all ``S!`` permutations of
``Q(prefix + k) - Q(prefix)`` (:func:`consensus_focus_exact` is that value, computed over subsets). It
does this per target batch and sums over the round's batches; since Shapley is linear in Q and Q is a
sum over samples, that equals the Shapley value of the round's pooled samples, which is what these
functions compute when given all of them. It is *not* the leave-one-out difference
``Q(all) - Q(all minus k)``; that cheaper O(S) variant is :func:`consensus_focus_leave_one_out`
(not official). :func:`consensus_focus_monte_carlo` is an unbiased permutation-sampling estimate of
the exact value for many sources.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from fedrep.algorithms.kd3a.vote import check_source_probs, confident_ballots

# 2^S subset qualities are enumerated; beyond this use the Monte-Carlo estimate.
MAX_EXACT_SOURCES = 20
# Elements of the [subsets, N, C] score tensor evaluated at once.
_CHUNK_ELEMENTS = 1 << 22


def _quality_of_ballots(ballots: Tensor) -> Tensor:
    """Q from confident ballots [S', N, C] of a subset: sum over samples of the best class's sum."""
    return ballots.sum(dim=0).amax(dim=1).sum()


def consensus_quality(source_probs: Tensor, gate: float, subset: Iterable[int]) -> float:
    """Q(subset) for the sources' predictions ``source_probs`` [S, N, C] (see module docstring).

    Equals ``sum(conf * mask)`` of the official ``knowledge_vote`` run on ``knowledge_list[:, subset]``,
    as ``calculate_consensus_focus`` computes each ``domain_contribution``. The empty subset has Q = 0.
    """
    check_source_probs(source_probs)
    index = sorted(set(int(k) for k in subset))
    num_sources = source_probs.shape[0]
    if any(not 0 <= k < num_sources for k in index):
        raise ValueError(f"consensus_quality: subset {index} names a source outside [0, {num_sources})")
    if not index:
        return 0.0
    ballots = confident_ballots(source_probs[index].double(), gate)
    return float(_quality_of_ballots(ballots))


def subset_qualities(source_probs: Tensor, gate: float) -> Tensor:
    """[2^S] float64: ``Q(T)`` for every subset ``T``, indexed by the bitmask with bit ``k`` = source k.

    Cost O(2^S * S * N * C), evaluated in chunks of subsets to bound memory.
    """
    check_source_probs(source_probs)
    num_sources, num_samples, num_classes = source_probs.shape
    if num_sources > MAX_EXACT_SOURCES:
        raise ValueError(
            f"subset_qualities: {num_sources} sources means 2^{num_sources} subsets; use "
            f"consensus_focus_monte_carlo above {MAX_EXACT_SOURCES} sources"
        )
    ballots = confident_ballots(source_probs.double(), gate)  # [S, N, C]
    num_subsets = 1 << num_sources
    members = (torch.arange(num_subsets).unsqueeze(1) >> torch.arange(num_sources)) & 1  # [2^S, S]
    members = members.double()
    chunk = max(1, _CHUNK_ELEMENTS // (num_samples * num_classes))
    out = torch.empty(num_subsets, dtype=torch.float64)
    for start in range(0, num_subsets, chunk):
        scores = torch.einsum("ms,snc->mnc", members[start:start + chunk], ballots)
        out[start:start + chunk] = scores.amax(dim=2).sum(dim=1)
    return out


def shapley_from_qualities(qualities: Tensor) -> Tensor:
    """[S] Shapley values of the set function given as ``qualities`` [2^S] (bitmask-indexed).

    ``phi_k = sum_{T not containing k} |T|! (S - |T| - 1)! / S! * (Q(T + k) - Q(T))``, the subset form
    of the official permutation average (same number, ``2^S`` instead of ``S!`` terms).
    """
    num_subsets = qualities.shape[0]
    num_sources = num_subsets.bit_length() - 1
    if num_subsets != 1 << num_sources:
        raise ValueError(f"shapley_from_qualities: length {num_subsets} is not a power of two")
    masks = torch.arange(num_subsets)
    sizes = torch.tensor([bin(m).count("1") for m in range(num_subsets)])
    coefficient = torch.tensor(
        [math.factorial(t) * math.factorial(num_sources - t - 1) / math.factorial(num_sources)
         if t < num_sources else 0.0 for t in range(num_sources + 1)],
        dtype=torch.float64,
    )
    phi = torch.empty(num_sources, dtype=torch.float64)
    for k in range(num_sources):
        without_k = masks[(masks >> k) & 1 == 0]
        gain = qualities[without_k | (1 << k)] - qualities[without_k]
        phi[k] = (coefficient[sizes[without_k]] * gain.double()).sum()
    return phi


def consensus_focus_exact(source_probs: Tensor, gate: float) -> Tensor:
    """[S] exact Shapley value of each source for consensus quality: the official consensus focus.

    Official ``calculate_consensus_focus`` (enumerates all ``S!`` permutations); here over ``2^S``
    subsets. Efficiency: the values sum to ``Q(all) - Q({}) = Q(all)``. Returned in float64.
    """
    return shapley_from_qualities(subset_qualities(source_probs, gate))


def consensus_focus_monte_carlo(
    source_probs: Tensor, gate: float, num_permutations: int, generator: torch.Generator | None = None
) -> Tensor:
    """[S] unbiased estimate of :func:`consensus_focus_exact` from ``num_permutations`` random orders.

    Each uniformly drawn permutation gives every source its marginal gain over the sources before it;
    the expectation of that gain is the Shapley value, so the average is unbiased and its standard error
    falls as ``1 / sqrt(num_permutations)``. Cost O(num_permutations * S * N * C). Not in the official
    code (which is exact); for federations with many sources. Returned in float64.
    """
    if num_permutations < 1:
        raise ValueError(
            f"consensus_focus_monte_carlo: num_permutations must be >= 1, got {num_permutations}"
        )
    ballots = confident_ballots(source_probs.double(), gate)
    num_sources = ballots.shape[0]
    phi = torch.zeros(num_sources, dtype=torch.float64)
    for _ in range(num_permutations):
        order = torch.randperm(num_sources, generator=generator)
        running = torch.zeros_like(ballots[0])  # [N, C] class scores of the prefix
        before = 0.0
        for k in order.tolist():
            running += ballots[k]
            after = float(running.amax(dim=1).sum())
            phi[k] += after - before
            before = after
    return phi / num_permutations


def consensus_focus_leave_one_out(source_probs: Tensor, gate: float) -> Tensor:
    """[S] ``Q(all) - Q(all minus k)``: the marginal contribution to the full federation only.

    NOT the official consensus focus (that is the Shapley value, :func:`consensus_focus_exact`); a
    cheap O(S) approximation. It is blind to redundancy: two identical good sources each get 0 here.
    """
    ballots = confident_ballots(source_probs.double(), gate)
    total = _quality_of_ballots(ballots)
    num_sources = ballots.shape[0]
    out = torch.empty(num_sources, dtype=torch.float64)
    for k in range(num_sources):
        rest = torch.cat([ballots[:k], ballots[k + 1:]])
        out[k] = total - (_quality_of_ballots(rest) if rest.shape[0] else 0.0)
    return out
