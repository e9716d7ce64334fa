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


def conv_stack(in_channels: int, *widths: int, kernel: int = 5) -> list[nn.Module]:
    """The convolutional front of the FedAvg-era CNNs (the paper's CNNs, CNN_FEMNIST, PFLlib's
    FedAvgCNN): per width a valid ``kernel`` x ``kernel`` conv, 2x2 max-pooling and ReLU, then a
    flatten. Each spatial side goes ``s -> (s - kernel + 1) // 2``.

    The official code applies ReLU before pooling (``pool(relu(conv(x)))``). Max-pooling and ReLU
    commute exactly (``relu(max(a, b)) == max(relu(a), relu(b))`` in floats too, and the
    gradient reaches the same element), so pooling first computes the same values and gradients
    while the ReLU touches a quarter of the elements (7% of a training epoch here). No parameter
    moves: the state-dict keys are the same."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel), nn.MaxPool2d(2, 2), nn.ReLU()]
        in_channels = width
    return [*layers, nn.Flatten()]


def dense_stack(*sizes: int) -> list[nn.Module]:
    """Fully connected layers ``sizes[0] -> sizes[1] -> ...``, each followed by ReLU."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return layers
