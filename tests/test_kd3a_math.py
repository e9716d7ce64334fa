"""KD3A's math (fedrep.algorithms.kd3a), each piece against a hand-worked or brute-force computation
written independently of the implementation. Official code: github.com/FengHZ/KD3A."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from fedrep.algorithms.kd3a import (
    BNStats,
    aggregate_state_dicts,
    bn_mmd_loss,
    bn_statistics_from_state,
    collect_bn_inputs,
    confidence_gate,
    consensus_focus_exact,
    consensus_focus_leave_one_out,
    consensus_focus_monte_carlo,
    consensus_focus_official,
    consensus_quality,
    domain_weights,
    initial_domain_weights,
    knowledge_vote,
    mixup,
    moving_average_weights,
    subset_qualities,
    target_distillation_loss,
    training_schedule,
    weighted_bn_statistics,
)

# ---------------------------------------------------------------------------------------------------
# Shared fixtures
# ---------------------------------------------------------------------------------------------------

# 3 sources x 4 target samples x 3 classes, gate 0.9 (float64 so 0.9 is exactly the gate).
HAND_PROBS = torch.tensor(
    [
        # source 0
        [[0.95, 0.03, 0.02], [0.60, 0.30, 0.10], [0.10, 0.10, 0.80], [0.05, 0.05, 0.90]],
        # source 1
        [[0.92, 0.05, 0.03], [0.20, 0.70, 0.10], [0.02, 0.97, 0.01], [0.85, 0.10, 0.05]],
        # source 2
        [[0.05, 0.93, 0.02], [0.50, 0.40, 0.10], [0.30, 0.30, 0.40], [0.01, 0.01, 0.98]],
    ],
    dtype=torch.float64,
)
HAND_GATE = 0.9


def _random_probs(
    seed: int, sources: int, samples: int, classes: int, sharpness: float = 3.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = sharpness * torch.randn(sources, samples, classes, generator=g, dtype=torch.float64)
    return torch.softmax(logits, dim=2)


def _vote_quality(probs: torch.Tensor, gate: float, subset: tuple[int, ...]) -> float:
    """Q(subset) through the vote itself: sum of confidence * weight (official domain_contribution)."""
    if not subset:
        return 0.0
    vote = knowledge_vote(probs[list(subset)], gate)
    return float((vote.confidence * vote.weight).sum())


def _brute_force_shapley(probs: torch.Tensor, gate: float) -> list[float]:
    """Average marginal gain over all S! orders, as the official calculate_consensus_focus does."""
    num_sources = probs.shape[0]
    cache: dict[frozenset[int], float] = {}

    def q(members: frozenset[int]) -> float:
        if members not in cache:
            cache[members] = _vote_quality(probs, gate, tuple(sorted(members)))
        return cache[members]

    phi = [0.0] * num_sources
    orders = list(itertools.permutations(range(num_sources)))
    for order in orders:
        for position, k in enumerate(order):
            phi[k] += (q(frozenset(order[: position + 1])) - q(frozenset(order[:position]))) / len(orders)
    return phi


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


def test_gate_rises_linearly_and_official_epochs_never_reach_the_end_value():
    assert confidence_gate(0, 100) == pytest.approx(0.9)
    assert confidence_gate(50, 100) == pytest.approx(0.925)
    # The official loop runs epoch 0..T-1: the last gate is begin + (end - begin) * (T - 1) / T.
    assert confidence_gate(99, 100) == pytest.approx(0.9 + 0.05 * 0.99)
    assert confidence_gate(99, 100) < 0.95
    assert confidence_gate(100, 100) == pytest.approx(0.95)
    # DomainNet config: 0.8 -> 0.95 over 80 epochs.
    assert confidence_gate(40, 80, 0.8, 0.95) == pytest.approx(0.875)
    gates = [confidence_gate(e, 10) for e in range(11)]
    assert gates == sorted(gates)
    with pytest.raises(ValueError, match="outside"):
        confidence_gate(101, 100)
    with pytest.raises(ValueError, match="outside"):
        confidence_gate(-1, 100)


def test_training_schedule_matches_official_decentralized_training_strategy():
    # DigitFive config: 25000 samples per epoch, batch 128, 100 epochs.
    assert training_schedule(1, 25000, 128, 100) == (195, 100)
    assert training_schedule(2, 25000, 128, 100) == (98, 200)  # round(12500 / 128) = round(97.66)
    assert training_schedule(0.5, 25000, 128, 100) == (195, 50)
    assert training_schedule(0.2, 25000, 128, 100) == (195, 20)
    assert training_schedule(1, 30000, 50, 80) == (600, 80)  # DomainNet
    with pytest.raises(ValueError, match="not supported"):
        training_schedule(0.3, 25000, 128, 100)


# ---------------------------------------------------------------------------------------------------
# Knowledge vote
# ---------------------------------------------------------------------------------------------------


def test_knowledge_vote_on_hand_worked_example():
    vote = knowledge_vote(HAND_PROBS, HAND_GATE)
    # Sample 0: sources 0 and 1 confident for class 0 (0.95 + 0.92) outvote source 2 (0.93, class 1).
    # Sample 1: nobody passes 0.9: all vote unmasked (class 0: 0.6 + 0.5, class 1: 0.7) but weight 0.
    # Sample 2: only source 1 (0.97, class 1) is confident.
    # Sample 3: source 0's 0.90 is not > 0.90; only source 2 (0.98, class 2) votes.
    assert vote.label.tolist() == [0, 0, 1, 2]
    assert vote.confidence.tolist() == pytest.approx([1.87, 1.10, 0.97, 0.98])
    assert vote.weight.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert vote.num_supporting.tolist() == [2, 0, 1, 1]
    assert vote.passed_fraction == pytest.approx(0.75)
    expected = torch.zeros(4, 3, dtype=torch.float64)
    expected[torch.arange(4), torch.tensor([0, 0, 1, 2])] = 1.0
    assert torch.equal(vote.consensus, expected)  # official: one-hot consensus knowledge


def test_soft_consensus_is_the_mean_of_the_supporting_predictions():
    vote = knowledge_vote(HAND_PROBS, HAND_GATE, soft=True)
    expected_0 = (HAND_PROBS[0, 0] + HAND_PROBS[1, 0]) / 2  # sources 0, 1 back class 0
    assert torch.allclose(vote.consensus[0], expected_0)
    assert torch.allclose(vote.consensus[2], HAND_PROBS[1, 2])
    assert torch.allclose(vote.consensus[3], HAND_PROBS[2, 3])
    assert torch.allclose(vote.consensus.sum(dim=1), torch.ones(4, dtype=torch.float64))


def _official_vote_loop(probs: torch.Tensor, gate: float) -> tuple[list[int], list[float], list[float]]:
    """A sample-by-sample restatement of the official knowledge_vote ([S, N, C] input)."""
    labels, confs, masks = [], [], []
    for n in range(probs.shape[1]):
        ballots = []
        for s in range(probs.shape[0]):
            row = probs[s, n].tolist()
            best = max(range(len(row)), key=lambda c, row=row: (row[c], -c))
            ballots.append((best, row[best]))
        confident = [p > gate for _, p in ballots]
        scores = [0.0] * probs.shape[2]
        for (cls, p), ok in zip(ballots, confident, strict=True):
            scores[cls] += p * ok if any(confident) else p
        winner = max(range(len(scores)), key=lambda c: (scores[c], -c))
        labels.append(winner)
        confs.append(scores[winner])
        masks.append(1.0 if any(confident) else 0.0)
    return labels, confs, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knowledge_vote_matches_a_per_sample_loop_of_the_official_algorithm(seed):
    probs = _random_probs(seed, sources=4, samples=64, classes=5)
    vote = knowledge_vote(probs, 0.8)
    labels, confs, masks = _official_vote_loop(probs, 0.8)
    assert vote.label.tolist() == labels
    assert vote.confidence.tolist() == pytest.approx(confs)
    assert vote.weight.tolist() == masks
    assert 0.0 < vote.passed_fraction < 1.0  # the example exercises both branches


# ---------------------------------------------------------------------------------------------------
# Consensus quality and focus
# ---------------------------------------------------------------------------------------------------


def test_consensus_quality_is_the_summed_confident_consensus_confidence():
    assert consensus_quality(HAND_PROBS, HAND_GATE, [0, 1, 2]) == pytest.approx(1.87 + 0.97 + 0.98)
    assert consensus_quality(HAND_PROBS, HAND_GATE, [0]) == pytest.approx(0.95)
    assert consensus_quality(HAND_PROBS, HAND_GATE, [2]) == pytest.approx(0.93 + 0.98)
    assert consensus_quality(HAND_PROBS, HAND_GATE, []) == 0.0
    probs = _random_probs(5, sources=4, samples=40, classes=4)
    for size in range(5):
        for subset in itertools.combinations(range(4), size):
            assert consensus_quality(probs, 0.7, subset) == pytest.approx(_vote_quality(probs, 0.7, subset))


def test_consensus_quality_is_monotone_so_consensus_focus_is_never_negative():
    probs = _random_probs(6, sources=4, samples=50, classes=3)
    table = subset_qualities(probs, 0.75)
    for mask in range(16):
        for k in range(4):
            assert table[mask | (1 << k)] >= table[mask] - 1e-12
    assert bool((consensus_focus_exact(probs, 0.75) >= 0).all())


def test_two_source_shapley_by_hand():
    # One sample; source 0 says class 0 at 0.95, source 1 class 1 at 0.91: Q({0})=.95, Q({1})=.91,
    # Q({0,1}) = max(.95, .91) = .95. Shapley: ((.95 - 0) + (.95 - .91)) / 2 and ((.91 - 0) + 0) / 2.
    probs = torch.tensor([[[0.95, 0.05]], [[0.09, 0.91]]], dtype=torch.float64)
    assert consensus_focus_exact(probs, 0.9).tolist() == pytest.approx([0.495, 0.455])
    # Agreeing sources add up: each gets its own confidence.
    agree = torch.tensor([[[0.95, 0.05]], [[0.91, 0.09]]], dtype=torch.float64)
    assert consensus_focus_exact(agree, 0.9).tolist() == pytest.approx([0.95, 0.91])


@pytest.mark.parametrize(("seed", "sources"), [(None, 3), (10, 3), (11, 4)])
def test_exact_shapley_matches_brute_force_over_all_permutations(seed, sources):
    probs = HAND_PROBS if seed is None else _random_probs(seed, sources=sources, samples=30, classes=4)
    gate = HAND_GATE if seed is None else 0.7
    exact = consensus_focus_exact(probs, gate)
    assert exact.tolist() == pytest.approx(_brute_force_shapley(probs, gate), abs=1e-9)
    assert torch.equal(consensus_focus_official(probs, gate), exact)


def test_shapley_efficiency_sum_equals_quality_of_all_minus_empty():
    probs = _random_probs(12, sources=5, samples=40, classes=4)
    focus = consensus_focus_exact(probs, 0.7)
    total = consensus_quality(probs, 0.7, range(5)) - consensus_quality(probs, 0.7, [])
    assert float(focus.sum()) == pytest.approx(total, rel=1e-12)


def test_monte_carlo_focus_is_unbiased_and_its_error_shrinks_with_permutations():
    probs = _random_probs(13, sources=4, samples=30, classes=4)
    exact = consensus_focus_exact(probs, 0.6)
    single = torch.stack(
        [consensus_focus_monte_carlo(probs, 0.6, 1, torch.Generator().manual_seed(s)) for s in range(400)]
    )
    standard_error = single.std(dim=0) / math.sqrt(single.shape[0])
    assert bool(((single.mean(dim=0) - exact).abs() <= 4 * standard_error + 1e-9).all())

    def rmse(permutations: int) -> float:
        runs = torch.stack([
            consensus_focus_monte_carlo(probs, 0.6, permutations, torch.Generator().manual_seed(1000 + s))
            for s in range(40)
        ])
        return float(((runs - exact) ** 2).mean().sqrt())

    assert rmse(32) < rmse(2) / 2  # ~1/sqrt(16) = 1/4 expected
    # Every single permutation already satisfies efficiency.
    assert float(single[0].sum()) == pytest.approx(float(exact.sum()))


def test_leave_one_out_is_not_the_shapley_value_for_redundant_sources():
    one = torch.tensor([[[0.95, 0.05]]], dtype=torch.float64)
    twins = torch.cat([one, one])  # two identical confident sources
    assert consensus_focus_leave_one_out(twins, 0.9).tolist() == pytest.approx([0.95, 0.95])
    probs = torch.cat([one, torch.tensor([[[0.92, 0.08]]], dtype=torch.float64)])
    # Agreeing sources are additive: leave-one-out and Shapley coincide.
    assert consensus_focus_leave_one_out(probs, 0.9).tolist() == pytest.approx([0.95, 0.92])
    disagree = torch.tensor([[[0.95, 0.05]], [[0.09, 0.91]]], dtype=torch.float64)
    assert consensus_focus_leave_one_out(disagree, 0.9).tolist() == pytest.approx([0.04, 0.0])
    assert consensus_focus_exact(disagree, 0.9).tolist() == pytest.approx([0.495, 0.455])


def test_kd3a_downweights_malicious_and_irrelevant_sources():
    num_samples, num_classes = 60, 5
    truth = torch.arange(num_samples) % num_classes

    def confident_on(labels: torch.Tensor, p: float) -> torch.Tensor:
        out = torch.full((num_samples, num_classes), (1 - p) / (num_classes - 1), dtype=torch.float64)
        out[torch.arange(num_samples), labels] = p
        return out

    probs = torch.stack([
        confident_on(truth, 0.95),  # good
        confident_on(truth, 0.95),  # good
        confident_on((truth + 1) % num_classes, 0.95),  # malicious: confidently wrong
        confident_on(truth, 0.40),  # irrelevant: never passes the gate
    ])
    focus = consensus_focus_exact(probs, 0.9)
    # Per sample: Q(all) = 1.9; the attacker only adds when it comes first (1/3 of orders).
    good = 1.9 / 2 - 0.95 / 6
    assert (focus / num_samples).tolist() == pytest.approx([good, good, 0.95 / 3, 0.0])
    weights = domain_weights(focus, target_passed_fraction=1.0)
    assert weights[4] == 0.0
    assert weights[3] < weights[1] / 2
    assert float(weights.sum()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------
# Domain weights
# ---------------------------------------------------------------------------------------------------


def test_domain_weights_target_share_and_focus_proportional_sources():
    weights = domain_weights(torch.tensor([2.0, 1.0, -0.5]), target_passed_fraction=0.6)
    target = 0.6 / 4  # official: alpha / (S + 1)
    assert weights.tolist() == pytest.approx([target, (1 - target) * 2 / 3, (1 - target) / 3, 0.0])
    assert bool((weights >= 0).all())
    assert float(weights.sum()) == pytest.approx(1.0)
    # The paper's sample-count factor.
    counted = domain_weights(torch.tensor([1.0, 1.0, 1.0]), 0.0, source_sample_counts=torch.tensor([1, 3, 0]))
    assert counted.tolist() == pytest.approx([0.0, 0.25, 0.75, 0.0])


def test_domain_weights_with_no_focus_fall_back_to_uniform_or_sample_counts():
    uniform = domain_weights(torch.zeros(4), target_passed_fraction=0.5)
    assert uniform.tolist() == pytest.approx([0.1] + [0.9 / 4] * 4)
    counts = torch.tensor([100.0, 300.0])
    by_count = domain_weights(torch.tensor([0.0, -1.0]), 0.0, source_sample_counts=counts)
    assert by_count.tolist() == pytest.approx([0.0, 0.25, 0.75])
    assert initial_domain_weights(3).tolist() == pytest.approx([0.25] * 4)


def test_moving_average_of_domain_weights_uses_momentum_point_nine():
    previous = torch.tensor([0.25, 0.25, 0.25, 0.25])
    new = torch.tensor([0.1, 0.6, 0.3, 0.0])
    smoothed = moving_average_weights(previous, new)
    assert smoothed.tolist() == pytest.approx([0.235, 0.285, 0.255, 0.225])
    assert float(smoothed.sum()) == pytest.approx(1.0)
    assert torch.equal(moving_average_weights(None, new), new.double())  # first round: taken as is
    assert moving_average_weights(previous, new, momentum=0.0).tolist() == pytest.approx(new.tolist())


# ---------------------------------------------------------------------------------------------------
# Aggregation and BatchNorm
# ---------------------------------------------------------------------------------------------------


def _bn_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=1.0),  # momentum 1: running stats = last batch's stats
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5, momentum=1.0),
    )


def _perturbed_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in _bn_net(seed).state_dict().items():
        if value.is_floating_point():
            state[key] = torch.rand(value.shape, generator=g) + (1.0 if key.endswith("running_var") else 0.0)
        else:
            state[key] = torch.tensor(7)
    return state


def test_aggregate_state_dicts_is_the_weighted_average_of_every_entry():
    states = [_perturbed_state(s) for s in range(3)]
    weights = torch.tensor([0.2, 0.5, 0.3])
    merged = aggregate_state_dicts(states, weights)
    assert list(merged) == list(states[0])
    for key, value in merged.items():
        if key.endswith("num_batches_tracked"):
            assert value.dtype == torch.long and int(value) == 7
            continue
        manual = 0.2 * states[0][key] + 0.5 * states[1][key] + 0.3 * states[2][key]
        assert torch.allclose(value, manual, atol=1e-6), key
    # Unnormalised weights give the same result.
    again = aggregate_state_dicts(states, torch.tensor([2.0, 5.0, 3.0]))
    assert all(torch.allclose(again[k].double(), merged[k].double(), atol=1e-6) for k in merged)


def test_aggregate_without_bn_statistics_leaves_bn_buffers_local():
    states = [_perturbed_state(s) for s in range(2)]
    merged = aggregate_state_dicts(states, torch.tensor([0.5, 0.5]), aggregate_bn_statistics=False)
    assert not any(k.split(".")[-1] in {"running_mean", "running_var", "num_batches_tracked"} for k in merged)
    assert "1.weight" in merged and "1.bias" in merged  # BN's affine parameters are still averaged
    assert torch.allclose(merged["0.weight"], (states[0]["0.weight"] + states[1]["0.weight"]) / 2)


def test_weighted_bn_statistics_against_manual_weighted_average():
    states = [_perturbed_state(s) for s in range(3)]
    stats = weighted_bn_statistics(states, torch.tensor([1.0, 1.0, 2.0]))
    assert sorted(stats) == ["1", "5"]
    for layer in ("1", "5"):
        mean = sum(w * s[f"{layer}.running_mean"] for w, s in zip([0.25, 0.25, 0.5], states, strict=True))
        var = sum(w * s[f"{layer}.running_var"] for w, s in zip([0.25, 0.25, 0.5], states, strict=True))
        assert torch.allclose(stats[layer].mean, mean, atol=1e-6)
        assert torch.allclose(stats[layer].var, var, atol=1e-6)


def test_bn_mmd_is_zero_on_the_sources_own_statistics_positive_otherwise_and_trains_the_model():
    source = _bn_net(0).train()
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        source(x)  # momentum 1: running stats become this batch's mean and unbiased variance
    source_stats = {k: BNStats(v.mean.clone(), v.var.clone())
                    for k, v in bn_statistics_from_state(source.state_dict()).items()}

    target = copy.deepcopy(source)
    with collect_bn_inputs(target) as same:
        target(x)
    assert sorted(same) == ["1", "5"]
    zero = bn_mmd_loss(same, [source_stats], torch.tensor([1.0])).detach()
    assert float(zero) == pytest.approx(0.0, abs=1e-9)

    with collect_bn_inputs(target) as shifted:
        target(2.0 * x + 1.0)
    loss = bn_mmd_loss(shifted, [source_stats], torch.tensor([1.0]))
    assert float(loss.detach()) > 1e-3
    loss.backward()
    assert target[0].weight.grad is not None and float(target[0].weight.grad.abs().sum()) > 0
    assert target[4].weight.grad is not None and float(target[4].weight.grad.abs().sum()) > 0
    # Hooks are gone after the block: another forward records nothing new.
    target(x)
    assert not target[1]._forward_pre_hooks


def test_bn_mmd_is_the_distance_to_the_weighted_source_statistics_plus_a_constant():
    g = torch.Generator().manual_seed(3)

    def stats() -> dict[str, BNStats]:
        return {"bn": BNStats(torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5)}

    sources, target = [stats(), stats(), stats()], stats()
    weights = torch.tensor([0.5, 0.3, 0.2])
    loss = float(bn_mmd_loss(target, sources, weights))
    mix_mean = sum(w * s["bn"].mean for w, s in zip(weights, sources, strict=True))
    mix_var = sum(w * s["bn"].var for w, s in zip(weights, sources, strict=True))
    spread = sum(w * (((s["bn"].mean - mix_mean) ** 2).sum() + ((s["bn"].var - mix_var) ** 2).sum())
                 for w, s in zip(weights, sources, strict=True))
    to_mix = ((target["bn"].mean - mix_mean) ** 2).sum() + ((target["bn"].var - mix_var) ** 2).sum()
    assert loss == pytest.approx(float(to_mix + spread), rel=1e-5)
    # So the official aggregation (the weighted statistics) minimises it.
    states = [{"bn.running_mean": s["bn"].mean, "bn.running_var": s["bn"].var} for s in sources]
    best = weighted_bn_statistics(states, weights)
    assert float(bn_mmd_loss(best, sources, weights)) == pytest.approx(float(spread), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Target training step
# ---------------------------------------------------------------------------------------------------


def test_mixup_keeps_label_mass_and_leaves_vote_weights_unmixed():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), 4).float()
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    batch = mixup(x, labels, weights, generator=g)
    assert 0.0 < batch.lam < 1.0
    assert torch.allclose(batch.labels.sum(dim=1), torch.ones(6))  # every row keeps mass 1
    assert torch.allclose(batch.labels.sum(dim=0), labels.sum(dim=0))  # and every class its total
    assert torch.allclose(batch.x, batch.lam * x + (1 - batch.lam) * x[batch.index])
    assert torch.equal(batch.weights, weights)  # official: the loss uses the unmixed weights
    assert sorted(batch.index.tolist()) == list(range(6))
    mixed = mixup(x, labels, weights, generator=g, mix_weights=True, lam=0.7)
    assert torch.allclose(mixed.weights, 0.7 * weights + 0.3 * weights[mixed.index])
    plain = mixup(x, labels, weights, alpha=0.0, generator=g)
    assert plain.lam == 1.0 and torch.equal(plain.x, x) and torch.equal(plain.labels, labels)


def test_mixup_lambda_is_reproducible_and_beta_two_two_on_average():
    def lam(seed: int) -> float:
        batch = mixup(torch.zeros(2, 1), torch.zeros(2, 2), torch.ones(2),
                      generator=torch.Generator().manual_seed(seed))
        return batch.lam

    lams = [lam(s) for s in range(400)]
    assert lam(0) == lams[0]
    mean = sum(lams) / len(lams)
    assert mean == pytest.approx(0.5, abs=0.05)  # Beta(2, 2): mean 1/2, sd 0.22


def test_target_distillation_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]])
    consensus = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 1.0]])
    weight = torch.tensor([1.0, 1.0, 0.0])
    # Row 0: -log(1/2). Row 1: softmax = (3/4, 1/4). Row 2 has weight 0 but counts in the mean.
    row1 = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    expected = (math.log(2.0) + row1) / 3
    assert float(target_distillation_loss(logits, consensus, weight)) == pytest.approx(expected, rel=1e-6)


def test_source_batches_count_across_passes_and_never_spin():
    from fedrep.algorithms.kd3a.rule import _batches

    gen = torch.Generator().manual_seed(0)
    got = list(_batches(5, 2, 7, gen))  # 5 samples, batch 2: passes of [2, 2] (the 1 is dropped)
    assert [len(b) for b in got] == [2] * 7
    assert all(len(set(torch.cat(got[i:i + 2]).tolist())) == 4 for i in (0, 2, 4))  # one pass each
    # batch-size 1 with BatchNorm fits no batch: the config refuses it, and the loop must end
    assert list(_batches(5, 1, 3, gen)) == []
