"""The "FedAvg CNN" that PFLlib (``system/flcore/trainmodel/models.py`` ``FedAvgCNN``) and many
personalised-FL papers report on, after McMahan et al. (2017).

conv(5x5, 32) -> ReLU -> maxpool 2 -> conv(5x5, 64) -> ReLU -> maxpool 2 -> fc 512 -> ReLU ->
fc num_classes; no padding, so 28x28 inputs give 64*4*4 = 1024 features and 32x32 give 64*5*5 =
1600. Representation = everything but the last layer (PFLlib's FedRep/FedPer ``head = fc``).
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel, conv_stack, dense_stack


class FedAvgCNN(SplitModel):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"FedAvgCNN needs images of at least 16x16 pixels, got {image_size}")
        body = nn.Sequential(*conv_stack(in_channels, 32, 64), *dense_stack(64 * side * side, 512))
        super().__init__(body, nn.Linear(512, num_classes))
