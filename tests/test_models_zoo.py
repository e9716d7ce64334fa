"""The paper's networks for its data sets, PFLlib's FedAvg CNN, and CIFAR's augmentation, checked
against hand-worked sizes and independent re-computations of the official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrep.algorithms.training import Phase, run_phases
from fedrep.config import parse_run_config
from fedrep.data.transforms import CIFAR_STATS, CropFlip, normalized_chw
from fedrep.models import CifarCNN100, FedAvgCNN, FemnistCNN, Sent140LSTM, build_model


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("channels", "side", "features"), [(1, 28, 1024), (3, 32, 1600)])
def test_fedavg_cnn_feature_sizes_and_parameter_count(channels: int, side: int, features: int):
    model = FedAvgCNN(num_classes=10, in_channels=channels, image_size=side)
    assert model.body(torch.zeros(2, channels, side, side)).shape == (2, 512)
    assert _shapes(model)["body.7.weight"] == (512, features)
    # conv1 + conv2 + fc1 + fc, by hand
    expected = (channels * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (features * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.head_keys() == ["head.weight", "head.bias"]  # body = everything but the last layer


def test_cifar100_network_is_the_official_cnncifar100():
    model = CifarCNN100()
    # official models/Nets.py CNNCifar100: conv1 3->64, conv2 64->128, fc1 3200->256, fc2 256->128,
    # fc3 128->100; FedRep shares everything but fc3
    assert [s for k, s in _shapes(model).items() if k.endswith("weight")] == [
        (64, 3, 5, 5), (128, 64, 5, 5), (256, 3200), (128, 256), (100, 128)]
    assert model.head_keys() == ["head.weight", "head.bias"]
    assert not model.body_is_deterministic()  # dropout 0.6 after fc2


def test_femnist_cnn_is_the_official_cnn_femnist():
    model = FemnistCNN()
    assert [s for k, s in _shapes(model).items() if k.endswith("weight")] == [
        (4, 1, 5, 5), (12, 4, 5, 5), (120, 192), (100, 120), (10, 100)]


def test_sent140_lstm_shares_the_official_keys_and_initialises_as_rnnsent():
    model = Sent140LSTM()
    # official main_fedrep.py: w_glob_keys for sent140 = net_keys[0..5] (LSTM and fc); decoder is the head
    assert model.representation_keys() == [
        "body.rnn.weight_ih_l0", "body.rnn.weight_hh_l0", "body.rnn.bias_ih_l0", "body.rnn.bias_hh_l0",
        "body.fc.weight", "body.fc.bias"]
    assert model.head_keys() == ["head.weight", "head.bias"]
    assert _shapes(model)["body.rnn.weight_ih_l0"] == (4 * 128, 300)
    for layer in (model.body.fc, model.head):  # RNNSent.init_weights
        assert layer.weight.abs().max() <= 0.1 and torch.all(layer.bias == 0)


def test_sent140_official_view_reproduces_the_official_forward():
    torch.manual_seed(0)
    model = Sent140LSTM(layout="official-view").eval()
    words = torch.randn(4, 25, 300)
    # The official forward, step by step: emb[i, j, :] = encoder[input[i, j]] with input
    # transposed to (words, batch), then emb.view(300, 4, 25), LSTM, fc, ReLU, last step, decoder.
    emb = torch.zeros(25, 4, 300)
    for i in range(25):
        for j in range(4):
            emb[i, j, :] = words[j, i, :]
    out, _ = model.body.rnn(emb.view(300, 4, 25))
    expected = model.head(torch.relu(model.body.fc(out))[-1, :, :])
    torch.testing.assert_close(model(words), expected)
    assert model.body.rnn.input_size == 25


def test_build_model_picks_the_official_network_per_data_set():
    picks = {ds: type(build_model(parse_run_config({"dataset": ds}))).__name__
             for ds in ("fashion-mnist", "cifar10", "cifar100", "femnist", "sent140")}
    assert picks == {"fashion-mnist": "PaperCNN", "cifar10": "PaperCNN", "cifar100": "CifarCNN100",
                     "femnist": "PaperMLP", "sent140": "Sent140LSTM"}
    cifar = build_model(parse_run_config({"dataset": "cifar10"}))
    assert cifar(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    femnist_all = build_model(parse_run_config({"dataset": "femnist", "femnist-classes": "all"}))
    assert femnist_all(torch.zeros(2, 1, 28, 28)).shape == (2, 62)


def test_a_model_that_cannot_take_the_data_is_refused_by_name():
    with pytest.raises(ValueError, match="femnist-cnn.*cifar10"):
        build_model(parse_run_config({"dataset": "cifar10", "model": "fedavg-cnn"}).model_copy(
            update={"model": "femnist-cnn"}))


def test_normalisation_is_torchvision_to_tensor_then_normalize():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    mean, std = CIFAR_STATS["cifar10"]
    x = normalized_chw(pixels, mean, std)
    assert x.shape == (2, 3, 32, 32)
    for c in range(3):
        expected = (pixels[..., c].astype(np.float32) / 255 - mean[c]) / std[c]
        np.testing.assert_allclose(x[:, c].numpy(), expected, rtol=1e-6, atol=1e-6)


def _reference_crop_flip(image: np.ndarray, top: int, left: int, flip: bool, pad: int,
                         fill: np.ndarray) -> np.ndarray:
    """torchvision's RandomCrop(padding) + RandomHorizontalFlip for given draws, with loops."""
    c, h, w = image.shape
    padded = np.empty((c, h + 2 * pad, w + 2 * pad), dtype=image.dtype)
    for ch in range(c):
        padded[ch] = fill[ch]
    padded[:, pad:pad + h, pad:pad + w] = image
    crop = padded[:, top:top + h, left:left + w]
    return crop[:, :, ::-1] if flip else crop


def test_crop_flip_equals_a_looped_reference_for_the_same_draws():
    mean, std = CIFAR_STATS["cifar100"]
    aug = CropFlip.for_normalized(mean, std)
    x = torch.randn(16, 3, 32, 32)
    out = aug(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # replay the draws in the same order
    top = torch.randint(0, 9, (16,), generator=gen)
    left = torch.randint(0, 9, (16,), generator=gen)
    flip = torch.rand(16, generator=gen) < 0.5
    black = np.array([-m / s for m, s in zip(mean, std, strict=True)], dtype=np.float32)
    for i in range(16):
        ref = _reference_crop_flip(x[i].numpy(), int(top[i]), int(left[i]), bool(flip[i]), 4, black)
        np.testing.assert_array_equal(out[i].numpy(), ref)
    # the padding is normalised black: what torchvision pads with before Normalize
    np.testing.assert_allclose(black, normalized_chw(np.zeros((1, 1, 1, 3), np.uint8), mean, std)
                               .flatten().numpy(), rtol=1e-6)


def test_crop_flip_covers_every_offset_and_flips_half():
    aug = CropFlip((0.0,), padding=4)
    x = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).expand(4000, 1, 32, 32)
    out = aug(x, torch.Generator().manual_seed(0))
    flipped = out[:, 0, 16, 17] < out[:, 0, 16, 16]
    assert 0.45 < flipped.float().mean() < 0.55
    assert len({tuple(o[0, 16, 14:18].tolist()) for o in out}) > 60  # 9 x 9 offsets x 2 flips


def test_augmented_head_epochs_see_new_features_every_epoch():
    """With augmentation the body is re-run per batch (no cached features): the augment callable
    is called every epoch, and the same generator seed gives the same result (resumable)."""
    cfg = parse_run_config({"dataset": "cifar10", "batch-size": 10})
    calls = []

    def counting(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        calls.append(len(x))
        return CropFlip.for_normalized(*CIFAR_STATS["cifar10"])(x, gen)

    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))

    def train(seed: int) -> dict[str, torch.Tensor]:
        model = build_model(cfg)
        head = frozenset(f"head.{n}" for n, _ in model.head.named_parameters())
        run_phases(model, x, y, [Phase(head, 3)], cfg, torch.Generator().manual_seed(seed), counting)
        return model.state_dict()

    first = train(1)
    assert calls == [10] * 6  # 2 batches x 3 epochs, all augmented
    second = train(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
