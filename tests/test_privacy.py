"""Differential privacy of the shared part: clipping and noise against hand-worked values and
Flower's own helpers, adaptive clipping against Andrew et al.'s formulas, the accountant against
dp-accounting called directly, the settings refused at start, and real Flower simulations:
clipping on the client equals clipping on the server bit for bit, only clipped (or noised) bodies
reach the server (the audit), and a run stopped by its privacy budget resumes bitwise."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from conftest import fedrep_cli
from fedrep.algorithms.privacy import (
    clip_update,
    local_release,
    next_clip_norm,
    noise_generator,
    noised_mean,
    update_noise_multiplier,
    update_norm,
)
from fedrep.config import ConfigError, parse_run_config
from server.privacy import PrivacyBudgetReached, PrivacyLedger


def test_clipping_by_hand_and_against_flower():
    sent = {"w": np.array([1.0, 1.0], dtype=np.float32), "n": np.array(4, dtype=np.int64)}
    trained = {"w": np.array([4.0, 5.0], dtype=np.float32), "n": np.array(9, dtype=np.int64)}
    # update [3, 4] has norm 5; clipped to 1 it is [0.6, 0.8]; the batch counter is not released
    clipped = clip_update(sent, trained, 1.0)
    assert clipped.norm == 5.0 and not clipped.unclipped(1.0)
    assert np.allclose(clipped.arrays["w"], [1.6, 1.8]) and clipped.arrays["w"].dtype == np.float32
    assert clipped.arrays["n"] == 4
    assert np.array_equal(clip_update(sent, trained, 10.0).arrays["w"], trained["w"])  # within C: as is

    from flwr.supercore.differential_privacy import compute_clip_model_update

    rng = np.random.default_rng(0)
    sent = {f"a{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate([(3, 4), (5,), (2, 2, 2)])}
    trained = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in sent.items()}
    flower = [v.copy() for v in trained.values()]
    compute_clip_model_update(flower, list(sent.values()), 0.7)
    ours = clip_update(sent, trained, 0.7).arrays
    for key, theirs in zip(sent, flower, strict=True):
        assert np.allclose(ours[key], theirs, atol=1e-6)
    assert math.isclose(update_norm(sent, ours), 0.7, rel_tol=1e-5)


def test_central_noise_is_z_c_over_k_on_the_mean_drawn_from_the_named_stream():
    sent = {"w": np.zeros(200_000, dtype=np.float32)}
    ups = [clip_update(sent, {"w": np.full(200_000, v, dtype=np.float32)}, 1e9) for v in (1.0, 2.0, 6.0)]
    out = noised_mean(sent, ups, 0.5, 3.0, noise_generator(7, "seeded", 4, 0))
    # mean 3, noise std z C / k = 0.5 * 3 / 3 = 0.5; the same stream gives the same draws
    expected = 3.0 + np.random.default_rng([7, 0xD1FF, 4, 0]).normal(0, 0.5, 200_000).astype(np.float32)
    assert np.array_equal(out["w"], expected.astype(np.float32))
    assert abs(float(np.std(out["w"] - 3.0)) - 0.5) < 0.005
    again = noised_mean(sent, ups, 0.5, 3.0, noise_generator(7, "seeded", 4, 0))["w"]
    other_round = noised_mean(sent, ups, 0.5, 3.0, noise_generator(7, "seeded", 5, 0))["w"]
    assert np.array_equal(out["w"], again) and not np.array_equal(out["w"], other_round)


def test_local_release_is_the_clipped_update_plus_z_c_noise():
    sent = {"w": np.zeros(100_000, dtype=np.float32), "n": np.array(3)}
    trained = {"w": np.full(100_000, 0.01, dtype=np.float32), "n": np.array(8)}  # norm 3.16
    out = local_release(sent, trained, 1.0, 2.0, noise_generator(1, "seeded", 2, 5))
    clipped = clip_update(sent, trained, 1.0).arrays["w"]
    noise = np.random.default_rng([1, 0xD1FF, 2, 5]).normal(0, 2.0, 100_000).astype(np.float32)
    assert np.array_equal(out["w"], clipped + noise) and out["n"] == 3


def test_adaptive_clipping_follows_andrew_et_al():
    # z_Delta = (z^-2 - (2 sigma_b)^-2)^-1/2, the same as Flower's compute_adaptive_noise_params
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    assert math.isclose(update_noise_multiplier(1.0, 1.0), (1 - 0.25) ** -0.5)
    assert math.isclose(update_noise_multiplier(0.8, 2.5), compute_adaptive_noise_params(0.8, 10, 2.5)[1])
    with pytest.raises(ValueError, match="2 \\* sigma_b > z"):
        update_noise_multiplier(1.0, 0.5)
    # no count noise: 3 of 4 unclipped, gamma 0.5, eta 0.2 -> C exp(-0.2 * 0.25)
    quiet = np.random.default_rng(0)
    c, share = next_clip_norm(2.0, 3, 4, 0.0, 0.2, 0.5, quiet)
    assert share == 0.75 and math.isclose(c, 2.0 * math.exp(-0.05))
    # every update clipped -> C grows; none clipped -> C shrinks (the fixed point is the quantile)
    assert next_clip_norm(1.0, 0, 4, 0.0, 0.2, 0.5, quiet)[0] > 1.0
    assert next_clip_norm(1.0, 4, 4, 0.0, 0.2, 0.5, quiet)[0] < 1.0


def _ledger(**keys) -> PrivacyLedger:
    return PrivacyLedger(parse_run_config({"num-clients": 100, "fraction-train": 0.1, **keys}))


def test_accountant_matches_dp_accounting_for_fixed_size_sampling():
    ledger = _ledger(dp="central", **{"dp-noise-multiplier": 1.2})
    for _ in range(30):
        ledger.account(10, list(range(10)))
    direct = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    # replace-one neighbours move the sum of clipped updates by 2C: the multiplier is z / 2
    direct.compose(dp_event.SampledWithoutReplacementDpEvent(100, 10, dp_event.GaussianDpEvent(0.6)), 30)
    assert math.isclose(ledger.epsilon(), direct.get_epsilon(1e-5), rel_tol=1e-9)

    plain = _ledger(dp="central", **{"dp-noise-multiplier": 1.2, "dp-accountant": "no-amplification"})
    for _ in range(30):
        plain.account(10, list(range(10)))
    direct = RdpAccountant()
    direct.compose(dp_event.GaussianDpEvent(1.2), 30)
    assert math.isclose(plain.epsilon(), direct.get_epsilon(1e-5), rel_tol=1e-9)
    assert plain.epsilon() > ledger.epsilon()  # sampling's amplification is worth something


def test_local_epsilon_is_the_busiest_clients_composition():
    ledger = _ledger(dp="local", **{"dp-noise-multiplier": 3.0})
    ledger.account(10, [1, 2, 3])
    ledger.account(10, [2, 3])
    ledger.account(10, [3])
    direct = RdpAccountant()
    direct.compose(dp_event.GaussianDpEvent(1.5), 3)  # partition 3 released three times
    assert math.isclose(ledger.epsilon(), direct.get_epsilon(1e-5), rel_tol=1e-9)


def test_budget_refuses_the_round_that_would_exceed_it_and_the_state_resumes():
    ledger = _ledger(dp="central", **{"dp-noise-multiplier": 3.0, "dp-epsilon-budget": 2.0,
                                      "dp-adaptive-clip": True, "dp-count-stddev": 2.0})
    sampled = list(range(10))
    rounds = 0
    with pytest.raises(PrivacyBudgetReached, match="above dp-epsilon-budget=2"):
        for server_round in range(1, 1000):
            ledger.check_budget(server_round, sampled)
            updates = [{"w": np.full(4, float(i), dtype=np.float32)} for i in sampled]
            ledger.release(server_round, {"w": np.zeros(4, dtype=np.float32)}, updates)
            ledger.account(10, sampled)
            rounds += 1
    assert rounds > 1 and ledger.epsilon() <= 2.0
    assert ledger.clip_norm != 1.0  # adapted
    twin = _ledger(dp="central", **{"dp-noise-multiplier": 3.0, "dp-epsilon-budget": 2.0,
                                    "dp-adaptive-clip": True, "dp-count-stddev": 2.0})
    twin.load_state_dict(json.loads(json.dumps(ledger.state_dict())))  # as state.json keeps it
    assert twin.epsilon() == ledger.epsilon() and twin.clip_norm == ledger.clip_norm


@pytest.mark.parametrize(("settings", "message"), [
    ({"dp": "central", "aggregation": "median"}, "use dp='local' with a robust aggregator"),
    ({"dp": "local", "dp-adaptive-clip": True}, "dp-adaptive-clip needs dp='central'"),
    ({"dp": "central", "strategy": "local"}, "shares no averaged part"),
    ({"dp": "central", "dataset": "fmnist-domains", "strategy": "kd3a", "num-clients": 5},
     "shares no averaged part"),
    ({"dp": "central", "dp-noise-multiplier": 0, "dp-epsilon-budget": 3}, "epsilon is infinite"),
    ({"dp": "central", "dp-adaptive-clip": True, "num-clients": 20}, "dp-count-stddev=0.1 is too small"),
    ({"dp-clip-norm": 0}, "dp-clip-norm"),
])
def test_settings_without_a_guarantee_are_refused_at_start(settings: dict, message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_run_config(settings)


SIM = ["--num-clients", "6", "--classes-per-client", "2", "--set", "max-train-per-client=120",
       "--set", "max-test-per-client=60", "--set", "fraction-train=0.5", "--set", "head-epochs=2",
       "--set", "body-epochs=1", "--set", "lr=0.05", "--set", "wait-for-clients=60",
       "--set", "dp-clip-norm=0.5", "--set", "dp-noise-multiplier=0.01"]


def _audit(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "messages.jsonl").read_text().splitlines()]


def _same_checkpoints(a: Path, b: Path, rounds: int) -> bool:
    return all((a / "checkpoints" / f"round-{r:04d}.pt").read_bytes()
               == (b / "checkpoints" / f"round-{r:04d}.pt").read_bytes() for r in range(1, rounds + 1))


@pytest.mark.e2e
def test_clipping_on_the_client_equals_clipping_on_the_server_and_only_clipped_bodies_arrive(
        tmp_path: Path, fmnist_dir: Path):
    for where in ("server", "client"):
        fedrep_cli("run", *SIM, "--rounds", "2", "--set", "dp=central", "--set", f"dp-clipping={where}",
                   "--set", f"run-dir={tmp_path / where}", "--set", f"data-dir={fmnist_dir}")
    assert _same_checkpoints(tmp_path / "server", tmp_path / "client", 2)
    trains = [r for r in _audit(tmp_path / "client") if r["kind"] == "train"]
    assert len(trains) == 6 and all(r["update-norm"] <= 0.5 * (1 + 1e-5) for r in trains)
    assert all(not any(n.startswith("head.") for n in r["arrays"]) for r in _audit(tmp_path / "client"))
    raw = [r["update-norm"] for r in _audit(tmp_path / "server") if r["kind"] == "train"]
    assert max(raw) > 0.5  # clipping on the server: the raw updates reached it (and were clipped there)
    rows = [json.loads(line) for line in (tmp_path / "client" / "metrics.jsonl").read_text().splitlines()]
    assert 0 < rows[0]["dp-epsilon"] < rows[1]["dp-epsilon"] and rows[1]["dp-delta"] == 1e-5


@pytest.mark.e2e
def test_local_dp_stopped_by_its_budget_resumes_bitwise(tmp_path: Path, fmnist_dir: Path):
    """Local DP with a budget a client's second release would break: the run stops, saved;
    resumed without a budget it ends on the same bits as a run never stopped. Every body that
    reached the server carries the clients' noise (its distance from what was sent is the noise's)."""
    local = [*SIM, "--rounds", "4", "--set", "dp=local", "--set", "dp-noise-multiplier=0.02",
             "--set", f"data-dir={fmnist_dir}"]
    ledger = PrivacyLedger(parse_run_config({"num-clients": 6, "fraction-train": 0.5, "dp": "local",
                                             "dp-noise-multiplier": 0.02}))
    ledger.account(3, [0])  # the budget: between one and two releases of one client, so the run
    one = ledger.epsilon()  # stops before round 2 or 3 (by then some client has released once)
    ledger.account(3, [0])
    budget = (one + ledger.epsilon()) / 2
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    out = fedrep_cli("run", *local, "--set", f"dp-epsilon-budget={budget}", "--set", f"run-dir={stopped}")
    assert "privacy budget: round" in out.stderr
    state = json.loads((stopped / "state.json").read_text())
    assert state["status"] == "stopped" and 1 <= state["last-completed-round"] <= 2
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dp-epsilon"] <= budget for r in rows)
    fedrep_cli("run", "--resume", str(stopped), "--set", "dp-epsilon-budget=0")  # 0: no budget
    fedrep_cli("run", *local, "--set", f"run-dir={straight}")
    assert json.loads((stopped / "state.json").read_text())["status"] == "completed"
    assert _same_checkpoints(stopped, straight, 4)
    trains = [r for r in _audit(straight) if r["kind"] == "train"]
    d = sum(np.prod(s) for s in _body_shapes(straight))
    noise = 0.02 * 0.5 * math.sqrt(d)  # z C per value over d values (the update itself is <= 0.5)
    assert trains and all(abs(r["update-norm"] / noise - 1) < 0.02 for r in trains)


def _body_shapes(run_dir: Path) -> list[tuple[int, ...]]:
    import torch

    state = torch.load(run_dir / "checkpoints" / "round-0001.pt", weights_only=True)
    return [tuple(v.shape) for v in state.values() if v.is_floating_point()]
