"""KD3A as the official code trains it: the cosine learning-rate schedule, each party's SGD
momentum kept across rounds, the official Digit-Five network, and r < 1 (only the sources
repeat). Checked against torch's own scheduler, a plain torch loop, and a killed-and-resumed run."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume import _kill_after_round

from conftest import fedrep_cli
from fedrep.algorithms.kd3a.rule import KD3AOptions, KD3ARule, WithMomentum
from fedrep.algorithms.kd3a.schedule import official_cosine_lr
from fedrep.algorithms.training import shuffled_batches
from fedrep.config import parse_run_config
from fedrep.data.federated import ClientData
from fedrep.models import KD3ADigitCNN, build_model
from fedrep.models.domain_cnn import DomainCNN
from fedrep.results import RunDir, read_head_versions

KD3A = {"strategy": "kd3a", "dataset": "fmnist-domains", "model": "cnn-bn", "num-clients": 3,
        "source-domains": "original,inverted", "model-width": 4, "batch-size": 8, "num-rounds": 4,
        "momentum": 0.9}


def test_cosine_schedule_equals_torch_stepped_as_the_official_main():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100, eta_min=0.001)
    trained_at = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # step(epoch) is deprecated; the official code calls it
        for epoch in range(100):
            trained_at.append(optimizer.param_groups[0]["lr"])  # the rate epoch `epoch` trains at
            scheduler.step(epoch)
    assert [official_cosine_lr(e, 100) for e in range(100)] == pytest.approx(trained_at, abs=1e-12)
    assert official_cosine_lr(0, 100) == official_cosine_lr(1, 100) == 0.05  # the off-by-one, kept
    assert official_cosine_lr(51, 100) == pytest.approx(0.001 + 0.049 * 0.5)  # cos(pi/2) = 0


def test_rounds_use_the_schedule_or_the_runs_lr():
    cfg = parse_run_config(KD3A)
    assert KD3ARule(cfg, KD3AOptions()).round_lr(4) == pytest.approx(official_cosine_lr(3, 4))
    assert KD3ARule(cfg, KD3AOptions(lr_schedule="constant")).round_lr(4) == cfg.lr


def _data(n: int, seed: int) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return ClientData(x, y, x[:4], y[:4])


def test_a_source_keeps_its_momentum_across_rounds_like_one_official_optimizer():
    """Two rounds of a source with the received model replaced in between equal one torch SGD
    that lives across both rounds (official: optimisers built once in main.py)."""
    cfg = parse_run_config({**KD3A, "weight-decay": 0.0})
    options = KD3AOptions(lr_schedule="constant")
    rule = KD3ARule(cfg, options)
    torch.manual_seed(0)
    party = rule.prepare_model(DomainCNN(width=4))
    assert isinstance(party, WithMomentum) and all(k.startswith(("body.", "head.", "momentum."))
                                                   for k in party.state_dict())
    reference = DomainCNN(width=4)
    reference.load_state_dict({k: v for k, v in party.state_dict().items() if not k.startswith("momentum.")})
    sgd = torch.optim.SGD(reference.parameters(), lr=cfg.lr, momentum=0.9)
    data = _data(24, 1)
    received = {k: v + 0.01 for k, v in reference.state_dict().items() if k.startswith("body.")}
    for server_round in (1, 2):
        if server_round == 2:  # the server's aggregate replaces the shared part; momentum stays
            party.load_state_dict({**party.state_dict(), **received})
            reference.load_state_dict({**reference.state_dict(), **received})
        rule.train_source(party, data, torch.Generator().manual_seed(server_round),
                          {"server-round": server_round})
        reference.train()
        for idx in shuffled_batches(24, 8, torch.Generator().manual_seed(server_round), min_size=2):
            sgd.zero_grad()
            torch.nn.functional.cross_entropy(reference(data.x_train[idx]), data.y_train[idx]).backward()
            sgd.step()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(party.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    per_round = KD3ARule(cfg, KD3AOptions(lr_schedule="constant", optimizer_state="per-round"))
    assert not isinstance(per_round.prepare_model(DomainCNN(width=4)), WithMomentum)


def test_below_one_round_per_epoch_only_the_sources_repeat():
    cfg = parse_run_config(KD3A)
    data = _data(32, 2)  # 4 batches of 8 per epoch
    for passes, expected_target in (("one", 4), ("as-sources", 8)):
        rule = KD3ARule(cfg, KD3AOptions(rounds_per_epoch=0.5, target_passes=passes))
        source = rule.train_source(rule.prepare_model(DomainCNN(width=4)), data, torch.Generator())
        assert source.metrics["local-steps"] == 8  # 1/r = 2 epochs
        teacher = {"source-1": source.arrays}
        target = rule.adapt_target(rule.prepare_model(DomainCNN(width=4)), data, teacher, 0.5,
                                   torch.ones(1), torch.Generator())
        assert target.metrics["local-steps"] == expected_target


def test_the_official_digit_network():
    model = KD3ADigitCNN()
    assert model.body(torch.zeros(2, 3, 32, 32)).shape == (2, 2048)
    weights = [tuple(v.shape) for k, v in model.state_dict().items() if k.endswith("weight") and v.ndim > 1]
    assert weights == [(64, 3, 5, 5), (64, 64, 5, 5), (128, 64, 5, 5), (3072, 8192), (2048, 3072), (10, 2048)]
    built = build_model(parse_run_config({**KD3A, "model": "kd3a-digit"}))
    assert isinstance(built, KD3ADigitCNN)


@pytest.mark.e2e
def test_kd3a_with_schedule_and_momentum_resumes_bitwise(tmp_path: Path, fmnist_dir: Path):
    common = ["run", "--strategy", "kd3a", "--dataset", "fmnist-domains", "--model", "cnn-bn",
              "--num-clients", "3", "--rounds", "4", "--set", "target-domain=rotated",
              "--set", "source-domains=original,inverted", "--set", "model-width=4",
              "--set", "max-train-per-client=48", "--set", "max-test-per-client=16",
              "--set", "batch-size=8", "--set", "momentum=0.9", "--set", "fraction-train=1.0"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    fedrep_cli(*common, "--set", f"run-dir={straight}", timeout=400)
    _kill_after_round([*common, "--set", f"run-dir={broken}"], broken, after=2)
    assert 2 <= RunDir(broken).last_completed_round() < 4
    fedrep_cli("run", "--resume", str(broken), timeout=400)
    a, b = RunDir(straight), RunDir(broken)
    for key, value in a.load_checkpoint(4).items():
        np.testing.assert_array_equal(b.load_checkpoint(4)[key], value, err_msg=key)
    states = sorted((straight / "client-state").glob("*.pt"))
    assert len(states) == 3
    for path in states:  # each party's momentum is in its state file
        newest = read_head_versions(path)[max(read_head_versions(path))]
        moving = [k for k, v in newest.items() if k.startswith("momentum.") and v.abs().sum() > 0]
        assert moving, path
    assert [r["target-accuracy"] for r in a.read_metrics()] == \
        [r["target-accuracy"] for r in b.read_metrics()]
