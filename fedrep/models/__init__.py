"""Model zoo: every model is a :class:`SplitModel` with a declared body/head split."""

from __future__ import annotations

import torch

from fedrep.config import RunConfig
from fedrep.models.base import SplitModel
from fedrep.models.cnn import PaperCNN
from fedrep.models.domain_cnn import DomainCNN
from fedrep.models.linear import LinearRepresentation
from fedrep.models.mlp import PaperMLP

__all__ = ["SplitModel", "PaperCNN", "DomainCNN", "PaperMLP", "LinearRepresentation", "build_model"]


def build_model(cfg: RunConfig) -> SplitModel:
    """The run's model, initialised from the run seed so server and clients agree on the start
    (the official code copies one ``net_glob`` to every client, heads included)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.model == "cnn":
            return PaperCNN(num_classes=10, in_channels=1, image_size=28)
        if cfg.model == "cnn-bn":
            shape = {"in_channels": 1, "image_size": 28} if cfg.dataset == "fashion-mnist" else {}
            width = {"width": cfg.model_width} if cfg.model_width else {}
            return DomainCNN(num_classes=10, **shape, **width)
        if cfg.model == "mlp":
            return PaperMLP(in_features=28 * 28, num_classes=10)
        return LinearRepresentation(cfg.linear_dim, cfg.linear_rank)
