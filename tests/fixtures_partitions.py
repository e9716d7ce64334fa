"""Partition files as other tools write them, for the partition-file tests.

:func:`write_pfllib_folder` reproduces PFLlib's ``dataset/utils/dataset_utils.py`` ``save_file``
byte for byte in structure: ``config.json`` with PFLlib's keys, and one
``np.savez_compressed(f, data={'x': X, 'y': y})`` per client and split, opened as PFLlib opens
them. The arrays come from :func:`pfllib_client_data`, so a test can compare what fedrep reads
with what was written without reading the files back itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedrep.data.partition import ClientIndices


def pfllib_client_data(client_sizes: list[tuple[int, int]], num_classes: int = 10,
                       shape: tuple[int, ...] = (1, 28, 28),
                       seed: int = 0) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per client, PFLlib's ``(train_dict, test_dict)``: ``x`` (n, *shape) float32 normalised the
    way PFLlib's generators leave it (mean 0.5, std 0.5 -> roughly [-1, 1]), ``y`` (n,) int64."""
    rng = np.random.default_rng(seed)
    out = []
    for n_train, n_test in client_sizes:
        dicts = []
        for n in (n_train, n_test):
            pixels = rng.random((n, *shape), dtype=np.float32)
            dicts.append({"x": (pixels - 0.5) / 0.5, "y": rng.integers(0, num_classes, n).astype(np.int64)})
        out.append((dicts[0], dicts[1]))
    return out


def write_pfllib_folder(root: Path, client_sizes: list[tuple[int, int]], num_classes: int = 10,
                        shape: tuple[int, ...] = (1, 28, 28), seed: int = 0) -> Path:
    """A folder exactly as PFLlib's ``save_file`` writes it; returns ``root``."""
    root = Path(root)
    train_path = str(root / "train") + os.sep  # PFLlib: train_path + str(idx) + '.npz'
    test_path = str(root / "test") + os.sep
    os.makedirs(train_path, exist_ok=True)
    os.makedirs(test_path, exist_ok=True)
    data = pfllib_client_data(client_sizes, num_classes, shape, seed)
    statistic = [[(int(c), int((train["y"] == c).sum())) for c in np.unique(train["y"])]
                 for train, _ in data]
    config = {
        "num_clients": len(client_sizes),
        "num_classes": num_classes,
        "non_iid": True,
        "balance": False,
        "partition": "dir",
        "Size of samples for labels in clients": statistic,
        "alpha": 0.1,
        "batch_size": 10,
    }
    for idx, (train_dict, _) in enumerate(data):
        with open(train_path + str(idx) + ".npz", "wb") as f:
            np.savez_compressed(f, data=train_dict)
    for idx, (_, test_dict) in enumerate(data):
        with open(test_path + str(idx) + ".npz", "wb") as f:
            np.savez_compressed(f, data=test_dict)
    with open(root / "config.json", "w") as f:
        json.dump(config, f)
    return root


def write_npz(path: Path, **arrays: Any) -> Path:
    """An ``.npz`` holding whatever a test needs (a bad dict, a hostile object), written the way
    PFLlib writes its own so that only the content differs."""
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


class RunsCommand:
    """Unpickling this calls ``os.system(command)``: what a hostile data file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


def disjoint_parts(num_clients: int, num_train: int, num_test: int, seed: int = 0) -> list[ClientIndices]:
    """A random partition of both splits into ``num_clients`` disjoint, non-empty-train shares,
    for :func:`~fedrep.data.partition_file.write_index_partition` round trips."""
    rng = np.random.default_rng(seed)
    train = np.array_split(rng.permutation(num_train), num_clients)
    test = np.array_split(rng.permutation(num_test), num_clients)
    return [ClientIndices(np.sort(a).astype(np.int64), np.sort(b).astype(np.int64))
            for a, b in zip(train, test, strict=True)]
