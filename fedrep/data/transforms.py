"""Image tensors from stored pixels, and the official CIFAR train-time augmentation.

Normalisation constants are the official ones (``utils/train_utils.py``): CIFAR-10 uses the
ImageNet statistics ``trans_cifar10_*`` normalise with, CIFAR-100 its own. The augmentation is the
official ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``, applied per batch on
normalised tensors. torchvision pads the *raw* image with black (0) before ``ToTensor`` and
``Normalize``, so the padding here is the normalised value of 0, ``-mean/std`` per channel: the
same images, without torchvision (whose wheels do not import beside our torch build) and without
a DataLoader. Every random draw comes from the caller's ``torch.Generator``, so a resumed run
augments exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}


def normalized_chw(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, H, W, C) pixels -> float32 (N, C, H, W), ``(x / 255 - mean) / std`` per channel
    (torchvision's ToTensor then Normalize)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


@dataclass(frozen=True)
class CropFlip:
    """Random ``size``-crop of the image padded by ``padding`` with ``fill`` (per channel), then a
    horizontal flip with probability 1/2: torchvision's RandomCrop(size, padding) +
    RandomHorizontalFlip on (B, C, H, W) batches, one draw per image."""

    fill: tuple[float, ...]
    padding: int = 4

    @classmethod
    def for_normalized(cls, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 4) -> CropFlip:
        """Pad with black, as torchvision does before normalising: ``(0 - mean) / std``."""
        return cls(tuple(-m / s for m, s in zip(mean, std, strict=True)), padding)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.padding
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p : p + h, p : p + w] = x
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        rows = (top[:, None] + torch.arange(h)).to(x.device)  # (b, h)
        cols = left[:, None] + torch.arange(w)  # (b, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chan = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
