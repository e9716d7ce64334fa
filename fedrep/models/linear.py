"""The paper's Section 5 model: ``y_hat = w_i^T B^T x`` with representation ``B`` (d x k) and
head ``w_i`` (k). ``body.weight`` is ``B^T`` (k x d) in torch's Linear convention."""

from __future__ import annotations

import torch
from torch import nn

from fedrep.models.base import SplitModel


class LinearRepresentation(SplitModel):
    task = "regression"

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__(nn.Linear(dim, rank, bias=False), nn.Linear(rank, 1, bias=False))

    def representation_matrix(self) -> torch.Tensor:
        """B, shape (d, k)."""
        return self.body.weight.detach().T
