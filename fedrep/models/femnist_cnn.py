"""The official FedRep FEMNIST CNN (``models/Nets.py`` ``CNN_FEMNIST``).

conv(5x5, 4) -> maxpool -> conv(5x5, 12) -> maxpool -> fc 120 -> fc 100 -> fc num_classes, ReLU
after each hidden layer. Representation = everything but the last layer. (The official script for
FEMNIST runs the MLP, ``scripts/FedRep_femnist.sh --model mlp``; its ``w_glob_keys`` for
``'mnist' in dataset`` = weight keys 0, 1, 2, which for this network's key order would share the
three fc layers and keep the convolutions local, a mismatch the official code never runs. We
split it like every other network: the last layer is the head.)
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel, conv_stack, dense_stack


class FemnistCNN(SplitModel):
    def __init__(self, num_classes: int = 10) -> None:
        body = nn.Sequential(*conv_stack(1, 4, 12), *dense_stack(12 * 4 * 4, 120, 100))
        super().__init__(body, nn.Linear(100, num_classes))
