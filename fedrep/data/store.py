"""What every data-set loader shares: its error type, the cache, verified downloads, a safe unpickler.

Loaders follow one pattern (Fashion-MNIST was first): find the files (``data-dir``, then
``$FEDREP_DATA_DIR``, then known places, then the cache), verify them, decode them *once* into
``.npy`` files in the cache, and memory-map those on every later call, so that each client process
pays the decode at most once and shares pages with its neighbours.

Pickled inputs (CIFAR's python batches, PFLlib's ``.npz`` files) are read with
:func:`safe_unpickle`, which rebuilds numpy arrays and plain containers and nothing else: a data
file can never run code on the machine that reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedrep.files import atomic_write, numpy_bytes


class DataError(RuntimeError):
    """Data missing or corrupt; the message names the file and how to get the data."""


@dataclass(frozen=True)
class Split:
    """One split of a centralised data set: ``images`` (N, ...) uint8 as stored (Fashion-MNIST
    (N, 28, 28), CIFAR (N, 32, 32, 3)), ``labels`` (N,) integers."""

    images: np.ndarray
    labels: np.ndarray


def cache_dir() -> Path:
    return Path(os.environ.get("FEDREP_CACHE_DIR", Path.home() / ".cache" / "fedrep"))


def data_dirs(explicit: str | os.PathLike[str] | None, *known: Path) -> list[Path]:
    """Where to look, in order: ``data-dir`` if given (only it), else ``$FEDREP_DATA_DIR`` (only
    it), else the ``known`` places (a system package, the download cache)."""
    if explicit:
        return [Path(explicit)]
    if os.environ.get("FEDREP_DATA_DIR"):
        return [Path(os.environ["FEDREP_DATA_DIR"])]
    return list(known)


def downloads_allowed(explicit: str | os.PathLike[str] | None) -> bool:
    """An explicit folder means "use these files"; ``FEDREP_OFFLINE=1`` forbids the network."""
    return (not explicit and not os.environ.get("FEDREP_DATA_DIR")
            and os.environ.get("FEDREP_OFFLINE") != "1")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(url: str, dest: Path, sha256: str, how_to_get: str,
                      timeout: float = 60.0) -> Path:
    """Stream ``url`` into a temporary file next to ``dest`` and keep it as ``dest`` only if its
    SHA-256 is ``sha256``; nothing half-written or unverified is ever left at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, prefix=f".{dest.name}.")
    try:
        digest = hashlib.sha256()
        with tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for block in iter(lambda: resp.read(1 << 20), b""):
                        digest.update(block)
                        tmp.write(block)
            except (urllib.error.URLError, OSError) as err:
                raise DataError(f"download of {url} failed ({err}). {how_to_get}") from None
        if digest.hexdigest() != sha256:
            raise DataError(f"download of {url} has the wrong checksum (sha256 {digest.hexdigest()[:16]}..., "
                            f"expected {sha256[:16]}...); refusing it. {how_to_get}")
        os.replace(tmp.name, dest)
        return dest
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)


def decoded_dir(dataset: str, sources: Iterable[Path], variant: str = "") -> Path:
    """The cache folder for arrays decoded from ``sources``, keyed by each file's resolved path,
    size and mtime (replacing a file invalidates the entry) and by ``variant`` (e.g. a class
    selection), so different decodings of the same files never collide."""
    tag = hashlib.sha256()
    for source in sorted(Path(s) for s in sources):
        st = source.stat()
        tag.update(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    tag.update(variant.encode())
    return cache_dir() / dataset / "decoded" / tag.hexdigest()[:16]


def cached_arrays(folder: Path, names: Iterable[str],
                  decode: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``names`` memory-mapped from ``folder/<name>.npy``; when any is missing or unreadable,
    ``decode()`` builds them all, they are written atomically and mapped (or, when the cache
    cannot be written, returned from memory)."""
    names = list(names)
    try:
        return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
    except (OSError, ValueError):
        pass  # not decoded yet, or a damaged entry: decode again below
    arrays = decode()
    missing = set(names) - set(arrays)
    if missing:
        raise AssertionError(f"decode() did not build {sorted(missing)}")
    try:
        for name in names:
            atomic_write(folder / f"{name}.npy", numpy_bytes(np.ascontiguousarray(arrays[name])))
        return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
    except OSError:
        return arrays  # read-only cache: keep the in-memory copies


# --- safe unpickling ---------------------------------------------------------------------------

# What a pickled numpy array (any protocol, Python 2 or 3, numpy 1 or 2) needs, and nothing else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
}


# numpy 2 moved ``numpy.core`` to ``numpy._core``; Python 3 renamed two Python 2 modules.
_NUMPY_CORE = np.ndarray.__reduce__(np.zeros(1))[0].__module__.rsplit(".", 1)[0]  # numpy._core
_RENAMED = {"numpy.core.multiarray": f"{_NUMPY_CORE}.multiarray",
            "numpy._core.multiarray": f"{_NUMPY_CORE}.multiarray",
            "numpy.core.numeric": f"{_NUMPY_CORE}.numeric",
            "numpy._core.numeric": f"{_NUMPY_CORE}.numeric",
            "copy_reg": "copyreg", "__builtin__": "builtins"}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a data file may hold "
                                         "only numpy arrays, numbers, strings, lists and dicts")
        return super().find_class(_RENAMED.get(module, module), name)


def safe_unpickle(source: bytes | BinaryIO, encoding: str = "bytes") -> Any:
    """Unpickle numpy arrays and plain containers only (``encoding="bytes"`` reads Python 2
    pickles such as CIFAR's, whose dict keys are then ``bytes``). Raises
    ``pickle.UnpicklingError`` for anything else, and whatever a truncated stream raises."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    return _ArraysOnlyUnpickler(stream, encoding=encoding).load()


def load_npy_object(stream: BinaryIO) -> Any:
    """The object held by an object-dtype ``.npy`` (as ``np.save`` writes a pickled dict), read
    with :func:`safe_unpickle` instead of ``np.load(allow_pickle=True)``."""
    major, _ = np.lib.format.read_magic(stream)
    header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = header(stream)
    if dtype != np.dtype(object):
        flat = np.frombuffer(stream.read(), dtype=dtype, count=int(np.prod(shape)))
        return flat.reshape(shape, order="F" if fortran else "C")
    array = safe_unpickle(stream.read(), encoding="latin1")
    return array.item() if isinstance(array, np.ndarray) and array.shape == () else array
