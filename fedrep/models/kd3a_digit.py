"""KD3A's official Digit-Five network (github.com/FengHZ/KD3A ``model/digit5.py``: ``CNN`` +
``Classifier``), layer for layer.

Encoder: conv(5x5, 64, pad 2) BN ReLU maxpool(3, 2, 1) -> conv(5x5, 64, pad 2) BN ReLU maxpool(3, 2,
1) -> conv(5x5, 128, pad 2) BN ReLU, so 3x32x32 gives 128x8x8 = 8192 features; then fc 8192 -> 3072
BN ReLU dropout(0.5) -> fc 3072 -> 2048 BN ReLU. Classifier: fc 2048 -> classes. Body = CNN (the
part KD3A aggregates), head = Classifier. :class:`fedrep.models.domain_cnn.DomainCNN` is the
narrowed stand-in that two CPU cores train in minutes.
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel


def _conv(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, stride=1, padding=2), nn.BatchNorm2d(cout), nn.ReLU()]
    return [*layers, nn.MaxPool2d(3, stride=2, padding=1)] if pool else layers


class KD3ADigitCNN(SplitModel):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        body = nn.Sequential(
            *_conv(in_channels, 64, pool=True), *_conv(64, 64, pool=True), *_conv(64, 128, pool=False),
            nn.Flatten(),
            nn.Linear(8192, 3072), nn.BatchNorm1d(3072), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(3072, 2048), nn.BatchNorm1d(2048), nn.ReLU(),
        )
        super().__init__(body, nn.Linear(2048, num_classes))
