"""The paper's Section 5 linear task: the strongest check of the alternating update.

FedRep must recover the ground-truth representation B* (principal-angle distance < 1e-3) at the
paper's kind of sizes (d=20, k=2, n=100 clients, m=10 samples each, 10% participation), while
FedAvg on the same data, learning one shared head for clients whose heads differ, does not.
"""

from __future__ import annotations

import numpy as np
import pytest
from single_process import run_reference

from fedrep.algorithms.fedavg import FedAvgUpdate
from fedrep.algorithms.fedrep import FedRepUpdate
from fedrep.config import parse_run_config
from fedrep.data.synthetic import (
    client_linear_data,
    ground_truth_representation,
    principal_angle_distance,
)

LINEAR = {
    "dataset": "linear-synthetic", "model": "linear", "num-clients": 100, "fraction-train": 0.1,
    "linear-dim": 20, "linear-rank": 2, "linear-samples": 10, "linear-noise": 1e-3,
    "head-epochs": 10, "body-epochs": 1, "local-epochs": 1, "lr": 0.1, "momentum": 0.0,
    "weight-decay": 0.0, "batch-size": 10, "seed": 1,
}


def _distances(strategy_rule, rounds: int) -> list[float]:
    cfg = parse_run_config({**LINEAR, "num-rounds": rounds})
    b_star = ground_truth_representation(20, 2, cfg.seed)

    def distance(_round, model, _run):
        return {"dist": principal_angle_distance(model.representation_matrix(), b_star)}

    run = run_reference(cfg, strategy_rule(cfg), on_round=distance)
    return [h["dist"] for h in run.history]


def test_principal_angle_distance_by_hand():
    b = np.eye(3)[:, :1]  # span(e1)
    assert principal_angle_distance(b, b) == pytest.approx(0.0, abs=1e-12)
    assert principal_angle_distance(np.eye(3)[:, 1:2], b) == pytest.approx(1.0)
    theta = 0.3  # rotate e1 by theta in the (e1, e2) plane: distance = sin(theta)
    rotated = np.array([[np.cos(theta)], [np.sin(theta)], [0.0]])
    assert principal_angle_distance(rotated * 5.0, b) == pytest.approx(np.sin(theta))


def test_linear_data_follows_the_model():
    x, y, _, _ = client_linear_data(3, 20, 2, 500, 10, 0.0, seed=1)
    b_star = ground_truth_representation(20, 2, 1)
    coef, *_ = np.linalg.lstsq(x.numpy() @ b_star, y.numpy(), rcond=None)
    np.testing.assert_allclose(x.numpy() @ b_star @ coef, y.numpy(), atol=1e-4)


def test_fedrep_recovers_representation_fedavg_does_not():
    fedrep = _distances(FedRepUpdate, rounds=150)
    fedavg = _distances(FedAvgUpdate, rounds=150)
    assert fedrep[0] > 0.5, "the start must be far from B* for the test to mean anything"
    assert min(fedrep[-10:]) < 1e-3, f"FedRep ended at distance {fedrep[-1]:.2e}"
    assert max(fedrep[-10:]) < 2e-3, "FedRep must stay at B*, not touch it once"
    assert min(fedavg) > 0.5, f"FedAvg reached {min(fedavg):.2e}; it should not recover B*"
