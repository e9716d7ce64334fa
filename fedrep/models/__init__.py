"""Model zoo: every model is a :class:`SplitModel` with a declared body/head split."""

from __future__ import annotations

import math

import torch

from fedrep.config import RunConfig
from fedrep.models.base import SplitModel
from fedrep.models.cnn import PaperCNN
from fedrep.models.cnn_cifar100 import CifarCNN100
from fedrep.models.domain_cnn import DomainCNN
from fedrep.models.fedavg_cnn import FedAvgCNN
from fedrep.models.femnist_cnn import FemnistCNN
from fedrep.models.kd3a_digit import KD3ADigitCNN
from fedrep.models.linear import LinearRepresentation
from fedrep.models.lstm import Sent140LSTM
from fedrep.models.mlp import PaperMLP

__all__ = ["SplitModel", "PaperCNN", "CifarCNN100", "DomainCNN", "FedAvgCNN", "FemnistCNN", "KD3ADigitCNN",
           "PaperMLP", "LinearRepresentation", "Sent140LSTM", "build_model"]


def build_model(cfg: RunConfig) -> SplitModel:
    """The run's model, initialised from the run seed so server and clients agree on the start
    (the official code copies one ``net_glob`` to every client, heads included)."""
    if cfg.model == "linear":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return LinearRepresentation(cfg.linear_dim, cfg.linear_rank)
    from fedrep.data.catalog import class_count, sample_shape

    shape, classes = sample_shape(cfg), class_count(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _network(cfg, shape, classes)


def _network(cfg: RunConfig, shape: tuple[int, ...], classes: int) -> SplitModel:
    """The network ``cfg.model`` for samples of ``shape`` (C, H, W) and ``classes`` outputs; a
    shape the network cannot take raises ValueError naming both."""
    image = len(shape) == 3 and shape[1] == shape[2]
    if cfg.model == "mlp":
        return PaperMLP(in_features=math.prod(shape), num_classes=classes)
    if cfg.model == "lstm":
        return Sent140LSTM(num_classes=classes, layout=cfg.lstm_input, max_words=shape[0])
    if cfg.model == "femnist-cnn" and shape == (1, 28, 28):
        return FemnistCNN(num_classes=classes)
    if cfg.model == "cnn-cifar100" and image and shape[1] == 32:
        return CifarCNN100(num_classes=classes, in_channels=shape[0])
    if cfg.model == "cnn" and image and shape[1] in (28, 32):
        return PaperCNN(num_classes=classes, in_channels=shape[0], image_size=shape[1])
    if cfg.model == "fedavg-cnn" and image and shape[1] >= 16:
        return FedAvgCNN(num_classes=classes, in_channels=shape[0], image_size=shape[1])
    if cfg.model == "kd3a-digit" and image and shape[1] == 32:
        return KD3ADigitCNN(num_classes=classes, in_channels=shape[0])
    if cfg.model == "cnn-bn" and image:
        width = {"width": cfg.model_width} if cfg.model_width else {}
        return DomainCNN(num_classes=classes, in_channels=shape[0], image_size=shape[1], **width)
    raise ValueError(f"model {cfg.model!r} cannot take samples of shape {shape} from dataset "
                     f"{cfg.dataset!r}; use 'mlp', or 'fedavg-cnn' for square images of 16 pixels or more")
