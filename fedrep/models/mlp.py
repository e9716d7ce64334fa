"""The official FedRep MLP (``models/Nets.py`` ``MLP``): 784 -> 512 -> 256 -> 64 -> classes.

Representation = the three hidden layers (official MNIST ``w_glob_keys`` = layers 0, 1, 2);
head = the output layer. The official forward ends in softmax and then applies cross-entropy to
probabilities (a known quirk); we return logits.
"""

from __future__ import annotations

from torch import nn

from fedrep.models.base import SplitModel


class PaperMLP(SplitModel):
    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 64),
            nn.ReLU(),
        )
        super().__init__(body, nn.Linear(64, num_classes))
