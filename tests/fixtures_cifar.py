"""Small CIFAR-10/100 copies in the real on-disk formats, for tests that must not download 170 MB.

The layout is written out here independently of :mod:`fedrep.data.cifar` (which it tests): the
batches are pickled with protocol 2 and ``bytes`` keys, as the Python 2 originals read back, with
the same keys (``data``, ``labels`` or ``fine_labels``/``coarse_labels``, ``filenames``,
``batch_label``), and the archive is a real ``.tar.gz`` holding the extracted folder.

Every batch's image 0 has constant planes R=10, G=20, B=30 and image 1 has R[r, c] = (32r + c) %
256, so a test can pin down the channel-major, row-major pixel order without trusting the loader.
"""

from __future__ import annotations

import pickle
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Layout:
    archive: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    num_classes: int


LAYOUTS = {
    "cifar10": Layout("cifar-10-python.tar.gz", "cifar-10-batches-py",
                      tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), 10),
    "cifar100": Layout("cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",), 100),
}


def batch_arrays(name: str, member: str, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``(data (n, 3072) uint8, labels (n,))`` the fixture writes for one batch file."""
    layout = LAYOUTS[name]
    member_index = (*layout.train, *layout.test).index(member)
    rng = np.random.default_rng([seed, member_index])
    data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
    if per_batch >= 2:
        data[0, :1024], data[0, 1024:2048], data[0, 2048:] = 10, 20, 30
        data[1, :1024] = np.arange(1024) % 256
    labels = rng.integers(0, layout.num_classes, size=per_batch)
    labels[: min(per_batch, 2)] = [layout.num_classes - 1, 0][: min(per_batch, 2)]  # both ends of the range
    return data, labels


def split_arrays(name: str, split: str, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All batches of ``split`` ("train"/"test") concatenated, in the order the loader must use."""
    layout = LAYOUTS[name]
    members = layout.train if split == "train" else layout.test
    parts = [batch_arrays(name, m, per_batch, seed) for m in members]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_pickle(path: Path, obj: object) -> Path:
    """Protocol 2, as the originals (readable by Python 2)."""
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


def batch_dict(name: str, member: str, per_batch: int = 20, seed: int = 0) -> dict[bytes, object]:
    data, labels = batch_arrays(name, member, per_batch, seed)
    batch: dict[bytes, object] = {
        b"batch_label": f"{member} of the fedrep test fixture".encode(),
        b"data": data,
        b"filenames": [f"image_{i:05d}.png".encode() for i in range(per_batch)],
    }
    if name == "cifar100":
        batch[b"fine_labels"] = labels.tolist()
        batch[b"coarse_labels"] = (labels // 5).tolist()  # 20 superclasses; differs from fine
    else:
        batch[b"labels"] = labels.tolist()
    return batch


def write_cifar_folder(root: Path, name: str, per_batch: int = 20, seed: int = 0) -> Path:
    """``root/<folder>/`` as extracting the official archive leaves it; returns that folder."""
    layout = LAYOUTS[name]
    folder = root / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    for member in (*layout.train, *layout.test):
        write_pickle(folder / member, batch_dict(name, member, per_batch, seed))
    meta_key, meta_names = ((b"label_names", [f"class_{i}".encode() for i in range(10)]) if name == "cifar10"
                            else (b"fine_label_names", [f"class_{i}".encode() for i in range(100)]))
    write_pickle(folder / ("batches.meta" if name == "cifar10" else "meta"), {meta_key: meta_names})
    return folder


def write_cifar_archive(root: Path, name: str, per_batch: int = 20, seed: int = 0) -> Path:
    """``root/<archive>``: a real gzip-compressed tar with the extracted folder inside (members
    named ``<folder>/<batch>``, as in the official archive); returns its path."""
    layout = LAYOUTS[name]
    root.mkdir(parents=True, exist_ok=True)
    archive = root / layout.archive
    with tempfile.TemporaryDirectory() as staging:
        folder = write_cifar_folder(Path(staging), name, per_batch, seed)
        with tarfile.open(archive, mode="w:gz") as tar:
            tar.add(folder, arcname=layout.folder)
    return archive
