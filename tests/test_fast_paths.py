"""The local update's fast paths (issue 23) give the plain PyTorch loop's model: the closed-form
linear head, channels-last convolutions, pooling before ReLU, and all of them together."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrep.algorithms.fedrep import FedRepUpdate
from fedrep.algorithms.linear_head import linear_head_epochs, supports_closed_form
from fedrep.algorithms.training import make_optimizer, round_generator, shuffled_batches
from fedrep.config import parse_run_config
from fedrep.data.federated import ClientData
from fedrep.models import build_model
from fedrep.models.base import SplitModel, conv_stack

SLOW = {"closed-form-head": False, "channels-last": False, "cache-head-features": False}
FAST = {"closed-form-head": True, "channels-last": True, "cache-head-features": True}


def _images(n: int, channels: int, side: int, seed: int = 0) -> ClientData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, side, side, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ClientData(x, y, x[: n // 3], y[: n // 3])


def _autograd_head_epochs(head: nn.Linear, feats, labels, epochs, optimizer, batches):
    losses, steps = [], 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in batches():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(head(feats[idx]), labels[idx])
            loss.backward()
            optimizer.step()
            total, count, steps = total + loss.item() * len(idx), count + len(idx), steps + 1
        losses.append(total / count)
    return losses, steps


def test_closed_form_head_equals_autograd_sgd_including_momentum_buffers():
    """Two calls in a row (the second starts from the first's momentum buffers, as a later phase
    of the same local update would), batches of 7 over 30 samples (a short trailing batch),
    weight decay on the weight only: parameters, buffers, losses and steps all match."""
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(30, 16, generator=g), torch.randint(0, 5, (30,), generator=g)
    cfg = parse_run_config({"lr": 0.1, "momentum": 0.9, "weight-decay": 0.01, "batch-size": 7})
    results = []
    for train in (_autograd_head_epochs, linear_head_epochs):
        torch.manual_seed(0)
        head = nn.Linear(16, 5)
        optimizer = make_optimizer(head, cfg)
        assert supports_closed_form(head, optimizer)
        gen = torch.Generator().manual_seed(4)
        runs = [train(head, feats, labels, 3, optimizer, lambda g=gen: shuffled_batches(30, 7, g))
                for _ in range(2)]
        buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in (head.weight, head.bias)]
        results.append((head.state_dict(), buffers, runs))
    (state_a, buf_a, runs_a), (state_b, buf_b, runs_b) = results
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(buf_a, buf_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for (losses_a, steps_a), (losses_b, steps_b) in zip(runs_a, runs_b, strict=True):
        assert steps_a == steps_b == 3 * 5
        assert losses_b == pytest.approx(losses_a, rel=1e-6)
    assert state_a["weight"].ne(nn.Linear(16, 5).weight).any()  # it did train


def test_closed_form_head_only_for_a_plain_sgd_linear_head():
    head = nn.Linear(4, 3)
    assert not supports_closed_form(head, torch.optim.Adam(head.parameters()))
    assert not supports_closed_form(head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.5,
                                                          nesterov=True))
    assert not supports_closed_form(nn.Sequential(head), torch.optim.SGD(head.parameters(), lr=0.1))
    assert not supports_closed_form(nn.Linear(4, 3, bias=False), torch.optim.SGD(head.parameters(), lr=0.1))


def test_pooling_before_relu_computes_the_official_order_bit_for_bit():
    """conv -> pool -> ReLU (ours) against conv -> ReLU -> pool (official): same output and same
    gradients, exactly, on inputs that produce all-negative pooling windows too."""
    torch.manual_seed(0)
    ours = nn.Sequential(*conv_stack(3, 8, 8))
    official = nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
                             nn.Conv2d(8, 8, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten())
    official.load_state_dict(ours.state_dict())  # the same keys: no parameter moved
    x = torch.randn(6, 3, 32, 32) - 0.5
    out_ours, out_official = ours(x), official(x)
    assert torch.equal(out_ours, out_official) and (out_ours == 0).any()
    out_ours.square().sum().backward()
    out_official.square().sum().backward()
    for a, b in zip(ours.parameters(), official.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(("model", "dataset", "channels", "side"), [
    ("cnn", "fashion-mnist", 1, 28), ("cnn", "cifar10", 3, 32), ("mlp", "fashion-mnist", 1, 28)])
def test_fast_local_update_equals_plain_loop(model: str, dataset: str, channels: int, side: int):
    """A FedRep local update (10 head epochs + 1 body epoch) and the evaluation after it, with
    every fast path on and with all off: the same model up to float reassociation, the same
    accuracy, and state dicts in PyTorch's default layout."""
    data = _images(45, channels, side)
    outcomes = []
    for switches in (SLOW, FAST):
        cfg = parse_run_config({"model": model, "dataset": dataset, "head-epochs": 10, "body-epochs": 1,
                                "batch-size": 10, **switches})
        torch.manual_seed(0)
        net: SplitModel = build_model(cfg)
        rule = FedRepUpdate(cfg)
        fit = rule.fit(net, data, round_generator(3, 2, 1))
        ev = rule.evaluate(net, data, round_generator(3, 2, 1))
        assert all(v.is_contiguous() for v in net.state_dict().values())
        outcomes.append((net.state_dict(), fit, ev))
    (slow, fit_slow, ev_slow), (fast, fit_fast, ev_fast) = outcomes
    for key in slow:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-5, atol=1e-6)
    assert fit_fast.steps == fit_slow.steps == 11 * 5
    assert fit_fast.loss == pytest.approx(fit_slow.loss, rel=1e-5)
    assert ev_fast.accuracy == ev_slow.accuracy
    assert ev_fast.loss == pytest.approx(ev_slow.loss, rel=1e-5)


def test_channels_last_really_applies_to_one_channel_images():
    """A one-channel conv weight or batch counts as contiguous in both layouts; the layout must
    still be forced (strides with channels innermost), or oneDNN keeps its slow path."""
    from fedrep.algorithms.training import memory_layout

    cfg = parse_run_config({"model": "cnn"})
    net = build_model(cfg)
    x = torch.randn(4, 1, 28, 28)
    first_conv = net.body[0].weight
    with memory_layout(net, x, enabled=True) as inside:
        assert inside.stride()[1] == 1 and first_conv.stride()[1] == 1
        assert net.body(inside).shape == (4, 64)
    assert first_conv.stride() == (25, 25, 5, 1) and first_conv is net.body[0].weight
    with memory_layout(net, x, enabled=False) as inside:
        assert inside is x and first_conv.stride() == (25, 25, 5, 1)
