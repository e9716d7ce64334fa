"""What a model needs to know about a data set before any client loads it: one sample's shape
and the number of classes. The server builds the model from this (its first representation),
so it must not require loading the data, except for a PFLlib folder, where the folder itself is
the only source (its ``config.json`` and the header of one client file).
"""

from __future__ import annotations

from pathlib import Path

from fedrep.config import RunConfig

SAMPLE_SHAPES: dict[str, tuple[int, ...]] = {
    "fashion-mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "femnist": (1, 28, 28),
    "sent140": (25, 300),  # 25 words, each its 300-d GloVe vector
    "fmnist-domains": (3, 32, 32),
    "digit-five": (3, 32, 32),
}


def sample_shape(cfg: RunConfig) -> tuple[int, ...]:
    if cfg.dataset == "pfllib":
        from fedrep.data.partition_file import inspect_pfllib

        return tuple(inspect_pfllib(Path(cfg.partition_file)).sample_shape)
    return SAMPLE_SHAPES[cfg.dataset]


def class_count(cfg: RunConfig) -> int:
    if cfg.dataset == "pfllib":
        from fedrep.data.partition_file import inspect_pfllib

        return inspect_pfllib(Path(cfg.partition_file)).num_classes
    return cfg.num_classes()
