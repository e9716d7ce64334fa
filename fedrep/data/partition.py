"""Label partitioners: who holds which samples, for train *and* each client's local test split.

The FedRep paper evaluates every client on its own distribution, so each partitioner returns,
per client, train indices and test indices drawn from the same label distribution. All functions are
pure and deterministic in ``seed``; samples are disjoint across clients in both splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrep.config import ConfigError


@dataclass(frozen=True)
class ClientIndices:
    train: np.ndarray  # int64 indices into the train split
    test: np.ndarray  # int64 indices into the test split


class PartitionError(ConfigError):
    """A partition that cannot be built from these arguments; the message says why."""


def _by_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def assign_classes(
    num_clients: int, classes_per_client: int, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """(num_clients, s) class ids: every client gets s *distinct* classes and every class is used
    by as equal a number of clients as possible (counts differ by at most one).

    Greedy least-used-first with random tie-breaks; this is the balanced version of the official
    code's shuffled ``shard_per_class`` slots, which can hand a client the same class twice."""
    if classes_per_client > num_classes:
        raise PartitionError(
            f"classes-per-client={classes_per_client} exceeds the {num_classes} classes; "
            f"use 1..{num_classes}"
        )
    usage = np.zeros(num_classes, dtype=np.int64)
    out = np.empty((num_clients, classes_per_client), dtype=np.int64)
    for client in range(num_clients):
        tiebreak = rng.random(num_classes)
        order = np.lexsort((tiebreak, usage))  # least used first, random among equals
        chosen = np.sort(order[:classes_per_client])
        usage[chosen] += 1
        out[client] = chosen
    return out


def pathological(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    seed: int,
    num_classes: int = 10,
) -> list[ClientIndices]:
    """Each client holds s classes, one equal-sized shard of each.

    Shard size is the same for every class: the smallest class divided by the largest number of
    clients sharing a class (when n*s is not a multiple of the class count, the classes with fewer
    holders leave samples unused rather than hand out bigger shards). The test split is cut the
    same way, so a client's local test set covers exactly its train classes (FedRep paper, CIFAR
    setting; LG-FedAvg's ``noniid``); when a class has fewer test images than holders, each holder
    gets one, reused cyclically."""
    rng = np.random.default_rng([seed, 0xC1A55])
    classes = assign_classes(num_clients, classes_per_client, num_classes, rng)
    train_pool = _by_class(train_labels, num_classes, rng)
    test_pool = _by_class(test_labels, num_classes, rng)
    train_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    holders_of = [np.flatnonzero((classes == c).any(axis=1)) for c in range(num_classes)]
    most = max(len(h) for h in holders_of)
    used = [c for c in range(num_classes) if len(holders_of[c])]
    if untested := [c for c in used if len(test_pool[c]) == 0]:
        raise PartitionError(
            f"class{'es' * (len(untested) > 1)} {untested[:5]} ha{'ve' if len(untested) > 1 else 's'} "
            "training images but no test images, so the clients holding them could not be "
            "evaluated; use a test split with every class, or fewer classes"
        )
    shard = min(len(train_pool[c]) for c in used) // most
    test_shard = min(len(test_pool[c]) for c in used) // most
    # More holders than test images of a class (10,000 clients): holders share test images, one
    # each, cyclically. Evaluation only, so overlap between clients costs nothing.
    test_shard = max(test_shard, 1)
    if shard == 0:
        raise PartitionError(
            f"too few samples per class for {most} clients sharing a class "
            f"({num_clients} clients x {classes_per_client} classes); use fewer clients or fewer "
            "classes per client"
        )
    for c in used:
        holders = holders_of[c]
        for k, client in enumerate(holders):
            train_parts[client].append(train_pool[c][k * shard : (k + 1) * shard])
            start = (k * test_shard) % len(test_pool[c])
            test_parts[client].append(test_pool[c][start : start + test_shard])
    return [
        ClientIndices(np.sort(np.concatenate(tr)), np.sort(np.concatenate(te)))
        for tr, te in zip(train_parts, test_parts, strict=True)
    ]


def dirichlet(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    num_classes: int = 10,
) -> list[ClientIndices]:
    """Label skew: client shares of each class ~ Dir(alpha); the test split uses the same shares,
    so each client's test labels follow its train label distribution."""
    rng = np.random.default_rng([seed, 0xD1C])
    shares = rng.dirichlet(np.full(num_clients, alpha), size=num_classes)  # (C, n)
    train_pool = _by_class(train_labels, num_classes, rng)
    test_pool = _by_class(test_labels, num_classes, rng)
    train_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        for pool, parts in ((train_pool[c], train_parts), (test_pool[c], test_parts)):
            cuts = (np.cumsum(shares[c])[:-1] * len(pool)).astype(np.int64)
            for client, chunk in enumerate(np.split(pool, cuts)):
                parts[client].append(chunk)
    out = [
        ClientIndices(np.sort(np.concatenate(tr)), np.sort(np.concatenate(te)))
        for tr, te in zip(train_parts, test_parts, strict=True)
    ]
    empty = [i for i, part in enumerate(out) if len(part.train) == 0]
    if empty:
        raise PartitionError(
            f"dirichlet(alpha={alpha}) left clients {empty[:5]} without train data; "
            "raise dirichlet-alpha or lower num-clients"
        )
    return out


def iid(
    num_train: int, num_test: int, num_clients: int, seed: int
) -> list[ClientIndices]:
    """Uniformly shuffled, equal-sized shards."""
    if num_clients > num_test:
        raise PartitionError(f"{num_clients} clients but only {num_test} test samples")
    rng = np.random.default_rng([seed, 0x11D])
    train = np.array_split(rng.permutation(num_train), num_clients)
    test = np.array_split(rng.permutation(num_test), num_clients)
    return [ClientIndices(np.sort(a), np.sort(b)) for a, b in zip(train, test, strict=True)]
