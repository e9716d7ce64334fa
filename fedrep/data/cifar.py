"""CIFAR-10 and CIFAR-100 from the official python-pickle archives: locate, verify, decode once.

Accepted layouts, in each searched folder (``data-dir``, else ``$FEDREP_DATA_DIR``, else the
download cache ``<cache>/<name>/raw``): the archive as published (``cifar-10-python.tar.gz``), or
the folder it extracts to (``cifar-10-batches-py/``, as torchvision leaves it), or the searched
folder itself being that extracted folder.

An archive is trusted only if its SHA-256 is the published one; it is read straight from the
``.tar.gz`` (nothing is extracted to disk). An extracted folder has no checksum to compare, so it
is checked structurally instead (every batch present, unpicklable, ``uint8`` with 3072 columns,
one label in range per image); its batch sizes are not fixed, so small test copies work.

Batches are Python 2 pickles, read with :func:`fedrep.data.store.safe_unpickle`, which rebuilds
arrays and plain containers only: a doctored batch cannot run code. The decoded arrays are cached
as ``.npy`` (keyed by the source files' path, size and mtime) and memory-mapped on every later
call, so the archive is hashed and decompressed once per machine, not once per client process.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedrep.data.store import (
    DataError,
    Split,
    cache_dir,
    cached_arrays,
    data_dirs,
    decoded_dir,
    download_verified,
    downloads_allowed,
    safe_unpickle,
    sha256_of,
)

__all__ = ["DATASETS", "SPECS", "CifarSpec", "DataError", "Split", "load", "locate"]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100")

IMAGE_SHAPE_CHW = (3, 32, 32)  # each row of b"data": 1024 R, 1024 G, 1024 B, each row-major 32x32
ROW_LENGTH = 3 * 32 * 32
ARRAY_NAMES = ("train-images", "train-labels", "test-images", "test-labels")
Batch = tuple[np.ndarray, np.ndarray]  # one checked batch: data (N, 3072) uint8, labels (N,) int64


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant comes from and what its archive holds."""

    name: str  # fedrep's name: "cifar10"
    title: str  # for messages: "CIFAR-10"
    archive: str  # file name of the published archive
    folder: str  # the folder inside the archive (and what extracting it leaves)
    url: str
    sha256: str  # of the archive as published
    size: int  # bytes of the archive as published
    train_members: tuple[str, ...]  # batch files inside ``folder``
    test_members: tuple[str, ...]
    label_key: bytes  # the key of the labels used (CIFAR-100: fine labels)
    num_classes: int

    @property
    def members(self) -> tuple[str, ...]:
        return self.train_members + self.test_members


SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        title="CIFAR-10",
        archive="cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        size=170_498_071,
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        title="CIFAR-100",
        archive="cifar-100-python.tar.gz",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        size=169_001_437,
        train_members=("train",),
        test_members=("test",),
        label_key=b"fine_labels",  # b"coarse_labels" (the 20 superclasses) is ignored
        num_classes=100,
    ),
}


def _spec(name: str) -> CifarSpec:
    if name not in SPECS:
        raise ValueError(f"unknown CIFAR data set {name!r}; expected one of {', '.join(DATASETS)}")
    return SPECS[name]


def _raw_dir(spec: CifarSpec) -> Path:
    return cache_dir() / spec.name / "raw"


def how_to_get(spec: CifarSpec) -> str:
    """The one sentence every error ends with."""
    return (f"Download {spec.url} and put {spec.archive} or the extracted {spec.folder}/ folder in "
            f"data-dir or $FEDREP_DATA_DIR, or run once online without either (and without "
            f"FEDREP_OFFLINE=1) so fedrep downloads it into {_raw_dir(spec)}.")


# --- finding the files ---------------------------------------------------------------------------
def _is_extracted_folder(spec: CifarSpec, directory: Path) -> bool:
    """A folder named as the archive's, or any folder holding every batch file (a renamed copy).
    A folder named right but missing batches still counts: loading it then names what is missing."""
    if not directory.is_dir():
        return False
    return directory.name == spec.folder or all((directory / m).is_file() for m in spec.members)


def _find_in(spec: CifarSpec, directory: Path) -> Path | None:
    """The archive (preferred: it can be checked against the published SHA-256), the extracted
    folder inside ``directory``, or ``directory`` itself when it is the extracted folder."""
    if (directory / spec.archive).is_file():
        return directory / spec.archive
    if _is_extracted_folder(spec, directory / spec.folder):
        return directory / spec.folder
    if _is_extracted_folder(spec, directory):
        return directory
    return None


def locate(name: str, data_dir: str | os.PathLike[str] | None = None, allow_download: bool = True) -> Path:
    """The archive or the extracted folder of ``name`` ("cifar10" or "cifar100"), downloading the
    archive (SHA-256 verified) into the cache when it is nowhere and downloads are allowed. Finding
    is cheap (no hashing); :func:`load` verifies what it decodes."""
    spec = _spec(name)
    searched = data_dirs(data_dir, _raw_dir(spec))
    for directory in searched:
        found = _find_in(spec, directory)
        if found is not None:
            return found
    if allow_download and downloads_allowed(data_dir):
        return download_verified(spec.url, _raw_dir(spec) / spec.archive, spec.sha256, how_to_get(spec))
    looked = ", ".join(str(d) for d in searched)
    raise DataError(f"{spec.title} not found (looked in: {looked}). {how_to_get(spec)}")


# --- reading and checking batches ----------------------------------------------------------------
def _unpickle(spec: CifarSpec, where: str, stream: BinaryIO) -> Any:
    try:
        return safe_unpickle(stream, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - a garbled pickle can raise almost any exception type
        raise DataError(f"{where} cannot be read as a CIFAR batch ({type(err).__name__}: {err}); it is "
                        f"truncated, corrupt or not a CIFAR python batch. {how_to_get(spec)}") from None


def _checked_batch(spec: CifarSpec, where: str, batch: Any) -> Batch:
    """``(data (N, 3072) uint8, labels (N,) int64)`` from one unpickled batch, or a one-line
    DataError naming ``where`` and the key that is wrong."""

    def bad(problem: str) -> DataError:
        return DataError(f"{where}: {problem}; it is not an intact {spec.title} batch. {how_to_get(spec)}")

    if not isinstance(batch, dict):
        raise bad(f"holds a {type(batch).__name__}, expected a dict")
    # The originals are Python 2 pickles (keys come back as bytes); accept str keys of re-pickled copies.
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}
    for key in (b"data", spec.label_key):
        if key not in batch:
            raise bad(f"has no {key!r} (keys: {', '.join(repr(k) for k in batch)})")
    data = batch[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == ROW_LENGTH):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad(f"b'data' is {found}, expected uint8 with {ROW_LENGTH} columns")
    try:
        labels = np.asarray(batch[spec.label_key])
    except (TypeError, ValueError) as err:
        raise bad(f"{spec.label_key!r} is not a list of integers ({err})") from None
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise bad(f"{spec.label_key!r} is not a flat list of integers "
                  f"(dtype {labels.dtype}, shape {labels.shape})")
    if len(labels) != len(data):
        raise bad(f"{spec.label_key!r} has {len(labels)} entries for {len(data)} images")
    outside = labels[(labels < 0) | (labels >= spec.num_classes)]
    if outside.size:
        raise bad(f"{spec.label_key!r} holds {outside[0]} "
                  f"({outside.size} labels outside 0..{spec.num_classes - 1})")
    return data, labels.astype(np.int64)


def _folder_batches(spec: CifarSpec, folder: Path) -> Iterator[tuple[str, Batch]]:
    for member in spec.members:
        where = str(folder / member)
        try:
            fh = (folder / member).open("rb")
        except OSError as err:
            raise DataError(f"cannot read {where} ({err}). {how_to_get(spec)}") from None
        with fh:
            yield member, _checked_batch(spec, where, _unpickle(spec, where, fh))


def _archive_batches(spec: CifarSpec, archive: Path) -> Iterator[tuple[str, Batch]]:
    """One pass over the ``.tar.gz`` (its members are not in batch order; seeking back in a gzip
    stream would decompress it again), unpickling each batch straight from the stream."""
    wanted = {f"{spec.folder}/{m}": m for m in spec.members}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for info in tar:
                member = wanted.pop(info.name.removeprefix("./"), None)
                stream = tar.extractfile(info) if member is not None else None
                if member is None or stream is None:
                    continue
                where = f"{archive} member {spec.folder}/{member}"
                yield member, _checked_batch(spec, where, _unpickle(spec, where, stream))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{archive} cannot be read as a .tar.gz ({err}); delete it and fetch it again. "
                        f"{how_to_get(spec)}") from None
    if wanted:
        raise DataError(f"{archive} has no member {sorted(wanted)[0]}; it is not the {spec.title} archive. "
                        f"Delete it and fetch it again. {how_to_get(spec)}")


def _verify_archive(spec: CifarSpec, archive: Path) -> None:
    """The published SHA-256, or a one-line refusal (a truncated download fails here too)."""
    digest = sha256_of(archive)
    if digest != spec.sha256:
        raise DataError(f"{archive} is corrupt or truncated ({archive.stat().st_size} bytes, sha256 "
                        f"{digest[:16]}...; expected {spec.size} bytes, sha256 {spec.sha256[:16]}...). "
                        f"Delete it and fetch it again. {how_to_get(spec)}")


def _sources(spec: CifarSpec, found: Path) -> list[Path]:
    """The files the decode reads (keys of the decode cache); names the first missing batch."""
    if found.is_file():
        return [found]
    for member in spec.members:
        if not (found / member).is_file():
            raise DataError(f"{found / member} is missing (the {spec.folder}/ folder is incomplete). "
                            f"{how_to_get(spec)}")
    return [found / m for m in spec.members]


def _decode(spec: CifarSpec, found: Path) -> dict[str, np.ndarray]:
    """Verify ``found`` and build the four arrays: images (N, 32, 32, 3) HWC uint8, labels int64."""
    if found.is_file():
        _verify_archive(spec, found)
        batches = dict(_archive_batches(spec, found))
    else:
        batches = dict(_folder_batches(spec, found))
    arrays: dict[str, np.ndarray] = {}
    for split, members in (("train", spec.train_members), ("test", spec.test_members)):
        data = np.concatenate([batches[m][0] for m in members])
        arrays[f"{split}-images"] = data.reshape(-1, *IMAGE_SHAPE_CHW).transpose(0, 2, 3, 1)
        arrays[f"{split}-labels"] = np.concatenate([batches[m][1] for m in members])
    return arrays


def load(name: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[Split, Split]:
    """(train, test) of ``name``: images uint8 (N, 32, 32, 3), labels int64 (N,), memory-mapped
    from the decode cache; the first call verifies and decodes, later ones only map."""
    spec = _spec(name)
    found = locate(name, data_dir)
    # The expected checksum is part of the key: an entry decoded under another one is not reused.
    folder = decoded_dir(spec.name, _sources(spec, found), variant=f"{spec.sha256}:{spec.label_key!r}")
    arrays = cached_arrays(folder, ARRAY_NAMES, lambda: _decode(spec, found))
    return (Split(arrays["train-images"], arrays["train-labels"]),
            Split(arrays["test-images"], arrays["test-labels"]))
