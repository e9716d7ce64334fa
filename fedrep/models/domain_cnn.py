"""A BatchNorm CNN for 3x32x32 multi-domain data (KD3A).

KD3A's digit network (official ``model/digit5.py``) is conv(64)-conv(64)-conv(128) with BatchNorm,
then fc 8192->3072->2048 with BatchNorm and a linear classifier. BatchNorm is the point: KD3A
aligns domains through BN statistics. This keeps that structure at a width two CPU cores can
train in minutes (``width`` scales the channels; 64 gives the official conv widths).
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel


class DomainCNN(SplitModel):
    """body: the feature extractor KD3A aggregates; head: the per-domain classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32, features: int = 256) -> None:
        body = nn.Sequential(
            nn.Conv2d(3, width, 5), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),           # 14x14
            nn.Conv2d(width, 2 * width, 5), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),  # 5x5
            nn.Flatten(),
            nn.Linear(2 * width * 25, features), nn.BatchNorm1d(features), nn.ReLU(),
        )
        super().__init__(body, nn.Linear(features, num_classes))

