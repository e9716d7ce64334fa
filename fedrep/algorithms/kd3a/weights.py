"""Domain weights and the weighted model aggregation of KD3A (paper, sections "Consensus Focus"
and "BatchNorm MMD"; official ``train/train.py::train`` and
``lib/utils/federated_utils.py::{create_domain_weight, update_domain_weight, federated_average}``).

Weights are a vector ``[S + 1]``: index 0 is the target domain, 1..S the sources, as in the official
``domain_weight`` list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedrep.algorithms.aggregate import weighted_average
from fedrep.models.base import is_bn_buffer

# Official ``update_domain_weight`` default, used by ``train.py``.
DOMAIN_WEIGHT_MOMENTUM = 0.9


def initial_domain_weights(num_sources: int) -> Tensor:
    """[S + 1] uniform ``1 / (S + 1)``: official ``create_domain_weight``.

    In the official loop it only matters when training resumes past epoch 0; at epoch 0 the first
    round's weights replace it (see :func:`moving_average_weights`)."""
    if num_sources < 1:
        raise ValueError(f"initial_domain_weights: need at least one source, got {num_sources}")
    return torch.full((num_sources + 1,), 1.0 / (num_sources + 1), dtype=torch.float64)


def domain_weights(
    consensus_focus: Tensor, target_passed_fraction: float, source_sample_counts: Tensor | None = None
) -> Tensor:
    """[S + 1] this round's domain weights: target first, then the sources.

    Official ``train.py`` (after the target's round): with ``alpha`` = the fraction of the round's
    target samples whose knowledge vote passed the gate (``sum(consensus_weight) / #samples``),
    the target gets ``alpha / (S + 1)``: at most a uniform share, scaled by how much of the target the
    sources could label. The sources share ``1 - alpha / (S + 1)`` in proportion to their consensus
    focus ``consensus_focus`` [S]. Differences from the official code, all deliberate:

    - negative focus is clipped to 0 (a no-op for the official Shapley focus, which is >= 0 because
      consensus quality is monotone; it protects hand-made or approximated focus values);
    - ``source_sample_counts`` [S], if given, multiplies the focus (the paper's sample-count factor
      ``N_k``; the official code trains every source on the same number of batches per round, so the
      factor is constant there and it omits it);
    - if all focus is 0 the official code adds 1e-3 to each, i.e. splits uniformly; here too, or in
      proportion to ``source_sample_counts`` when given;
    - no rounding: the official code rounds every weight to 4 decimals, so its weights need not sum
      to exactly 1; these do.
    """
    focus = torch.as_tensor(consensus_focus, dtype=torch.float64)
    if focus.dim() != 1 or focus.numel() == 0:
        raise ValueError(
            f"domain_weights: consensus_focus must be a non-empty [S] vector, got shape {tuple(focus.shape)}"
        )
    if not 0.0 <= target_passed_fraction <= 1.0:
        raise ValueError(f"domain_weights: target_passed_fraction={target_passed_fraction} is not in [0, 1]")
    num_sources = focus.numel()
    share = focus.clamp_min(0.0)
    fallback = torch.ones(num_sources, dtype=torch.float64)
    if source_sample_counts is not None:
        counts = torch.as_tensor(source_sample_counts, dtype=torch.float64)
        if counts.shape != focus.shape or bool((counts < 0).any()) or float(counts.sum()) <= 0:
            raise ValueError(
                f"domain_weights: source_sample_counts must be {num_sources} non-negative counts with a "
                f"positive sum, got {counts.tolist()}"
            )
        share = share * counts
        fallback = counts
    if float(share.sum()) <= 0.0:
        share = fallback
    target = target_passed_fraction / (num_sources + 1)
    sources = (1.0 - target) * share / share.sum()
    return torch.cat([torch.tensor([target], dtype=torch.float64), sources])


def moving_average_weights(
    previous: Tensor | None, new: Tensor, momentum: float = DOMAIN_WEIGHT_MOMENTUM
) -> Tensor:
    """``momentum * previous + (1 - momentum) * new`` [S + 1]: official ``update_domain_weight``.

    ``train.py`` calls it with the default momentum 0.9 on every round but the first; at epoch 0 it
    takes the round's weights as they are. Pass ``previous=None`` for that first round. The official
    code also rounds the result to 4 decimals; this does not. Two vectors that sum to 1 give one that
    sums to 1.
    """
    new = torch.as_tensor(new, dtype=torch.float64)
    if previous is None:
        return new.clone()
    previous = torch.as_tensor(previous, dtype=torch.float64)
    if previous.shape != new.shape:
        raise ValueError(
            f"moving_average_weights: shapes differ, {tuple(previous.shape)} vs {tuple(new.shape)}"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"moving_average_weights: momentum={momentum} is not in [0, 1]")
    return momentum * previous + (1.0 - momentum) * new


def aggregate_state_dicts(
    states: Sequence[Mapping[str, Tensor]], weights: Tensor, aggregate_bn_statistics: bool = True
) -> dict[str, Tensor]:
    """``sum_i w_i * state_i`` per key, with ``weights`` [len(states)] normalised to sum to 1.

    Official ``federated_average(model_list, domain_weight, batchnorm_mmd)``, called with the target's
    model first and the domain weights of :func:`domain_weights`:

    - ``batchnorm_mmd=True`` (all official configs): every ``state_dict`` entry is averaged, BN
      ``running_mean``/``running_var`` included (this *is* the official "BatchNorm MMD": the target's
      BN statistics become the domain-weighted mix of all domains' statistics, the minimiser of the
      paper's BN-MMD over the target statistics, see :mod:`~fedrep.algorithms.kd3a.batchnorm`;
      the official sources' statistics at that point were gathered on the target's batches during
      the vote, which :class:`~fedrep.algorithms.kd3a.rule.KD3ARule` reproduces), and
      ``num_batches_tracked`` too (official: a float weighted sum copied back into the long buffer,
      i.e. truncated; here rounded to the nearest integer so equal counts stay equal, the rule of
      :func:`fedrep.algorithms.aggregate.weighted_average`, which does the arithmetic).
    - ``batchnorm_mmd=False`` (``aggregate_bn_statistics=False`` here): only ``named_parameters`` are
      averaged (BN's affine weight and bias included); BN buffers stay each model's own. Here they are
      left out of the result, so every participant keeps its local ones.

    Only the feature extractors go through ``federated_average`` in the official code; every domain's
    classifier stays local. Float entries are accumulated in float64 and returned in their own dtype.
    """
    if not states:
        raise ValueError("aggregate_state_dicts needs at least one state dict")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != len(states):
        raise ValueError(f"aggregate_state_dicts: {len(states)} states but {w.numel()} weights")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(
            f"aggregate_state_dicts: weights must be non-negative with a positive sum, got {w.tolist()}"
        )
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise ValueError(
                f"aggregate_state_dicts: state {i} has keys {sorted(set(state) ^ set(keys))} that state 0 "
                "does not share (or a different order); aggregate models of one architecture"
            )
    kept = [k for k in keys if aggregate_bn_statistics or not is_bn_buffer(k)]
    averaged = weighted_average([({k: state[k].detach().cpu().numpy() for k in kept}, weight)
                                 for state, weight in zip(states, w.tolist(), strict=True)])
    return {k: torch.from_numpy(averaged[k]) for k in kept}
