"""A BatchNorm CNN for 3x32x32 multi-domain data (KD3A).

KD3A's digit network (official ``model/digit5.py``) is conv(64)-conv(64)-conv(128) with BatchNorm,
then fc 8192->3072->2048 with BatchNorm and a linear classifier. BatchNorm is the point: KD3A
aligns domains through BN statistics. This keeps that structure at a width two CPU cores can
train in minutes (``width`` scales the channels; 64 gives the official conv widths). On 1x28x28
Fashion-MNIST it gives the other strategies a BatchNorm model (BN-only personalization).
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel


class DomainCNN(SplitModel):
    """body: the feature extractor KD3A aggregates; head: the per-domain classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32, features: int = 256,
                 in_channels: int = 3, image_size: int = 32) -> None:
        side = ((image_size - 4) // 2 - 4) // 2  # 32 -> 14 -> 5; 28 -> 12 -> 4
        body = nn.Sequential(
            nn.Conv2d(in_channels, width, 5), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * side * side, features), nn.BatchNorm1d(features), nn.ReLU(),
        )
        super().__init__(body, nn.Linear(features, num_classes))

