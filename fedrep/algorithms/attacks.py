"""Simulated attackers, for testing robust aggregation (plain PyTorch, no Flower).

Which clients attack is a function of (seed, share), like the held-out new clients, so every
process (server, each ClientApp) agrees without being told. Label flipping changes what an
attacker trains on; model poisoning changes what it sends (its body update, sign-flipped or
scaled); its head is never sent, so only the shared part is attacked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

ATTACKER_SALT = 0xA77AC


def attackers(num_clients: int, share: float, seed: int) -> frozenset[int]:
    """A seeded random ``round(share * n)`` of the partitions (at least one when share > 0)."""
    if share <= 0:
        return frozenset()
    count = max(1, round(share * num_clients))
    rng = np.random.default_rng([seed, ATTACKER_SALT])
    return frozenset(int(p) for p in rng.choice(num_clients, size=count, replace=False))


def flip_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """y -> C - 1 - y (a fixed permutation with no fixed point for even C)."""
    return (num_classes - 1) - labels


def poison_update(sent: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], attack: str,
                  scale: float) -> dict[str, torch.Tensor]:
    """What a model-poisoning attacker sends instead of ``trained``: the global arrays it got
    (``sent``) plus its update multiplied by ``-scale`` ('sign-flip') or ``scale`` ('scale').
    Integer buffers (BatchNorm's batch counter) are sent as trained."""
    factor = {"sign-flip": -scale, "scale": scale}[attack]
    out = {}
    for key, value in trained.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        out[key] = sent[key] + factor * (value - sent[key])
    return out
