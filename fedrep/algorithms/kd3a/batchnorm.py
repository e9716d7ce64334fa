"""BatchNorm MMD (KD3A paper, section "BatchNorm MMD").

The paper measures the target-to-source distance with an MMD whose quadratic kernel reduces it to
the first and second moments of every BN layer's input features ``pi_l``::

    L_BN = sum_k alpha_k sum_l ( ||mean(pi_l^T) - mu_l^k||^2 + ||var(pi_l^T) - sigma2_l^k||^2 )

where ``mu_l^k`` / ``sigma2_l^k`` are source ``k``'s BN running mean / variance (sent with its model,
so no source data is needed) and the target moments are those of the current target batch.

What the official code does: **no** explicit BN-MMD term enters any loss. Its ``batchnorm_mmd``
switch (True in all shipped configs) only makes ``federated_average`` average the whole
``state_dict``, BN running statistics included, with the domain weights
(:func:`~fedrep.algorithms.kd3a.weights.aggregate_state_dicts`). That is the closed-form answer for
the statistics: with weights summing to 1, ``sum_k a_k ||x - m_k||^2 = ||x - sum_k a_k m_k||^2 + const``
is minimised by the weighted average (:func:`weighted_bn_statistics`). :func:`bn_mmd_loss` is the
paper's differentiable loss, for a "bn-mmd loss" mode that also trains the layers below each BN.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedrep.models.base import is_batchnorm


@dataclass(frozen=True)
class BNStats:
    """Per-channel first and second moments of one BN layer's input: ``mean`` [C], ``var`` [C]."""

    mean: Tensor
    var: Tensor


def batch_statistics(features: Tensor) -> BNStats:
    """Mean and unbiased variance per channel of a BN input ``features`` [B, C, *spatial].

    Reduces over every dimension but 1, as BN does. The unbiased variance is what PyTorch folds into
    ``running_var``, so a batch compared with running statistics taken on that same batch (momentum 1)
    is at distance 0. Differentiable.
    """
    if features.dim() < 2:
        raise ValueError(f"batch_statistics: BN input must be [B, C, ...], got shape {tuple(features.shape)}")
    dims = [d for d in range(features.dim()) if d != 1]
    count = features.numel() // features.shape[1]
    if count < 2:
        raise ValueError("batch_statistics: need more than one value per channel for a variance")
    return BNStats(mean=features.mean(dim=dims), var=features.var(dim=dims, correction=1))


@contextmanager
def collect_bn_inputs(model: nn.Module) -> Iterator[dict[str, BNStats]]:
    """Record :func:`batch_statistics` of every BN layer's input during forwards inside the block.

    Yields a dict ``{module name: BNStats}`` (the names prefix the layers' state-dict keys, e.g.
    ``body.bn1`` for ``body.bn1.running_mean``) that fills as the model runs; a layer called twice
    keeps its last call. The statistics keep their autograd graph, so a loss on them trains the
    layers below each BN. Hooks are removed on exit::

        with collect_bn_inputs(model) as target_stats:
            logits = model(x_target)
        loss = distill + lam * bn_mmd_loss(target_stats, source_stats, weights)
    """
    stats: dict[str, BNStats] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            stats[name] = batch_statistics(inputs[0])

        return hook

    for name, module in model.named_modules():
        if is_batchnorm(module):
            handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def bn_statistics_from_state(state: Mapping[str, Tensor]) -> dict[str, BNStats]:
    """``{layer: BNStats(running_mean, running_var)}`` of every BN layer in a state dict."""
    out: dict[str, BNStats] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "running_mean":
            continue
        var_key = f"{prefix}.running_var" if prefix else "running_var"
        if var_key not in state:
            raise ValueError(f"bn_statistics_from_state: {key} has no matching {var_key}")
        out[prefix] = BNStats(mean=value, var=state[var_key])
    return out


def _normalised(weights: Tensor, count: int, where: str) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise ValueError(f"{where}: {count} sources but {w.numel()} weights")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"{where}: weights must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


def weighted_bn_statistics(
    source_states: Sequence[Mapping[str, Tensor]], weights: Tensor
) -> dict[str, BNStats]:
    """``{layer: BNStats(sum_k w_k mu_k, sum_k w_k sigma2_k)}`` with ``weights`` [K] normalised to 1.

    The variances are averaged linearly, as the official ``federated_average`` does with
    ``running_var`` (not the variance of the mixture, which would add the spread of the means). This is
    the minimiser over the target statistics of :func:`bn_mmd_loss`. Returned in the states' dtype.
    """
    per_source = [bn_statistics_from_state(state) for state in source_states]
    if not per_source:
        raise ValueError("weighted_bn_statistics needs at least one source state")
    w = _normalised(weights, len(per_source), "weighted_bn_statistics")
    out: dict[str, BNStats] = {}
    for layer, first in per_source[0].items():
        mean = torch.zeros(first.mean.shape, dtype=torch.float64)
        var = torch.zeros(first.var.shape, dtype=torch.float64)
        for k, (wk, stats) in enumerate(zip(w.tolist(), per_source, strict=True)):
            mean += wk * _layer(stats, layer, k).mean.detach().cpu().double()
            var += wk * _layer(stats, layer, k).var.detach().cpu().double()
        out[layer] = BNStats(mean=mean.to(first.mean.dtype), var=var.to(first.var.dtype))
    return out


def _layer(stats: Mapping[str, BNStats], layer: str, source: int) -> BNStats:
    if layer not in stats:
        raise KeyError(f"source {source} has no BN statistics for layer {layer!r}; layers: {sorted(stats)}")
    return stats[layer]


def bn_mmd_loss(
    target_stats: Mapping[str, BNStats], source_stats: Sequence[Mapping[str, BNStats]], weights: Tensor,
    per_channel_mean: bool = False,
) -> Tensor:
    """Paper's BN-MMD: ``sum_k a_k sum_l (||mu_l^T - mu_l^k||^2 + ||var_l^T - var_l^k||^2)``, a scalar.

    ``target_stats``: the target batch's moments per layer (:func:`collect_bn_inputs`);
    ``source_stats``: per source, its running statistics (:func:`bn_statistics_from_state`);
    ``weights`` [K]: the sources' domain weights, normalised here to sum to 1 (pass ``w[1:]`` of the
    ``[S + 1]`` domain weights). Summed over all layers of ``target_stats``. It equals the distance to
    :func:`weighted_bn_statistics` plus a constant, so its gradient pulls the target batch moments
    towards the weighted source statistics. Not used by the official code (see module docstring).
    ``per_channel_mean=True`` averages each layer's squared distances over its channels instead of
    summing them, so wide layers do not dominate and the loss stays on the scale of the
    distillation loss (what training uses; the paper leaves the scale to its weight).
    """
    if not target_stats:
        raise ValueError("bn_mmd_loss: no target BN statistics; run the forward inside collect_bn_inputs")
    w = _normalised(weights, len(source_stats), "bn_mmd_loss")
    total: Tensor | None = None
    for layer, target in target_stats.items():
        for k, (wk, stats) in enumerate(zip(w.tolist(), source_stats, strict=True)):
            source = _layer(stats, layer, k)
            mean = source.mean.to(target.mean).detach()
            var = source.var.to(target.var).detach()
            gap = ((target.mean - mean) ** 2).sum() + ((target.var - var) ** 2).sum()
            term = wk * (gap / target.mean.numel() if per_channel_mean else gap)
            total = term if total is None else total + term
    assert total is not None
    return total
