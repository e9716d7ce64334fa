"""The Digit-Five loader against tiny .mat files written in exactly the layouts KD3A's
``datasets/DigitFive.py`` reads (keys, axis orders, one-hot vs index labels, SVHN's 10 for 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedrep.data import digit_five
from fedrep.data.digit_five import DigitFiveError, load_digit_five
from fedrep.data.domains import DomainError

savemat = pytest.importorskip("scipy.io").savemat

N_TRAIN, N_TEST = 20, 12


def _code(digit: np.ndarray) -> np.ndarray:
    """The grey level a fixture image of class ``digit`` is filled with, so pairs can be checked."""
    return 10 + 20 * digit


def _grey(digits: np.ndarray, size: int) -> np.ndarray:
    """[N, size, size] uint8 filled with each sample's code; pixel (0, 0) holds the sample index."""
    out = np.repeat(_code(digits)[:, None, None], size, 1).repeat(size, 2).astype(np.uint8)
    out[:, 0, 0] = np.arange(len(digits))
    return out


def _rgb(digits: np.ndarray, size: int) -> np.ndarray:  # [N, H, W, 3]
    return np.repeat(_grey(digits, size)[..., None], 3, axis=3)


def _one_hot(digits: np.ndarray) -> np.ndarray:
    return np.eye(10, dtype=np.uint8)[digits]


def _svhn_style(digits: np.ndarray) -> dict[str, np.ndarray]:
    """``X`` [32, 32, 3, N] uint8, ``y`` [N, 1] in 1..10 where 10 is the digit 0."""
    return {"X": _rgb(digits, 32).transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits)[:, None]}


def write_digit_five(folder: Path, seed: int = 0) -> dict[tuple[str, str], np.ndarray]:
    """All official files with random digits; returns the true digits per (domain, split)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {
        (d, s): rng.integers(0, 10, N_TRAIN if s == "train" else N_TEST)
        for d in digit_five.DIGIT_FIVE_DOMAINS
        for s in ("train", "test")
    }
    mnist_tr, mnist_te = truth["mnist", "train"], truth["mnist", "test"]
    savemat(folder / "mnist_data.mat", {
        "train_32": _grey(mnist_tr, 32), "test_32": _grey(mnist_te, 32),
        "label_train": _one_hot(mnist_tr), "label_test": _one_hot(mnist_te),
    })  # fmt: skip
    mm_tr, mm_te = truth["mnistm", "train"], truth["mnistm", "test"]
    savemat(folder / "mnistm_with_label.mat", {
        "train": _rgb(mm_tr, 28), "test": _rgb(mm_te, 28),
        "label_train": _one_hot(mm_tr), "label_test": _one_hot(mm_te),
    })  # fmt: skip
    savemat(folder / "svhn_train_32x32.mat", _svhn_style(truth["svhn", "train"]))
    savemat(folder / "svhn_test_32x32.mat", _svhn_style(truth["svhn", "test"]))
    syn_tr, syn_te = truth["syn", "train"], truth["syn", "test"]
    savemat(folder / "syn_number.mat", {
        "train_data": _rgb(syn_tr, 32), "train_label": syn_tr[:, None],
        "test_data": _rgb(syn_te, 32), "test_label": syn_te[:, None],
    })  # fmt: skip
    cell = np.empty((2, 2), dtype=object)
    for row, split in enumerate(("train", "test")):
        digits = truth["usps", split]
        cell[row, 0] = _grey(digits, 28)[:, None].astype(np.float64) / 255  # [N, 1, 28, 28] in [0, 1]
        cell[row, 1] = digits[:, None]
    savemat(folder / "usps_28x28.mat", {"dataset": cell})
    return truth


@pytest.fixture
def digit_dir(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], np.ndarray]]:
    return tmp_path, write_digit_five(tmp_path)


@pytest.mark.parametrize("domain", digit_five.DIGIT_FIVE_DOMAINS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_domain_loads_in_the_shared_format_with_labels_paired(domain, split, digit_dir):
    folder, truth = digit_dir
    x, y = load_digit_five(domain, split, folder)
    n = N_TRAIN if split == "train" else N_TEST
    n *= 4 if (domain, split) == ("usps", "train") else 1  # KD3A tiles USPS train 4 times
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x[:, 0], x[:, 2])  # grey fixtures stay grey in all three channels
    centre = x[:, :, 8:24, 8:24].mean(dim=(1, 2, 3))
    expected = torch.from_numpy(_code(y.numpy()) / 255).float()
    torch.testing.assert_close(centre, expected, atol=1.5 / 255, rtol=0)
    repeats = n // len(truth[domain, split])
    assert sorted(y.tolist()) == sorted(np.tile(truth[domain, split], repeats).tolist())


def test_one_hot_labels_become_class_indices(digit_dir):
    folder, truth = digit_dir
    _, y = load_digit_five("mnist", "test", folder)
    x, _ = load_digit_five("mnist", "test", folder)
    sample = torch.round(x[:, 0, 0, 0] * 255).long()  # pixel (0, 0) is the sample's index in the file
    np.testing.assert_array_equal(y.numpy(), truth["mnist", "test"][sample.numpy()])


def test_svhn_label_10_means_digit_0(digit_dir):
    folder, truth = digit_dir
    x, y = load_digit_five("svhn", "train", folder)
    sample = torch.round(x[:, 0, 0, 0] * 255).long()
    np.testing.assert_array_equal(y.numpy(), truth["svhn", "train"][sample.numpy()])
    assert 10 not in y.tolist() and (truth["svhn", "train"] == 0).any()


def test_syn_also_reads_the_files_the_kd3a_code_names(tmp_path: Path):
    """KD3A's load_syn reads synth_{train,test}_32x32.mat in SVHN's layout; the zip has syn_number.mat."""
    digits = np.array([0, 3, 9, 0, 5])
    savemat(tmp_path / "synth_train_32x32.mat", _svhn_style(digits))
    _, y = load_digit_five("syn", "train", tmp_path)
    assert sorted(y.tolist()) == sorted(digits.tolist())


def test_usps_train_repeats_every_image_four_times(digit_dir):
    folder, _ = digit_dir
    x, _ = load_digit_five("usps", "train", folder)
    counts = torch.bincount(torch.round(x[:, 0, 0, 0] * 255).long())
    assert counts.tolist() == [4] * N_TRAIN


def test_test_split_is_the_first_9000_as_in_kd3a(digit_dir, monkeypatch: pytest.MonkeyPatch):
    folder, _ = digit_dir
    monkeypatch.setattr(digit_five, "KD3A_TEST_SAMPLES", 5)
    x, _ = load_digit_five("svhn", "test", folder, seed=11)
    assert sorted(torch.round(x[:, 0, 0, 0] * 255).long().tolist()) == [0, 1, 2, 3, 4]


def test_seeded_and_max_samples_is_a_prefix(digit_dir):
    folder, _ = digit_dir
    a = load_digit_five("mnistm", "train", folder, max_samples=7, seed=2)
    b = load_digit_five("mnistm", "train", folder, seed=2)
    c = load_digit_five("mnistm", "train", folder, seed=3)
    assert len(a[1]) == 7 and torch.equal(a[0], b[0][:7]) and torch.equal(a[1], b[1][:7])
    assert not torch.equal(b[0], c[0])


def test_kd3a_base_path_layout_is_found(tmp_path: Path):
    write_digit_five(tmp_path / "dataset" / "DigitFive")
    x, _ = load_digit_five("syn", "test", tmp_path)
    assert x.shape == (N_TEST, 3, 32, 32)


def test_missing_file_names_the_expected_path_and_the_download(tmp_path: Path):
    with pytest.raises(DigitFiveError) as err:
        load_digit_five("mnist", "train", tmp_path)
    message = str(err.value)
    assert "mnist_data.mat" in message and str(tmp_path / "DigitFive") in message
    assert digit_five.KD3A_DOWNLOAD in message


def test_wrong_layout_names_the_missing_key(tmp_path: Path):
    savemat(tmp_path / "mnist_data.mat", {"train": np.zeros((2, 32, 32), np.uint8)})
    with pytest.raises(DigitFiveError, match="no 'train_32' array"):
        load_digit_five("mnist", "train", tmp_path)


def test_unknown_domain_names_the_choices(tmp_path: Path):
    with pytest.raises(DomainError, match="mnistm, svhn, syn, usps"):
        load_digit_five("mnist-m", "train", tmp_path)
