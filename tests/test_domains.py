"""The Fashion-MNIST multi-domain benchmark (fedrep.data.domains) and the label-poisoning attack."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrep.data import domains, fashion_mnist

SMALL = 256  # samples per split for the cheap checks (one rendering chunk)


def _ncm_accuracy(name: str, fmnist_dir: Path, n: int) -> float:
    """Nearest-class-mean classifier fitted on the domain's train split, scored on its test split."""
    x_tr, y_tr = domains.load_domain(name, "train", n, data_dir=fmnist_dir)
    x_te, y_te = domains.load_domain(name, "test", n, data_dir=fmnist_dir)
    means = torch.stack([x_tr[y_tr == c].flatten(1).mean(0) for c in range(domains.NUM_CLASSES)])
    pred = torch.cdist(x_te.flatten(1), means).argmin(1)
    return float((pred == y_te).float().mean())


@pytest.mark.parametrize("name", domains.ALL_DOMAINS)
def test_every_domain_has_the_digit_five_format(name: str, fmnist_dir: Path):
    x, y = domains.load_domain(name, "train", SMALL, data_dir=fmnist_dir)
    assert x.shape == (SMALL, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (SMALL,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(y.tolist()) <= set(range(10))


def test_five_adaptation_domains_plus_irrelevant():
    assert len(domains.DOMAIN_NAMES) >= 5
    assert domains.IRRELEVANT not in domains.DOMAIN_NAMES
    assert set(domains.ALL_DOMAINS) == {*domains.DOMAIN_NAMES, domains.IRRELEVANT}


def test_same_seed_gives_identical_tensors_and_other_seed_differs(fmnist_dir: Path):
    domains._load.cache_clear()
    a = domains.load_domain("mnistm-style", "train", 64, seed=5, data_dir=fmnist_dir)
    domains._load.cache_clear()
    b = domains.load_domain("mnistm-style", "train", 64, seed=5, data_dir=fmnist_dir)
    c = domains.load_domain("mnistm-style", "train", 64, seed=6, data_dir=fmnist_dir)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_max_samples_is_a_prefix_of_the_full_rendering(fmnist_dir: Path):
    """Randomness is drawn per fixed chunk, so a smaller request renders the same first samples."""
    small_x, small_y = domains.load_domain("rotated", "test", 100, data_dir=fmnist_dir)
    big_x, big_y = domains.load_domain("rotated", "test", 300, data_dir=fmnist_dir)
    assert torch.equal(small_x, big_x[:100]) and torch.equal(small_y, big_y[:100])


def test_domains_are_pairwise_visually_distinct(fmnist_dir: Path):
    """The same source images rendered by two domains differ by a large mean absolute amount."""
    train, _ = fashion_mnist.load(fmnist_dir)
    images = np.asarray(train.images[:SMALL])
    rendered = {name: domains.render(name, images) for name in domains.ALL_DOMAINS}
    for a, b in itertools.combinations(domains.ALL_DOMAINS, 2):
        gap = float((rendered[a] - rendered[b]).abs().mean())
        assert gap > 0.1, f"{a} and {b} differ by only {gap:.3f} per pixel"


def test_original_is_the_padded_grey_image(fmnist_dir: Path):
    train, _ = fashion_mnist.load(fmnist_dir)
    x, y = domains.load_domain("original", "train", 8, data_dir=fmnist_dir)
    idx = domains.domain_indices("original", "train", data_dir=fmnist_dir)[:8]
    expected = torch.from_numpy(np.asarray(train.images[idx])).float() / 255
    assert torch.equal(x[:, 0, 2:30, 2:30], expected)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert x[:, :, :2].abs().sum() == 0  # the padding is background
    np.testing.assert_array_equal(y.numpy(), np.asarray(train.labels)[idx])


def test_domains_draw_from_disjoint_images(fmnist_dir: Path):
    seen: dict[int, str] = {}
    for name, split in itertools.product(domains.ALL_DOMAINS, ("train", "test")):
        idx = domains.domain_indices(name, split, seed=1, data_dir=fmnist_dir)
        assert len(np.unique(idx)) == len(idx)
        clash = set(idx.tolist()) & seen.keys()
        assert not clash, f"{name}/{split} reuses images of {seen[next(iter(clash))]}"
        seen.update(dict.fromkeys(idx.tolist(), f"{name}/{split}"))
    assert len(seen) == 60000  # every training image is used exactly once


def test_domains_are_class_balanced_with_an_80_20_split(fmnist_dir: Path):
    labels = np.asarray(fashion_mnist.load(fmnist_dir)[0].labels)
    for name in domains.ALL_DOMAINS:
        train = domains.domain_indices(name, "train", data_dir=fmnist_dir)
        test = domains.domain_indices(name, "test", data_dir=fmnist_dir)
        assert (len(train), len(test)) == (8000, 2000)
        assert np.bincount(labels[train], minlength=10).tolist() == [800] * 10


def test_irrelevant_domain_carries_no_class_information(fmnist_dir: Path):
    assert _ncm_accuracy("original", fmnist_dir, 512) > 0.5
    assert _ncm_accuracy(domains.IRRELEVANT, fmnist_dir, 512) < 0.16  # chance is 0.10


def test_unknown_domain_names_the_choices():
    with pytest.raises(domains.DomainError, match="mnistm-style"):
        domains.load_domain("mnist-m")
    with pytest.raises(domains.DomainError, match="'train' or 'test'"):
        domains.load_domain("original", "val")  # type: ignore[arg-type]


# --- poisoning ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.55, 1.0])
def test_poison_labels_changes_exactly_the_requested_fraction(fraction: float):
    y = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(0))
    poisoned = domains.poison_labels(y, fraction, 10, torch.Generator().manual_seed(1))
    changed = poisoned != y
    assert int(changed.sum()) == round(1000 * fraction)
    assert torch.equal(poisoned[changed], (y[changed] + 1) % 10)  # KD3A's (label + 1) % C
    assert poisoned.dtype == y.dtype


def test_poison_labels_leaves_its_input_alone_and_is_seeded():
    y = torch.arange(50) % 10
    before = y.clone()
    a = domains.poison_labels(y, 0.3, 10, torch.Generator().manual_seed(3))
    b = domains.poison_labels(y, 0.3, 10, torch.Generator().manual_seed(3))
    assert torch.equal(y, before) and torch.equal(a, b)


def test_poison_labels_rejects_a_fraction_outside_0_1():
    with pytest.raises(domains.DomainError, match="attack_level"):
        domains.poison_labels(torch.zeros(4, dtype=torch.int64), 1.5, 10)
