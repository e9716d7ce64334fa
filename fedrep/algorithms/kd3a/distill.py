"""The target domain's training step on the consensus (KD3A paper, extended knowledge distillation
and "Knowledge Vote"; official ``train/train.py::train``, its "Domain adaptation on target domain" loop).

Per target batch the official code: votes (:func:`~fedrep.algorithms.kd3a.vote.knowledge_vote`),
mixes the images and the one-hot consensus with one ``lam ~ Beta(2, 2)`` and a random permutation
(:func:`mixup`), and minimises :func:`target_distillation_loss` with the *unmixed* 0/1 vote weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# Official target mixup: ``np.random.beta(2, 2)``, in both branches of ``mix_aug`` (so even the
# AmazonReview runs, which pass ``mix_aug=False``, do mix).
MIXUP_ALPHA = 2.0


@dataclass(frozen=True)
class MixedBatch:
    """Output of :func:`mixup`: ``x`` [N, ...], ``labels`` [N, C], ``weights`` [N], the coefficient
    ``lam`` and the permutation ``index`` [N] (sample ``n`` was mixed with sample ``index[n]``)."""

    x: Tensor
    labels: Tensor
    weights: Tensor
    lam: float
    index: Tensor


def sample_mixup_lambda(alpha: float = MIXUP_ALPHA, generator: torch.Generator | None = None) -> float:
    """``lam ~ Beta(alpha, alpha)``; 1 (no mixing) when ``alpha <= 0`` (official ``mixup_data``).

    Drawn with NumPy seeded from ``generator`` so a seeded torch generator reproduces it."""
    if alpha <= 0:
        return 1.0
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(
    x: Tensor,
    soft_labels: Tensor,
    weights: Tensor,
    alpha: float = MIXUP_ALPHA,
    generator: torch.Generator | None = None,
    mix_weights: bool = False,
    lam: float | None = None,
) -> MixedBatch:
    """Mix every sample with a randomly permuted partner: ``lam * a + (1 - lam) * a[index]``.

    ``x`` [N, ...] and ``soft_labels`` [N, C] are mixed with the same ``lam`` (drawn from
    Beta(alpha, alpha) unless given) and permutation, so each mixed label row keeps the mass of the
    originals (1 for one-hot rows). ``weights`` [N] are **not** mixed by default, as in the official
    code: sample ``n``'s loss keeps its own vote weight even though its label now carries
    ``1 - lam`` of a partner's consensus, which may be a zero-weight sample's fallback label.
    ``mix_weights=True`` mixes them like the labels instead (not official).
    """
    if x.shape[0] != soft_labels.shape[0] or weights.shape[0] != x.shape[0]:
        raise ValueError(
            f"mixup: batch sizes differ: x {tuple(x.shape)}, labels {tuple(soft_labels.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    if lam is None:
        lam = sample_mixup_lambda(alpha, generator)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixup: lam={lam} is not in [0, 1]")
    index = torch.randperm(x.shape[0], generator=generator).to(x.device)
    mixed_x = lam * x + (1.0 - lam) * x[index]
    mixed_labels = lam * soft_labels + (1.0 - lam) * soft_labels[index]
    mixed_weights = lam * weights + (1.0 - lam) * weights[index] if mix_weights else weights
    return MixedBatch(x=mixed_x, labels=mixed_labels, weights=mixed_weights, lam=lam, index=index)


def target_distillation_loss(logits: Tensor, consensus: Tensor, weight: Tensor) -> Tensor:
    """``mean_n weight_n * sum_c -consensus[n, c] * log_softmax(logits)[n, c]``, a scalar.

    Official ``task_loss_t``: soft-label cross-entropy against the (mixed) consensus ``consensus``
    [N, C], multiplied by the 0/1 vote weight ``weight`` [N] and averaged over *all* N samples
    (zero-weight ones count in the denominator): ``1/N sum_i 1[n_i >= 1] CE_i`` (official comment:
    "I(n_i>=1)/(N_T)").
    ``logits`` [N, C] are the target model's raw outputs.
    """
    if logits.shape != consensus.shape or weight.shape != logits.shape[:1]:
        raise ValueError(
            f"target_distillation_loss: shapes disagree: logits {tuple(logits.shape)}, consensus "
            f"{tuple(consensus.shape)}, weight {tuple(weight.shape)}"
        )
    per_sample = -(consensus * torch.log_softmax(logits, dim=1)).sum(dim=1)
    return (weight * per_sample).mean()
