"""A built-in, offline multi-domain benchmark derived from Fashion-MNIST, for KD3A-style multi-source
domain adaptation (Feng et al., ICML 2021) where Digit-Five is not at hand.

Digit-Five's point is five *visually* different renderings of one label space (grey MNIST, MNIST-M's
coloured textures, SVHN photos, ...). We get the same structure from Fashion-MNIST alone by rendering
disjoint image subsets five different ways, plus one ``irrelevant`` domain whose images carry no class
information (the role quickdraw plays in KD3A's DomainNet "irrelevant domain" experiment).

Output format, shared with :mod:`fedrep.data.digit_five`: images ``float32 [N, 3, 32, 32]`` in
``[0, 1]`` (KD3A's 32x32 RGB digit size); labels ``int64 [N]`` in ``0..9``. KD3A's transform
normalises with mean = std = 0.5 to ``[-1, 1]``; apply :func:`kd3a_normalize` for that.

Sources: the 60000 Fashion-MNIST *training* images are split, per class and by ``seed``, into one
disjoint slot per domain (1000 images per class each), and each slot into a per-domain train
(80%) and test (20%) split, so no two domains and no train/test pair share an image.

Everything is deterministic in ``seed``: random rendering parameters are drawn in fixed chunks of
:data:`CHUNK` samples, each chunk from its own generator, so ``max_samples=k`` returns exactly the
first ``k`` samples of the full split and only renders those.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fedrep.config import ConfigError
from fedrep.data import fashion_mnist

Split = Literal["train", "test"]

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_FRACTION = 0.2
CHUNK = 256

# The five adaptation domains, then the one kept out of them for robustness experiments.
DOMAIN_NAMES: tuple[str, ...] = ("original", "inverted", "mnistm-style", "rotated", "lowres-noise")
IRRELEVANT = "irrelevant"
ALL_DOMAINS: tuple[str, ...] = (*DOMAIN_NAMES, IRRELEVANT)

ROTATION_DEGREES = (30.0, 60.0)  # |angle| range; the sign is random per sample
LOWRES_SIZE = 12
LOWRES_NOISE_STD = 0.15

_SPLITS: tuple[str, ...] = ("train", "test")
_INDEX_STREAM = 0xD0_5A1  # seed-stream tags keep the index split and the renderings independent
_RENDER_STREAM = 0xD0_4E4


class DomainError(ConfigError):
    """An unknown domain or split, or an impossible argument; the message names the valid choices."""


def _check(name: str, split: str) -> None:
    if name not in ALL_DOMAINS:
        raise DomainError(f"unknown domain {name!r}; choose one of {', '.join(ALL_DOMAINS)}")
    if split not in _SPLITS:
        raise DomainError(f"unknown split {split!r}; choose 'train' or 'test'")


def kd3a_normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], KD3A's ``Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))``."""
    return (x - 0.5) / 0.5


# --- which Fashion-MNIST images each domain gets ---------------------------------------------------
@lru_cache(maxsize=4)
def _fashion_train(data_dir: str) -> fashion_mnist.Split:
    train, _ = fashion_mnist.load(data_dir or None)
    return train


@lru_cache(maxsize=8)
def _slots(data_dir: str, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per domain (in ``ALL_DOMAINS`` order): (train, test) indices into the Fashion-MNIST train split.

    Split per class so every domain holds the same number of each class, then shuffled within each
    split so that any prefix (``max_samples``) stays close to class-balanced."""
    labels = np.asarray(_fashion_train(data_dir).labels)
    rng = np.random.default_rng([seed, _INDEX_STREAM])
    per_domain: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in ALL_DOMAINS]
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        for d, part in enumerate(np.array_split(members, len(ALL_DOMAINS))):
            n_test = int(round(len(part) * TEST_FRACTION))
            per_domain[d][0].append(part[n_test:])
            per_domain[d][1].append(part[:n_test])
    out = []
    for train_parts, test_parts in per_domain:
        train = rng.permutation(np.concatenate(train_parts)).astype(np.int64)
        test = rng.permutation(np.concatenate(test_parts)).astype(np.int64)
        out.append((train, test))
    return tuple(out)


def domain_indices(
    name: str, split: Split, seed: int = 0, data_dir: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """int64 indices into the Fashion-MNIST *train* split that domain ``name`` renders, in order."""
    _check(name, split)
    train, test = _slots(str(data_dir or ""), seed)[ALL_DOMAINS.index(name)]
    return (train if split == "train" else test).copy()


# --- renderings: uint8 [N, 28, 28] -> float32 [N, 3, 32, 32] in [0, 1] ---------------------------------
def _grey3(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> [N, 3, 32, 32]: scale to [0, 1], zero-pad 2 px (the object keeps its
    size, as MNIST's 32x32 in Digit-Five), replicate to 3 channels as KD3A does for grey digits."""
    x = images.to(torch.float32).div_(255.0).unsqueeze(1)
    pad = (IMAGE_SIZE - x.shape[-1]) // 2
    x = F.pad(x, (pad, IMAGE_SIZE - x.shape[-1] - pad, pad, IMAGE_SIZE - x.shape[-2] - pad))
    return x.expand(-1, 3, -1, -1).contiguous()


def colour_texture(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 3, 32, 32] in [0, 1]: multi-octave colour value noise, our offline stand-in for the BSDS500
    photo patches MNIST-M blends with (no external images). Octaves of 2..16 px random colour grids
    are upsampled and summed with halving weights, then stretched to [0, 1] per image."""
    tex = torch.zeros(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    for octave, size in enumerate((2, 4, 8, 16)):
        grid = torch.rand(n, 3, size, size, generator=gen)
        tex += 0.5**octave * F.interpolate(grid, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    lo = tex.amin(dim=(1, 2, 3), keepdim=True)
    hi = tex.amax(dim=(1, 2, 3), keepdim=True)
    return (tex - lo) / (hi - lo).clamp_min(1e-6)


def _render_original(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Grey image, zero-padded to 32x32, replicated to 3 channels (Digit-Five's MNIST)."""
    return x


def _render_inverted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``1 - original``: white background, dark object (a pure intensity shift of the domain)."""
    return 1.0 - x


def _render_mnistm(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MNIST-M's construction (Ganin et al., 2015), ``|background - image|`` per channel, with a seeded
    colour texture (:func:`colour_texture`) as the background: texture shows where the object is
    dark, its colour negative where the object is bright."""
    return (colour_texture(len(x), gen) - x).abs()


def _render_rotated(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotated about the centre by a per-sample angle, ``|angle|`` uniform in ``ROTATION_DEGREES`` with
    a random sign, via ``affine_grid``/``grid_sample`` (bilinear, zeros outside)."""
    lo, hi = ROTATION_DEGREES
    magnitude = lo + (hi - lo) * torch.rand(len(x), generator=gen)
    sign = torch.randint(0, 2, (len(x),), generator=gen) * 2 - 1
    theta = torch.deg2rad(magnitude * sign)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _render_lowres_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Area-downsampled to ``LOWRES_SIZE`` px, bilinear back to 32 px, plus Gaussian noise of std
    ``LOWRES_NOISE_STD`` drawn per pixel and channel (so the grain is coloured), clipped to [0, 1]:
    a blurry, grainy sensor (USPS-like resolution loss)."""
    small = F.interpolate(x, size=LOWRES_SIZE, mode="area")
    blurred = F.interpolate(small, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    noise = LOWRES_NOISE_STD * torch.randn(blurred.shape, generator=gen)
    return (blurred + noise).clamp_(0.0, 1.0)


def _render_irrelevant(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Colour texture only: the image is drawn independently of the source image and its label, so it
    carries no class information; the labels are kept so accuracy on it can still be measured."""
    return colour_texture(len(x), gen)


_RENDER = {
    "original": _render_original,
    "inverted": _render_inverted,
    "mnistm-style": _render_mnistm,
    "rotated": _render_rotated,
    "lowres-noise": _render_lowres_noise,
    IRRELEVANT: _render_irrelevant,
}


def _chunk_generator(seed: int, name: str, split: str, chunk: int) -> torch.Generator:
    state = np.random.SeedSequence(
        [seed, _RENDER_STREAM, ALL_DOMAINS.index(name), _SPLITS.index(split), chunk]
    ).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def render(
    name: str, images: np.ndarray | torch.Tensor, seed: int = 0, split: Split = "train"
) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 3, 32, 32] in [0, 1], rendered as domain ``name``.

    Random parameters come from one generator per ``CHUNK`` samples keyed by (seed, domain, split,
    chunk), so a prefix of the input gets the same rendering as when rendered in full."""
    _check(name, split)
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.array(images))  # a copy: memory-mapped arrays are read-only
    if images.ndim != 3 or images.dtype != torch.uint8:
        raise DomainError(f"render wants uint8 [N, H, W] images, got {images.dtype} {list(images.shape)}")
    out = torch.empty(len(images), 3, IMAGE_SIZE, IMAGE_SIZE)
    for c in range(math.ceil(len(images) / CHUNK)):
        part = images[c * CHUNK : (c + 1) * CHUNK]
        # Always render a full chunk (zero-padded) so every random draw has the same size, and a
        # sample's draws do not depend on how many samples follow it.
        full = F.pad(part, (0, 0, 0, 0, 0, CHUNK - len(part)))
        rendered = _RENDER[name](_grey3(full), _chunk_generator(seed, name, split, c))
        out[c * CHUNK : c * CHUNK + len(part)] = rendered[: len(part)]
    return out


@lru_cache(maxsize=32)
def _load(
    name: str, split: Split, max_samples: int | None, seed: int, data_dir: str
) -> tuple[torch.Tensor, torch.Tensor]:
    indices = domain_indices(name, split, seed, data_dir or None)[:max_samples]
    train = _fashion_train(data_dir)
    x = render(name, np.asarray(train.images[indices]), seed, split)
    y = torch.from_numpy(np.asarray(train.labels)[indices].astype(np.int64))
    return x, y


def load_domain(
    name: str,
    split: Split = "train",
    max_samples: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 [N, 3, 32, 32] in [0, 1], y int64 [N]) for one domain's split.

    ``N`` is the split size (8000 train / 2000 test per domain) or ``max_samples`` if smaller; the
    result is the first ``N`` samples of the full split. Cached per process: the returned tensors
    are shared between callers, so clone them before modifying them in place."""
    _check(name, split)
    if max_samples is not None and max_samples < 1:
        raise DomainError(f"max_samples={max_samples}; use a positive count or None for the whole split")
    return _load(name, split, max_samples, seed, str(data_dir or ""))


def poison_labels(
    y: torch.Tensor, fraction: float, num_classes: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A copy of ``y`` [N] with ``round(N * fraction)`` randomly chosen labels replaced by
    ``(y + 1) % num_classes``: the "malicious source" poisoning attack at level m% = ``fraction``.

    Follows the official KD3A code (``train/train.py``, ``train``): for the domain named by
    ``UMDAConfig.malicious.attack_domain`` it relabels the first ``round(batch * attack_level)``
    samples of every shuffled batch as ``(label + 1) % num_classes``. We pick the same share of the
    whole split once, so the corrupted samples stay fixed across epochs (a poisoned data set rather
    than fresh noise each batch); every chosen label really changes, since ``(y + 1) % C != y``."""
    if not 0.0 <= fraction <= 1.0:
        raise DomainError(f"poison fraction={fraction}; use a share in [0, 1] (KD3A's attack_level)")
    if num_classes < 2:
        raise DomainError(f"num_classes={num_classes}; label poisoning needs at least 2 classes")
    out = y.clone()
    count = int(round(len(y) * fraction))
    chosen = torch.randperm(len(y), generator=generator)[:count]
    out[chosen] = (out[chosen] + 1) % num_classes
    return out
