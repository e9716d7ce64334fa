"""The algorithm math, without Flower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrep.algorithms.aggregate import summarize, weighted_average
from fedrep.algorithms.fedavg import FedAvgUpdate
from fedrep.algorithms.fedrep import FedRepUpdate
from fedrep.algorithms.sampling import num_sampled, sample_clients
from fedrep.algorithms.training import round_generator
from fedrep.config import parse_run_config
from fedrep.data.federated import ClientData
from fedrep.models import PaperCNN, PaperMLP, build_model


def _toy_data(n: int = 40) -> ClientData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ClientData(x, y, x[:10], y[:10])


def _deltas(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, float]:
    return {k: float((v - before[k]).abs().max()) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_head_phase_touches_only_head_and_body_phase_only_body(model_name: str):
    base = {"model": model_name, "batch-size": 8, "weight-decay": 1e-4, "momentum": 0.5}
    data = _toy_data()

    head_only = parse_run_config({**base, "head-epochs": 2, "body-epochs": 0})
    model = build_model(head_only)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FedRepUpdate(head_only).fit(model, data, round_generator(1, 1, 0))
    d = _deltas(before, model)
    assert all(d[k] == 0 for k in model.representation_keys()), "body moved in head epochs"
    assert all(d[k] > 0 for k in model.head_keys()), "head did not move"

    body_only = parse_run_config({**base, "head-epochs": 0, "body-epochs": 2})
    model = build_model(body_only)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FedRepUpdate(body_only).fit(model, data, round_generator(1, 1, 0))
    d = _deltas(before, model)
    assert all(d[k] == 0 for k in model.head_keys()), "head moved in body epochs"
    assert all(d[k] > 0 for k in model.representation_keys()), "some body parameter did not move"


def test_fedrep_head_then_body_equals_two_separate_phases():
    """Alternation order: tau_h head epochs *then* tau_b body epochs, on the new head."""
    cfg = parse_run_config({"model": "mlp", "head-epochs": 1, "body-epochs": 1, "momentum": 0.0,
                            "weight-decay": 0.0, "batch-size": 40})
    data = _toy_data()
    joint = build_model(cfg)
    FedRepUpdate(cfg).fit(joint, data, round_generator(1, 1, 0))
    # By hand: one full-batch GD step on the head, then one on the body with the new head.
    manual = build_model(cfg)
    for part in (manual.head, manual.body):
        loss = torch.nn.functional.cross_entropy(manual(data.x_train), data.y_train)
        grads = torch.autograd.grad(loss, list(part.parameters()))
        with torch.no_grad():
            for p, g in zip(part.parameters(), grads, strict=True):
                p -= cfg.lr * g
    for k, v in joint.state_dict().items():
        torch.testing.assert_close(v, manual.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_shared_keys_fedrep_vs_fedavg():
    cfg = parse_run_config({"model": "cnn"})
    model = build_model(cfg)
    rep = FedRepUpdate(cfg)
    assert rep.shared_keys(model) == [k for k in model.state_dict() if k.startswith("body.")]
    assert rep.personal_keys(model) == ["head.weight", "head.bias"]
    assert FedAvgUpdate(cfg).personal_keys(model) == []


def test_models_declare_paper_splits():
    cnn = PaperCNN(image_size=28)
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert PaperCNN(in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert cnn.head_keys() == ["head.weight", "head.bias"] and cnn.head.in_features == 64
    # official w_glob_keys for CIFAR: conv1, conv2, fc1, fc2 (8 tensors) are the representation
    assert len(cnn.representation_keys()) == 8
    mlp = PaperMLP()
    assert len(mlp.representation_keys()) == 6 and mlp.head.in_features == 64
    assert cnn.body_is_deterministic() and mlp.body_is_deterministic()


def test_weighted_average_matches_hand_computation():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": np.array([[4.0]], np.float32)}
    out = weighted_average([(a, 100), (b, 300)])
    # (100*[1,2] + 300*[3,6]) / 400 = [2.5, 5.0];  (0*100 + 4*300)/400 = 3
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    np.testing.assert_allclose(out["b"], [[3.0]])
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match="disagree on keys"):
        weighted_average([(a, 1), ({"w": a["w"]}, 1)])


@pytest.mark.parametrize("threads", [1, 3])
def test_weighted_average_blocks_give_the_plain_sum_bit_for_bit(threads, monkeypatch):
    """The blocked loop does per element what acc += float64(x_i) * w_i over i, then acc / total,
    does, in the same order: equal bits, across a block boundary, for floats and a rounded integer
    count; also with the blocks split over threads (as large sums are)."""
    from fedrep.algorithms import aggregate
    from fedrep.algorithms.aggregate import AVERAGE_BLOCK

    if threads > 1:
        monkeypatch.setattr(aggregate, "PARALLEL_MIN_ELEMENTS", 0)
        monkeypatch.setattr(aggregate, "_threads", lambda: threads)
        assert len(aggregate._thread_chunks(3, 10)) == 3

    rng = np.random.default_rng(3)
    shapes = {"conv": (6, 1, 5, 5), "big": (AVERAGE_BLOCK * 2 + 17,), "count": ()}
    updates = [({k: (rng.standard_normal(s).astype(np.float32) if k != "count" else np.array(rng.integers(9)))
                 for k, s in shapes.items()}, float(rng.integers(1, 600))) for _ in range(25)]
    total = sum(w for _, w in updates)
    out = weighted_average(updates)
    for key in shapes:
        acc = np.zeros(shapes[key], np.float64)
        for arrays, weight in updates:
            acc += np.asarray(arrays[key], dtype=np.float64) * weight
        acc /= total
        expected = (np.rint(acc) if key == "count" else acc).astype(updates[0][0][key].dtype)
        assert out[key].dtype == expected.dtype and out[key].shape == expected.shape
        assert expected.tobytes() == out[key].tobytes(), key


def test_grouped_average_adds_the_groups_partial_sums_in_order_bit_for_bit():
    """With groups, each group's float64 sum starts from zero and the sums are added in order, then
    divided by the total weight: checked against that loop written out, and a worker's
    weighted_sum of a group is the very partial the server would make (same bits)."""
    from fedrep.algorithms.aggregate import SUM_GROUP, average_of_sums, sum_groups, weighted_sum

    rng = np.random.default_rng(11)
    n = 2 * SUM_GROUP + 5
    updates = [({"w": rng.standard_normal((7, 3)).astype(np.float32)}, float(rng.integers(1, 99)))
               for _ in range(n)]
    groups = sum_groups(range(n))
    assert groups[:SUM_GROUP] == [0] * SUM_GROUP and groups[-1] == 2 and groups.count(2) == 5
    total = np.zeros((7, 3))
    for group in (0, 1, 2):
        partial = np.zeros((7, 3))
        for (arrays, weight), g in zip(updates, groups, strict=True):
            if g == group:
                partial += arrays["w"].astype(np.float64) * weight
        total += partial
    expected = (total / sum(w for _, w in updates)).astype(np.float32)
    out = weighted_average(updates, groups)
    assert out["w"].tobytes() == expected.tobytes()
    # the same from partial sums made elsewhere (a simulation worker's presum)
    sums = [weighted_sum(updates[i:i + SUM_GROUP]) for i in range(0, n, SUM_GROUP)]
    again = average_of_sums(sums, float(sum(w for _, w in updates)), {"w": np.dtype(np.float32)})
    assert again["w"].tobytes() == out["w"].tobytes()
    # grouping is arithmetic, not a new mean: the ungrouped result is within float64 rounding
    np.testing.assert_allclose(weighted_average(updates)["w"], out["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="non-decreasing"):
        weighted_average(updates[:2], [1, 0])


def test_summarize_is_unweighted_mean_of_local_accuracies():
    stats = summarize([0.5, 1.0, 0.9], weights=[10, 10, 80])
    assert stats["mean"] == pytest.approx(0.8)
    assert stats["weighted-mean"] == pytest.approx((5 + 10 + 72) / 100)
    assert stats["min"] == 0.5 and stats["max"] == 1.0


def test_sampling_deterministic_fraction_and_population():
    assert num_sampled(100, 0.1) == 10 and num_sampled(5, 0.1) == 1 and num_sampled(3, 1.0) == 3
    a = sample_clients(1, 4, range(100), 0.1)
    assert a == sample_clients(1, 4, reversed(range(100)), 0.1)  # order of discovery irrelevant
    assert len(a) == 10 and len(set(a)) == 10
    assert a != sample_clients(1, 5, range(100), 0.1)
    assert a != sample_clients(2, 4, range(100), 0.1)


@pytest.mark.parametrize("model_name", ["cnn", "mlp"])
def test_head_feature_cache_equals_plain_loop(model_name: str):
    """Head epochs on cached body features give the plain loop's parameters."""
    data = _toy_data(60)
    states = []
    for cache in (True, False):
        cfg = parse_run_config({"model": model_name, "head-epochs": 3, "body-epochs": 1,
                                "batch-size": 7, "cache-head-features": cache})
        model = build_model(cfg)
        FedRepUpdate(cfg).fit(model, data, round_generator(2, 3, 4))
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-6, atol=1e-7)


def test_head_feature_cache_not_used_when_body_is_stochastic():
    from fedrep.algorithms import training
    from fedrep.models.base import SplitModel

    model = SplitModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5),
                                           torch.nn.Linear(784, 8)), torch.nn.Linear(8, 10))
    assert not model.body_is_deterministic()
    calls = []
    original = training.body_features
    training.body_features = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        cfg = parse_run_config({"model": "mlp", "head-epochs": 2, "body-epochs": 0})
        FedRepUpdate(cfg).fit(model, _toy_data(20), round_generator(1, 1, 0))
        assert calls == []
        FedRepUpdate(cfg).fit(build_model(cfg), _toy_data(20), round_generator(1, 1, 0))
        assert calls == [1]
    finally:
        training.body_features = original


def test_shuffled_batches_drop_only_a_trailing_batch_too_small_for_batchnorm():
    from fedrep.algorithms.training import shuffled_batches

    def batches(n: int, min_size: int) -> list[list[int]]:
        return [b.tolist() for b in shuffled_batches(n, 10, torch.Generator().manual_seed(3), min_size)]

    plain, bn = batches(21, 1), batches(21, 2)
    assert [len(b) for b in plain] == [10, 10, 1] and sorted(sum(plain, [])) == list(range(21))
    assert bn == plain[:2]  # same order, the lone sample left out of this pass
    assert batches(20, 2) == batches(20, 1)
    assert batches(1, 2) == [[0]]  # nothing else to train on: BatchNorm's own error will say why


def test_batchnorm_model_trains_when_a_client_has_one_sample_past_a_full_batch():
    """21 samples in batches of 10 leaves one: a BatchNorm body cannot train on it."""
    from fedrep.algorithms.training import min_batch_size
    from fedrep.models.domain_cnn import DomainCNN

    g = torch.Generator().manual_seed(0)
    x = torch.randn(21, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (21,), generator=g)
    cfg = parse_run_config({"dataset": "fmnist-domains", "model": "cnn-bn", "num-clients": 5,
                            "head-epochs": 2, "body-epochs": 1, "batch-size": 10})
    model = DomainCNN(width=4)
    assert min_batch_size(model) == 2 and min_batch_size(PaperCNN()) == 1
    result = FedRepUpdate(cfg).fit(model, ClientData(x, y, x[:5], y[:5]), round_generator(0, 1, 0))
    assert result.steps == 3 * 2 and np.isfinite(result.loss)
