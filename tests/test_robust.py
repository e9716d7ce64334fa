"""Robust aggregation of the body (Flower's aggregators) and the simulated attacks it is tested
against: the math against hand-worked or independent computations, the settings refused at
start, and real Flower simulations where sign-flipping attackers wreck plain averaging and the
median keeps the honest clients near the clean run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import fedrep_cli
from fedrep.algorithms.attacks import attackers, flip_labels, poison_update
from fedrep.config import ConfigError, parse_run_config
from server.robust import robust_aggregate


def test_attackers_are_a_seeded_share_every_process_agrees_on():
    chosen = attackers(10, 0.3, seed=1)
    assert len(chosen) == 3 and chosen == attackers(10, 0.3, seed=1) and chosen != attackers(10, 0.3, seed=2)
    assert attackers(10, 0.0, seed=1) == frozenset() and len(attackers(10, 0.01, seed=1)) == 1


def test_label_flip_and_model_poisoning_by_hand():
    assert flip_labels(torch.tensor([0, 3, 9]), 10).tolist() == [9, 6, 0]
    sent = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    trained = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(7)}
    # update = [1, -2]; sign-flip x2 sends sent - 2 * update, scale x2 sends sent + 2 * update
    assert poison_update(sent, trained, "sign-flip", 2.0)["w"].tolist() == [-1.0, 6.0]
    assert poison_update(sent, trained, "scale", 2.0)["w"].tolist() == [3.0, -2.0]
    assert poison_update(sent, trained, "scale", 2.0)["n"].item() == 7  # counters as trained


@pytest.fixture
def in_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """robust_aggregate hands Flower's strategies Flower messages, which carry the identity of the
    task a ServerApp runs as; outside one, give it one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _updates(rng: np.random.Generator, n: int) -> list[tuple[dict[str, np.ndarray], float]]:
    return [({"body.w": rng.normal(size=(3, 4)).astype(np.float32),
              "body.bn.num_batches_tracked": np.array(10 + i, dtype=np.int64)}, float(1 + i))
            for i in range(n)]


def test_median_and_trimmed_mean_against_numpy_and_scipy(in_a_server_app: None):
    updates = _updates(np.random.default_rng(0), 5)
    stacked = np.stack([u["body.w"] for u, _ in updates])
    median = robust_aggregate(parse_run_config({"aggregation": "median"}), 1, updates)
    assert np.allclose(median["body.w"], np.median(stacked, axis=0))
    assert median["body.bn.num_batches_tracked"].dtype == np.int64  # integer buffers stay integers
    assert median["body.bn.num_batches_tracked"] == 12
    trimmed = robust_aggregate(parse_run_config({"aggregation": "trimmed-mean", "trim-fraction": 0.2}), 1,
                               updates)
    assert np.allclose(trimmed["body.w"], stats.trim_mean(stacked, 0.2, axis=0), atol=1e-6)


def test_krum_keeps_an_honest_update_and_multi_krum_averages_the_closest(in_a_server_app: None):
    rng = np.random.default_rng(1)
    honest = [({"body.w": (1.0 + 0.01 * rng.normal(size=4)).astype(np.float32)}, 1.0) for _ in range(5)]
    poisoned = [({"body.w": np.full(4, -50.0, dtype=np.float32)}, 1.0)]
    updates = honest[:2] + poisoned + honest[2:]
    krum = robust_aggregate(parse_run_config({"aggregation": "krum", "byzantine-clients": 1,
                                              "fraction-train": 1.0, "num-clients": 6}), 1, updates)
    assert any(np.array_equal(krum["body.w"], u["body.w"]) for u, _ in honest)
    multi = robust_aggregate(parse_run_config({"aggregation": "multi-krum", "byzantine-clients": 1,
                                               "fraction-train": 1.0, "num-clients": 6}), 1, updates)
    assert np.allclose(multi["body.w"], np.mean([u["body.w"] for u, _ in honest], axis=0), atol=1e-6)


@pytest.mark.parametrize(("settings", "message"), [
    ({"aggregation": "krum", "byzantine-clients": 5}, "Krum needs at least 2 * byzantine-clients + 3 = 13"),
    ({"aggregation": "bulyan", "byzantine-clients": 2, "num-clients": 10, "fraction-train": 1.0},
     "Bulyan needs at least 4 * byzantine-clients + 3 = 11"),
    ({"aggregation": "multi-krum", "byzantine-clients": 2, "krum-select": 9}, "krum-select=9 exceeds"),
    ({"attack-share": 0.2}, "name the attack"),
    ({"strategy": "kd3a", "dataset": "fmnist-domains", "num-clients": 5, "aggregation": "median"},
     "KD3A weights its domains itself"),
])
def test_impossible_settings_are_refused_at_start_naming_the_key(settings: dict, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_run_config(settings)


SIM = ["--num-clients", "6", "--classes-per-client", "2", "--rounds", "4",
       "--set", "max-train-per-client=120", "--set", "max-test-per-client=60",
       "--set", "fraction-train=1.0", "--set", "head-epochs=2", "--set", "body-epochs=1",
       "--set", "lr=0.05", "--set", "attack-scale=6", "--set", "wait-for-clients=60"]


def _honest_accuracy(run_dir: Path, key: str) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(np.mean([r[key] for r in rows[1:]]))  # rounds 2-4: after the first aggregation


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [3, 4])
def test_sign_flipping_attackers_wreck_the_mean_and_the_median_holds(tmp_path: Path, seed: int,
                                                                      fmnist_dir: Path):
    """A third of the clients send their body update sign-flipped and scaled by 6. Plain averaging
    loses more than 0.15 of honest accuracy against the clean run; the median stays within 0.05.
    (Measured: seed 3 clean 0.939, mean 0.632, median 0.957; seed 4 0.773, 0.483, 0.753.)"""
    attack = ["--set", "attack=sign-flip", "--set", "attack-share=0.34"]
    runs = {"clean": [], "mean": attack, "median": [*attack, "--set", "aggregation=median"]}
    for name, extra in runs.items():
        fedrep_cli("run", *SIM, "--seed", str(seed), *extra, "--set", f"run-dir={tmp_path / name}",
                   "--set", f"data-dir={fmnist_dir}")
    clean = _honest_accuracy(tmp_path / "clean", "accuracy-mean")
    attacked = _honest_accuracy(tmp_path / "mean", "accuracy-honest-mean")
    defended = _honest_accuracy(tmp_path / "median", "accuracy-honest-mean")
    assert attacked < clean - 0.15, (clean, attacked)
    assert defended > clean - 0.05, (clean, defended)
    # The attackers' poisoned bodies reached the server (the audit), their heads did not.
    audit = [json.loads(line) for line in (tmp_path / "mean" / "messages.jsonl").read_text().splitlines()]
    assert all(not any(name.startswith("head.") for name in r["arrays"]) for r in audit)


def test_bulyan_stays_with_the_honest_updates(in_a_server_app: None):
    rng = np.random.default_rng(2)
    honest = [({"body.w": (1.0 + 0.01 * rng.normal(size=4)).astype(np.float32)}, 1.0) for _ in range(6)]
    updates = [*honest[:3], ({"body.w": np.full(4, 80.0, dtype=np.float32)}, 1.0), *honest[3:]]
    cfg = parse_run_config({"aggregation": "bulyan", "byzantine-clients": 1, "fraction-train": 1.0,
                            "num-clients": 7})
    bulyan = robust_aggregate(cfg, 1, updates)["body.w"]
    assert np.all(np.abs(bulyan - 1.0) < 0.05)  # the poisoned 80s never get in


@pytest.mark.e2e
def test_a_run_under_attack_with_a_robust_aggregator_resumes_bitwise(tmp_path: Path, fmnist_dir: Path):
    """Label-flipping and sign-flipping are fixed by the seed, and the median by the replies: a run
    stopped after round 2 and resumed to round 3 ends on the bits of a run never stopped."""
    attack = [*SIM, "--seed", "5", "--set", "attack=sign-flip", "--set", "attack-share=0.34",
              "--set", "aggregation=median", "--set", f"data-dir={fmnist_dir}"]
    fedrep_cli("run", *attack, "--rounds", "2", "--set", f"run-dir={tmp_path / 'resumed'}")
    fedrep_cli("run", "--resume", str(tmp_path / "resumed"), "--rounds", "3")
    fedrep_cli("run", *attack, "--rounds", "3", "--set", f"run-dir={tmp_path / 'straight'}")
    for r in (1, 2, 3):
        name = f"checkpoints/round-{r:04d}.pt"
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    resumed = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    straight = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    key = "accuracy-honest-mean"
    assert [json.loads(x)[key] for x in resumed] == [json.loads(x)[key] for x in straight]
