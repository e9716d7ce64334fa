"""Networks with an explicit representation (body) / head split.

A model *declares* its split by holding two submodules, ``body`` and ``head``; which parameter
names belong to the representation follows from that structure, never from string matching on
layer names. Strategies then choose what travels (FedRep: the body; LG-FedAvg: the head).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Task = Literal["classification", "regression"]

# State-dict buffers a BatchNorm layer keeps besides its affine weight and bias.
BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_batchnorm(module: nn.Module) -> bool:
    """Every BatchNorm flavour (1d, 2d, 3d, SyncBatchNorm): the one test fedrep uses for
    "this layer keeps batch statistics" (minimum batch size, FedBN, KD3A's BN alignment)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_bn_buffer(key: str) -> bool:
    """Whether a state-dict key is a BatchNorm running statistic or batch counter."""
    return key.rsplit(".", 1)[-1] in BN_BUFFER_SUFFIXES


class SplitModel(nn.Module):
    """``forward(x) = head(body(x))``; ``body`` is the shared representation phi, ``head`` is h_i."""

    task: Task = "classification"

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def representation_keys(self) -> list[str]:
        """State-dict keys of the representation (``body.*``), in state-dict order."""
        return [f"body.{k}" for k in self.body.state_dict()]

    def head_keys(self) -> list[str]:
        return [f"head.{k}" for k in self.head.state_dict()]

    def body_is_deterministic(self) -> bool:
        """True when the body has no train-time randomness or batch statistics, i.e. its output
        for a sample does not depend on train/eval mode or on the rest of the batch."""
        return not any(isinstance(m, nn.modules.dropout._DropoutNd) or is_batchnorm(m)
                       for m in self.body.modules())
