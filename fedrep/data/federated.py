"""Per-client data, built once per process.

A Flower client process (a Ray actor in simulation, a SuperNode's ClientApp process in
deployment) serves many rounds and, in simulation, many partitions. Partitions are computed once
per process per data-relevant config and each client's tensors once per process, so a round costs
no data loading after the first contact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedrep.config import DATASETS, RunConfig
from fedrep.data import fashion_mnist, partition
from fedrep.data.client_cache import ByteBudgetCache, budget_from_env
from fedrep.data.domains_spec import MULTI_DOMAIN, domain_layout, domain_share
from fedrep.data.store import Split
from fedrep.data.synthetic import client_linear_data
from fedrep.data.transforms import CIFAR_STATS, CropFlip, normalized_chw

# A train-time augmentation: a batch of inputs and the round's generator -> augmented batch.
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
LINEAR_TEST_SAMPLES = 100


@dataclass(frozen=True)
class ClientData:
    """One client's local train and test split as ready-to-use tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    # Applied to each train batch (CIFAR's official crop + flip); None = inputs as they are.
    augment: Augment | None = field(default=None, compare=False)

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
    partition_file: str
    augment: bool
    femnist_classes: str
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
def centralised_splits(dataset: str, data_dir: str) -> tuple[Split, Split]:
    """(train, test) of a data set that comes as one pool which fedrep partitions."""
    if dataset == "fashion-mnist":
        return fashion_mnist.load(data_dir or None)
    from fedrep.data import cifar

    return cifar.load(dataset, data_dir or None)


@lru_cache(maxsize=8)
def partitions(key: DataKey) -> tuple[partition.ClientIndices, ...]:
    """All clients' index sets for a partitioned data set (cheap: label arrays only)."""
    train, test = centralised_splits(key.dataset, key.data_dir)
    train_labels, test_labels = np.asarray(train.labels), np.asarray(test.labels)
    classes = DATASETS[key.dataset].num_classes
    if key.partition == "file":
        from fedrep.data.partition_file import read_index_partition

        parts = read_index_partition(Path(key.partition_file), key.num_clients, len(train_labels),
                                     len(test_labels), key.dataset)
    elif key.partition == "pathological":
        parts = partition.pathological(
            train_labels, test_labels, key.num_clients, key.classes_per_client, key.seed, classes
        )
    elif key.partition == "dirichlet":
        parts = partition.dirichlet(
            train_labels, test_labels, key.num_clients, key.dirichlet_alpha, key.seed, classes
        )
    else:
        parts = partition.iid(len(train_labels), len(test_labels), key.num_clients, key.seed)
    return tuple(parts)


def _cap(indices: np.ndarray, cap: int, seed: int, client: int, salt: int) -> np.ndarray:
    if cap <= 0 or len(indices) <= cap:
        return indices
    rng = np.random.default_rng([seed, salt, client])
    return np.sort(rng.choice(indices, size=cap, replace=False))


def _images(dataset: str, images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    if dataset in CIFAR_STATS:
        return normalized_chw(images[idx], *CIFAR_STATS[dataset])  # (N, 3, 32, 32)
    x = torch.from_numpy(np.asarray(images[idx], dtype=np.float32) / 255.0)
    return ((x - FMNIST_MEAN) / FMNIST_STD).unsqueeze(1)  # (N, 1, 28, 28)


def _augment(key: DataKey) -> Augment | None:
    """The official train-time augmentation for CIFAR (``augment``); none elsewhere."""
    if key.augment and key.dataset in CIFAR_STATS:
        return CropFlip.for_normalized(*CIFAR_STATS[key.dataset])
    return None


@lru_cache(maxsize=2)
def _leaf_clients(dataset: str, data_dir: str, num_clients: int, femnist_classes: str) -> tuple:
    from fedrep.data import leaf

    if dataset == "femnist":
        return tuple(leaf.femnist_clients(data_dir or None, num_clients, femnist_classes)), None
    clients, embeddings = leaf.sent140_clients(data_dir or None, num_clients)
    return tuple(clients), torch.from_numpy(np.asarray(embeddings, dtype=np.float16))


def _leaf_data(key: DataKey, client: int) -> ClientData:
    """FEMNIST: LEAF's pixels as they are (the official code feeds them unnormalised), (n, 1, 28,
    28). Sent140: each tweet as its 25 frozen GloVe vectors, (n, 25, 300) in float16 (the
    official encoder is a fixed table; looking it up here keeps it off the wire and out of the
    state dict; half precision halves the memory and the LSTM computes in float32)."""
    clients, embeddings = _leaf_clients(key.dataset, key.data_dir, key.num_clients, key.femnist_classes)
    user = clients[client]

    def inputs(x: np.ndarray) -> torch.Tensor:
        if embeddings is None:
            return torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
        return embeddings[torch.from_numpy(np.asarray(x, dtype=np.int64))]

    return ClientData(inputs(user.x_train), torch.from_numpy(np.asarray(user.y_train, dtype=np.int64)),
                      inputs(user.x_test), torch.from_numpy(np.asarray(user.y_test, dtype=np.int64)))


def _pfllib_data(key: DataKey, client: int) -> ClientData:
    """A PFLlib client's arrays as PFLlib's generator saved them (already normalised). Its two
    compressed pickles are checked and decoded once per machine into the cache and memory-mapped
    after, as every other loader does."""
    from fedrep.data.partition_file import load_pfllib_client
    from fedrep.data.store import cached_arrays, decoded_dir

    root = Path(key.partition_file)
    sources = [root / "train" / f"{client}.npz", root / "test" / f"{client}.npz"]
    names = ("x-train", "y-train", "x-test", "y-test")

    def decode() -> dict[str, np.ndarray]:
        x_train, y_train, x_test, y_test = load_pfllib_client(root, client)
        return dict(zip(names, (x_train.astype(np.float32), y_train.astype(np.int64),
                                x_test.astype(np.float32), y_test.astype(np.int64)), strict=True))

    arrays = cached_arrays(decoded_dir("pfllib", sources, f"client-{client}"), names, decode)
    return ClientData(*(torch.from_numpy(np.array(arrays[n])) for n in names))


def _labels(labels: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels[idx], dtype=np.int64))


# Per-process cache of client tensors, bounded by bytes (fedrep/data/client_cache.py): a
# simulation worker serves many partitions, and a 100-client Fashion-MNIST run (190 MB) or
# 1,000 one-batch clients (60 MB) then never reload. FEDREP_CLIENT_CACHE_MB sets the budget.
CLIENT_CACHE_BUDGET = budget_from_env()


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


def _load_client_data(key: DataKey, client: int) -> ClientData:
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
    if key.dataset in ("femnist", "sent140"):
        return _capped(_leaf_data(key, client), key, client)
    if key.dataset == "pfllib":
        return _capped(_pfllib_data(key, client), key, client)
    train, test = centralised_splits(key.dataset, key.data_dir)
    part = partitions(key)[client]
    tr = _cap(part.train, key.max_train_per_client, key.seed, client, 0x7A)
    te = _cap(part.test, key.max_test_per_client, key.seed, client, 0x7E)
    return ClientData(
        _images(key.dataset, train.images, tr), _labels(train.labels, tr),
        _images(key.dataset, test.images, te), _labels(test.labels, te), _augment(key),
    )


def _capped(data: ClientData, key: DataKey, client: int) -> ClientData:
    """max-train/test-per-client on data whose clients come with it (LEAF, PFLlib)."""
    tr = _cap(np.arange(data.num_train), key.max_train_per_client, key.seed, client, 0x7A)
    te = _cap(np.arange(data.num_test), key.max_test_per_client, key.seed, client, 0x7E)
    if len(tr) == data.num_train and len(te) == data.num_test:
        return data
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return replace(data, x_train=data.x_train[tr_t], y_train=data.y_train[tr_t],
                   x_test=data.x_test[te_t], y_test=data.y_test[te_t])


def check_data(cfg: RunConfig) -> None:
    """Locate and verify the run's files and build its clients' split, in this process, before
    any client starts: a missing or malformed file is one line naming it, not an error in every
    Ray worker. Results stay cached, so in-process clients pay nothing twice."""
    key = DataKey.of(cfg)
    if key.dataset in ("fashion-mnist", *CIFAR_STATS):
        partitions(key)
    elif key.dataset in ("femnist", "sent140"):
        _leaf_clients(key.dataset, key.data_dir, key.num_clients, key.femnist_classes)
    elif key.dataset == "pfllib":
        from fedrep.data.partition_file import check_pfllib

        check_pfllib(Path(key.partition_file), key.num_clients)


def load_client_data(cfg: RunConfig, client: int, device: str = "cpu") -> ClientData:
    """Client ``client``'s data (0-based partition id), cached for the life of the process
    (on ``device``, e.g. the GPU a Ray worker was given)."""
    if not 0 <= client < cfg.num_clients:
        raise ValueError(f"partition-id {client} outside 0..{cfg.num_clients - 1}")
    if device == "cpu":
        return _client_data(DataKey.of(cfg), client)
    return _on_device(DataKey.of(cfg), client, device)


def _load_on_device(key: DataKey, client: int, device: str) -> ClientData:
    data = _client_data(key, client)
    return replace(data, **{name: getattr(data, name).to(device)
                            for name in ("x_train", "y_train", "x_test", "y_test")})


_client_data: ByteBudgetCache[ClientData] = ByteBudgetCache(_load_client_data, *CLIENT_CACHE_BUDGET)
_on_device: ByteBudgetCache[ClientData] = ByteBudgetCache(_load_on_device, *CLIENT_CACHE_BUDGET)
