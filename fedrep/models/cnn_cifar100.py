"""The official FedRep CIFAR-100 network (``models/Nets.py`` ``CNNCifar100``).

conv(5x5, 64) -> maxpool -> conv(5x5, 128) -> maxpool -> fc 256 -> fc 128 -> dropout(0.6) ->
fc num_classes. Representation = both convs, fc1 and fc2 (official CIFAR ``w_glob_keys``: weight
keys 0, 1, 3, 4 = fc1, fc2, conv2, conv1); head = fc3. As for :class:`PaperCNN`, the official
forward ends in log_softmax; we return logits and the loss applies cross-entropy.
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel, conv_stack, dense_stack


class CifarCNN100(SplitModel):
    def __init__(self, num_classes: int = 100, in_channels: int = 3) -> None:
        body = nn.Sequential(*conv_stack(in_channels, 64, 128), *dense_stack(128 * 5 * 5, 256, 128),
                             nn.Dropout(0.6))
        super().__init__(body, nn.Linear(128, num_classes))
