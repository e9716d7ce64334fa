"""KD3A as a strategy of the platform: the client rule on its own, then a real Flower simulation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from single_process import run_kd3a

from conftest import fedrep_cli
from fedrep.algorithms.kd3a.rule import KD3AOptions, KD3ARule, local_batches
from fedrep.config import ConfigError, parse_run_config
from fedrep.data.federated import WITHHELD_LABEL, ClientData, load_client_data
from fedrep.models import DomainCNN
from fedrep.protocol import ActionResult
from fedrep.results import RunDir

KD3A_CONFIG = {"strategy": "kd3a", "dataset": "fmnist-domains", "model": "cnn-bn", "num-clients": 5,
               "batch-size": 16}


def _data(n: int, seed: int, labels: torch.Tensor | None = None) -> ClientData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen)
    y = labels if labels is not None else torch.randint(0, 10, (n,), generator=gen)
    return ClientData(x, y, x[: n // 2], torch.randint(0, 10, (n // 2,), generator=gen))


def _adapt(rule: KD3ARule, target_labels: torch.Tensor, shift: float = 0.0) -> ActionResult:
    torch.manual_seed(0)
    model = DomainCNN(width=8)
    sources = {}
    for pid in (1, 2, 3):
        teacher = DomainCNN(width=8)
        rule.train_source(teacher, _data(48, pid), torch.Generator().manual_seed(pid))
        sources[f"source-{pid}"] = teacher.state_dict()
    target = _data(64, 9, target_labels)
    target = ClientData(target.x_train + shift, target.y_train, target.x_test, target.y_test)
    return rule.adapt_target(model, target, sources, gate=0.12, source_weights=torch.full((3,), 1 / 3),
                             generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("batchnorm", ["aggregate", "mmd-loss"])
def test_target_adaptation_never_reads_target_labels(batchnorm: str):
    rule = KD3ARule(parse_run_config(KD3A_CONFIG), KD3AOptions(batchnorm=batchnorm))
    withheld = torch.full((64,), WITHHELD_LABEL)
    result = _adapt(rule, withheld)
    arrays, metrics = result.arrays, result.metrics
    leaked = _adapt(rule, torch.randint(0, 10, (64,)))  # real-looking labels instead
    assert all(torch.equal(arrays[k], leaked.arrays[k]) for k in arrays) and metrics == leaked.metrics
    for name, stats in result.extra.items():
        assert all(torch.equal(v, leaked.extra[name][k]) for k, v in stats.items())
    assert 0.0 < metrics["passed-fraction"] <= 1.0 and metrics["train-loss"] < 10
    assert {f"focus-{p}" for p in (1, 2, 3)} <= set(metrics)
    assert sum(metrics[f"focus-{p}"] for p in (1, 2, 3)) > 0  # confident votes carry quality
    assert set(arrays) == set(DomainCNN().representation_keys())  # the classifier stays home


def test_teachers_vote_with_the_target_batch_statistics_as_the_official_code():
    """Official ``train.py`` leaves every model in train mode while voting: a source normalises a
    target batch with that batch's own BN statistics. A constant brightness shift of the target
    then cannot change any vote (a valid conv of a constant is a per-channel constant, which the
    next BN subtracts); with the sources' running statistics it does."""
    official = KD3ARule(parse_run_config(KD3A_CONFIG), KD3AOptions(lr_schedule="constant"))
    plain, shifted = _adapt(official, torch.full((64,), WITHHELD_LABEL)), \
        _adapt(official, torch.full((64,), WITHHELD_LABEL), shift=3.0)
    for key in ("passed-fraction", "focus-1", "focus-2", "focus-3"):
        assert shifted.metrics[key] == pytest.approx(plain.metrics[key], rel=1e-4, abs=1e-6)
    running = KD3ARule(parse_run_config(KD3A_CONFIG), KD3AOptions(teacher_batchnorm="running",
                                                                          lr_schedule="constant"))
    assert _adapt(running, torch.full((64,), WITHHELD_LABEL), shift=3.0).metrics["passed-fraction"] != \
        pytest.approx(_adapt(running, torch.full((64,), WITHHELD_LABEL)).metrics["passed-fraction"], rel=1e-3)
    # The teachers' statistics, gathered on the target's batches, go back for aggregation.
    assert set(plain.extra) == {"source-1-bn", "source-2-bn", "source-3-bn"}
    first = plain.extra["source-1-bn"]
    assert set(first) == {k for k in DomainCNN().state_dict() if k.startswith("body.")
                          and k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")}
    assert not torch.equal(first["body.1.running_mean"], shifted.extra["source-1-bn"]["body.1.running_mean"])
    assert not _adapt(running, torch.full((64,), WITHHELD_LABEL)).extra  # nothing gathered to return
    local = KD3ARule(parse_run_config(KD3A_CONFIG), KD3AOptions(batchnorm="local"))
    assert not _adapt(local, torch.full((64,), WITHHELD_LABEL)).extra  # BN statistics stay home


def test_batchnorm_local_keeps_statistics_home_and_source_only_shares_all():
    model = DomainCNN()
    local = KD3ARule(parse_run_config(KD3A_CONFIG), KD3AOptions(batchnorm="local"))
    assert not any("running_" in k or "num_batches" in k for k in local.shared_keys(model))
    assert any("running_mean" in k for k in local.personal_keys(model))
    source_only = KD3ARule(parse_run_config(KD3A_CONFIG), KD3AOptions(mode="source-only"))
    assert source_only.shared_keys(model) == list(model.state_dict())


def test_round_length_follows_communication_rounds_per_epoch():
    assert local_batches(1000, 50, 1.0) == 20
    assert local_batches(1000, 50, 0.2) == 100  # one aggregation every 5 epochs
    assert local_batches(1000, 50, 4.0) == 5
    assert local_batches(10, 50, 8.0) == 1


def test_multi_domain_config_names_the_fix():
    with pytest.raises(ConfigError, match="set num-clients=6"):
        parse_run_config({**KD3A_CONFIG, "irrelevant-source": True})
    with pytest.raises(ConfigError, match="malicious-domain 'mnistm-style' is not a source"):
        parse_run_config({**KD3A_CONFIG, "malicious-domain": "mnistm-style", "poison-fraction": 0.5})
    with pytest.raises(ConfigError, match="strategy-options.batchnorm"):
        parse_run_config({**KD3A_CONFIG, "strategy-options": '{batchnorm = "sometimes"}'})
    cfg = parse_run_config({**KD3A_CONFIG, "num-clients": 3, "target-domain": "rotated",
                            "source-domains": "original, inverted"})
    assert cfg.domain_layout() == ["rotated", "original", "inverted"]
    with pytest.raises(ConfigError, match="name\\*k with a whole k"):
        parse_run_config({**KD3A_CONFIG, "source-domains": "original*two"})
    with pytest.raises(ConfigError, match="target 'rotated' is also listed as a source"):
        parse_run_config({**KD3A_CONFIG, "num-clients": 3, "target-domain": "rotated",
                          "source-domains": "original, rotated"})


def test_several_nodes_share_a_domain_and_split_its_data():
    cfg = parse_run_config({**KD3A_CONFIG, "target-domain": "rotated", "source-domains": "original*3",
                            "num-clients": 4, "max-train-per-client": 40, "max-test-per-client": 20})
    assert cfg.domain_layout() == ["rotated", "original", "original", "original"]
    assert cfg.party_names() == ["rotated", "original-1", "original-2", "original-3"]
    shards = [load_client_data(cfg, p) for p in (1, 2, 3)]
    assert [d.num_train for d in shards] == [40, 40, 40] and [d.num_test for d in shards] == [20, 20, 20]
    rows = torch.cat([d.x_train.flatten(1) for d in shards])
    assert torch.unique(rows, dim=0).shape[0] == 120  # disjoint: no image on two nodes


def test_a_node_whose_declared_role_contradicts_its_partition_is_stopped():
    rule = KD3ARule(parse_run_config(KD3A_CONFIG), KD3AOptions())
    with pytest.raises(RuntimeError, match="role='target', but partition 2 is a source"):
        rule.act("kd3a_source", DomainCNN(width=8), _data(8, 1), 2, {}, {"node-role": "target"},
                 torch.Generator())


@pytest.mark.e2e
def test_kd3a_runs_on_flower_with_its_own_message_types(tmp_path: Path):
    run_dir = tmp_path / "kd3a"
    fedrep_cli("run", "--strategy", "kd3a", "--dataset", "fmnist-domains", "--model", "cnn-bn",
               "--num-clients", "4", "--rounds", "2", "--set", "target-domain=rotated",
               "--set", "source-domains=original*2,lowres-noise",  # two nodes share 'original'
               "--set", "max-train-per-client=64", "--set", "max-test-per-client=32",
               "--set", "batch-size=16", "--set", "fraction-train=1.0",
               "--set", f"run-dir={run_dir}", timeout=400)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    last = rows[-1]
    weights = [last[f"weight-{d}"] for d in ("rotated", "original-1", "original-2", "lowres-noise")]
    assert sum(weights) == pytest.approx(1.0, abs=1e-6) and min(weights) >= 0
    assert 0 <= last["passed-fraction"] <= 1 and 0 <= last["target-accuracy"] <= 1
    assert {"accuracy-original-1", "accuracy-original-2", "accuracy-lowres-noise"} <= set(last)
    assert last["bytes-to-target"] > 3 * last["bytes-to-each-source"]  # every source model, one message
    audit = [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]
    kinds = {(r["kind"], r.get("partition")) for r in audit}
    assert ("train.kd3a_target", 0) in kinds and ("train.kd3a_source", 1) in kinds
    assert ("train.kd3a_source", 0) not in kinds  # the unlabelled target never trains as a source
    state = json.loads((run_dir / "state.json").read_text())
    assert len(state["strategy-state"]["domain-weights"]) == 4  # resumable moving average

    # The in-process loop (what the robustness tests drive) is the same arithmetic: same global
    # extractor after two rounds, same domain weights.
    run = RunDir(run_dir)
    cfg = run.saved_config()
    local = run_kd3a(cfg, KD3AOptions(), rounds=2)
    flower = run.load_checkpoint(2)
    assert set(flower) == set(local.shared)
    for key, value in local.shared.items():
        assert np.allclose(flower[key], value.numpy(), rtol=1e-5, atol=1e-6), key
    assert local.weights is not None
    assert state["strategy-state"]["domain-weights"] == pytest.approx(local.weights.tolist(), abs=1e-6)
