"""The FedRep paper's CNN (official ``models/Nets.py`` ``CNNCifar``), sized for its input.

conv(5x5, 64) -> maxpool -> conv(5x5, 64) -> maxpool -> fc 120 -> fc 64 -> fc num_classes.
Representation = both convs and the first two fc layers; head = the last fc layer, exactly the
official ``w_glob_keys`` for CIFAR. The official model ends in log_softmax; we return logits
and apply cross-entropy in the loss, which is the same objective.
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel, conv_stack, dense_stack


def _body(in_channels: int, image_size: int) -> nn.Sequential:
    side = ((image_size - 4) // 2 - 4) // 2  # two 5x5 valid convs, each followed by 2x2 pooling
    return nn.Sequential(*conv_stack(in_channels, 64, 64), *dense_stack(64 * side * side, 120, 64))


class PaperCNN(SplitModel):
    """28x28 greyscale (Fashion-MNIST: 64*4*4 features) or 32x32 RGB (CIFAR: 64*5*5)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        if image_size not in (28, 32):
            raise ValueError(f"PaperCNN supports 28x28 and 32x32 inputs, got {image_size}")
        super().__init__(_body(in_channels, image_size), nn.Linear(64, num_classes))
