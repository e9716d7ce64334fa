"""Fashion-MNIST from its IDX files: locate, verify, download, decode once, memory-map after.

Search order: an explicit directory, ``$FEDREP_DATA_DIR``, Debian's ``dataset-fashion-mnist``
package (``/usr/share/datasets/fashion-mnist``), then the download cache
(``$FEDREP_CACHE_DIR`` or ``~/.cache/fedrep``), downloading from the official source when online.

Checksums are SHA-256 of the *decompressed* IDX bytes, so they hold for the official ``.gz`` files,
Debian's repacked ones and plain uncompressed copies alike. Decoded arrays are cached as ``.npy``
and memory-mapped, so each client process pays the decode at most once and shares pages with its
neighbours.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrep.data.store import DataError, Split, cache_dir, data_dirs, downloads_allowed
from fedrep.files import atomic_write, numpy_bytes

__all__ = ["DataError", "Split", "cache_dir", "load", "locate", "load_array", "download", "decode_idx"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
HOW_TO_GET = (
    "Get the data with one of: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "set FEDREP_DATA_DIR to a folder holding the four *-ubyte(.gz) files, or run once online "
    "so fedrep downloads them."
)


@dataclass(frozen=True)
class IdxFile:
    stem: str
    sha256: str  # of the decompressed bytes
    shape: tuple[int, ...]


FILES: dict[str, IdxFile] = {
    "train-images": IdxFile(
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        (60000, 28, 28),
    ),
    "train-labels": IdxFile(
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        (60000,),
    ),
    "test-images": IdxFile(
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        (10000, 28, 28),
    ),
    "test-labels": IdxFile(
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        (10000,),
    ),
}


def _candidates(explicit: str | os.PathLike[str] | None) -> list[Path]:
    return data_dirs(explicit, DEBIAN_DIR, cache_dir() / "fashion-mnist" / "raw")


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(
            f"cannot read {path}: {err}. The file is corrupt or truncated. {HOW_TO_GET}"
        ) from None


def decode_idx(raw: bytes, source: Path | str = "<bytes>") -> np.ndarray:
    """Decode the IDX format (big-endian header: magic, dims; then uint8 payload)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{source} is not an unsigned-byte IDX file (bad magic). {HOW_TO_GET}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{source} is truncated: {len(raw)} bytes, header promises {expected}. {HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def download(target: Path, base_url: str = OFFICIAL_URL, timeout: float = 30.0) -> None:
    """Download the four files into ``target`` and verify their checksums before keeping them."""
    target.mkdir(parents=True, exist_ok=True)
    for spec in FILES.values():
        dest = target / f"{spec.stem}.gz"
        if dest.is_file():
            continue
        url = f"{base_url}{spec.stem}.gz"
        with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    shutil.copyfileobj(resp, tmp)
            except (urllib.error.URLError, OSError) as err:
                Path(tmp.name).unlink(missing_ok=True)
                raise DataError(f"download of {url} failed ({err}). {HOW_TO_GET}") from None
        try:
            raw = gzip.decompress(Path(tmp.name).read_bytes())
        except (OSError, EOFError):
            raw = b""
        if hashlib.sha256(raw).hexdigest() != spec.sha256:
            Path(tmp.name).unlink(missing_ok=True)
            raise DataError(f"download of {url} has the wrong checksum; refusing it. {HOW_TO_GET}")
        os.replace(tmp.name, dest)


def locate(data_dir: str | os.PathLike[str] | None = None, allow_download: bool = True) -> Path:
    """Return the directory holding all four files, downloading into the cache if needed."""
    candidates = _candidates(data_dir)
    for directory in candidates:
        if all(_find_file(directory, spec.stem) for spec in FILES.values()):
            return directory
    # A directory holding *some* files is a broken install: say which file is missing.
    for directory in candidates:
        present = [s.stem for s in FILES.values() if _find_file(directory, s.stem)]
        if present:
            missing = [s.stem for s in FILES.values() if s.stem not in present]
            raise DataError(
                f"{directory} holds {len(present)} of 4 Fashion-MNIST files; missing "
                f"{', '.join(str(directory / m) + '(.gz)' for m in missing)}. {HOW_TO_GET}"
            )
    if allow_download and downloads_allowed(data_dir):
        target = cache_dir() / "fashion-mnist" / "raw"
        download(target)
        return target
    looked = ", ".join(str(d) for d in candidates)
    raise DataError(f"Fashion-MNIST not found (looked in: {looked}). {HOW_TO_GET}")


def _decoded_path(source: Path, key: str) -> Path:
    """Cache entry keyed by the source file's path, size and mtime: replacing the file
    invalidates it."""
    st = source.stat()
    tag = hashlib.sha256(f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "fashion-mnist" / "decoded" / tag[:16] / f"{key}.npy"


def load_array(directory: Path, key: str) -> np.ndarray:
    """One verified array, decoded once to the cache and memory-mapped on every later call."""
    spec = FILES[key]
    path = _find_file(directory, spec.stem)
    if path is None:
        raise DataError(f"{directory / spec.stem}(.gz) is missing. {HOW_TO_GET}")
    cached = _decoded_path(path, key)
    if cached.is_file():
        try:
            arr = np.load(cached, mmap_mode="r")
            if arr.shape == spec.shape:
                return arr
        except (ValueError, OSError):
            pass  # a damaged cache entry: decode again below
    raw = _read_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise DataError(
            f"{path} is corrupt (sha256 of its contents is {digest[:16]}..., expected "
            f"{spec.sha256[:16]}...). Delete it and fetch it again. {HOW_TO_GET}"
        )
    arr = decode_idx(raw, path)
    if arr.shape != spec.shape:
        raise DataError(f"{path} has shape {arr.shape}, expected {spec.shape}. {HOW_TO_GET}")
    try:
        atomic_write(cached, numpy_bytes(arr))
        return np.load(cached, mmap_mode="r")
    except OSError:
        return arr  # read-only cache: fall back to the in-memory copy


def load(data_dir: str | os.PathLike[str] | None = None) -> tuple[Split, Split]:
    """(train, test) splits, verified."""
    directory = locate(data_dir)
    train = Split(load_array(directory, "train-images"), load_array(directory, "train-labels"))
    test = Split(load_array(directory, "test-images"), load_array(directory, "test-labels"))
    return train, test
