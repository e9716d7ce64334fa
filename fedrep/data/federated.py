"""Per-client data, built once per process.

A Flower client process (a Ray actor in simulation, a SuperNode's ClientApp process in
deployment) serves many rounds and, in simulation, many partitions. Partitions are computed once
per process per data-relevant config and each client's tensors once per process, so a round costs
no data loading after the first contact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedrep.config import MULTI_DOMAIN, RunConfig, domain_layout, domain_share
from fedrep.data import fashion_mnist, partition
from fedrep.data.synthetic import client_linear_data

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
LINEAR_TEST_SAMPLES = 100


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test split as ready-to-use tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def num_test(self) -> int:
        return len(self.y_test)


@dataclass(frozen=True)
class DataKey:
    """The config fields that decide a partition; the cache key."""

    dataset: str
    partition: str
    num_clients: int
    classes_per_client: int
    dirichlet_alpha: float
    max_train_per_client: int
    max_test_per_client: int
    data_dir: str
    seed: int
    linear_dim: int
    linear_rank: int
    linear_samples: int
    linear_noise: float
    target_domain: str
    source_domains: str
    irrelevant_source: bool
    malicious_domain: str
    poison_fraction: float

    @classmethod
    def of(cls, cfg: RunConfig) -> DataKey:
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


@lru_cache(maxsize=4)
def _fashion_splits(data_dir: str) -> tuple[fashion_mnist.Split, fashion_mnist.Split]:
    return fashion_mnist.load(data_dir or None)


@lru_cache(maxsize=8)
def partitions(key: DataKey) -> tuple[partition.ClientIndices, ...]:
    """All clients' index sets for a Fashion-MNIST run (cheap: label arrays only)."""
    train, test = _fashion_splits(key.data_dir)
    train_labels, test_labels = np.asarray(train.labels), np.asarray(test.labels)
    if key.partition == "pathological":
        parts = partition.pathological(
            train_labels, test_labels, key.num_clients, key.classes_per_client, key.seed
        )
    elif key.partition == "dirichlet":
        parts = partition.dirichlet(
            train_labels, test_labels, key.num_clients, key.dirichlet_alpha, key.seed
        )
    else:
        parts = partition.iid(len(train_labels), len(test_labels), key.num_clients, key.seed)
    return tuple(parts)


def _cap(indices: np.ndarray, cap: int, seed: int, client: int, salt: int) -> np.ndarray:
    if cap <= 0 or len(indices) <= cap:
        return indices
    rng = np.random.default_rng([seed, salt, client])
    return np.sort(rng.choice(indices, size=cap, replace=False))


def _images(images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(images[idx], dtype=np.float32) / 255.0)
    return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)  # (N, 1, 28, 28)


def _labels(labels: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))


# Per-process cache of client tensors. Simulation workers serve many partitions; with the
# default 256 a 100-client run never reloads (about 0.5 GB of Fashion-MNIST floats per worker at
# most). Raise FEDREP_CLIENT_CACHE for bigger federations if memory allows.
CLIENT_CACHE_SIZE = int(os.environ.get("FEDREP_CLIENT_CACHE", "256"))


# Target labels are withheld from training: any use of them fails loudly (cross-entropy rejects
# -1) instead of silently turning unsupervised adaptation into supervised training.
WITHHELD_LABEL = -1


def _domain_data(key: DataKey, client: int) -> ClientData:
    """Multi-domain sets: partition 0 is the target (train labels withheld), 1.. the sources."""
    from fedrep.data import digit_five, domains

    layout = domain_layout(key.dataset, key.target_domain, key.source_domains, key.irrelevant_source)
    name = layout[client]
    share, shares = domain_share(layout, client)  # k nodes of one domain split its samples

    def load(split: str, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        total = cap * shares if cap else None
        if key.dataset == "digit-five":
            x, y = digit_five.load_digit_five(name, split, key.data_dir or None, total, key.seed)
        else:
            x, y = domains.load_domain(name, split, total, key.seed, key.data_dir or None)
        return domains.kd3a_normalize(x[share::shares]), y[share::shares].clone()

    x_train, y_train = load("train", key.max_train_per_client)
    x_test, y_test = load("test", key.max_test_per_client)
    if client == 0:
        y_train = torch.full_like(y_train, WITHHELD_LABEL)
    elif name == key.malicious_domain and key.poison_fraction > 0:
        gen = torch.Generator().manual_seed(key.seed * 7919 + client)
        y_train = domains.poison_labels(y_train, key.poison_fraction, 10, gen)
    return ClientData(x_train, y_train, x_test, y_test)


@lru_cache(maxsize=CLIENT_CACHE_SIZE)
def _client_data(key: DataKey, client: int) -> ClientData:
    if key.dataset in MULTI_DOMAIN:
        return _domain_data(key, client)
    if key.dataset == "linear-synthetic":
        return ClientData(
            *client_linear_data(
                client,
                key.linear_dim,
                key.linear_rank,
                key.linear_samples,
                LINEAR_TEST_SAMPLES,
                key.linear_noise,
                key.seed,
            )
        )
    train, test = _fashion_splits(key.data_dir)
    part = partitions(key)[client]
    tr = _cap(part.train, key.max_train_per_client, key.seed, client, 0x7A)
    te = _cap(part.test, key.max_test_per_client, key.seed, client, 0x7E)
    return ClientData(
        _images(train.images, tr), _labels(train.labels, tr),
        _images(test.images, te), _labels(test.labels, te),
    )


def load_client_data(cfg: RunConfig, client: int, device: str = "cpu") -> ClientData:
    """Client ``client``'s data (0-based partition id), cached for the life of the process
    (on ``device``, e.g. the GPU a Ray worker was given)."""
    if not 0 <= client < cfg.num_clients:
        raise ValueError(f"partition-id {client} outside 0..{cfg.num_clients - 1}")
    if device == "cpu":
        return _client_data(DataKey.of(cfg), client)
    return _on_device(DataKey.of(cfg), client, device)


@lru_cache(maxsize=CLIENT_CACHE_SIZE)
def _on_device(key: DataKey, client: int, device: str) -> ClientData:
    data = _client_data(key, client)
    return ClientData(*(t.to(device) for t in (data.x_train, data.y_train, data.x_test, data.y_test)))
