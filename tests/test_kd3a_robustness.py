"""KD3A's negative-transfer defence, end to end on the built-in domains (in one process, with the
client rule and the aggregation the Flower app runs): a poisoned source and an irrelevant source end
with the lowest domain weights, and the target does about as well as without them."""

from __future__ import annotations

import statistics

import pytest
from single_process import run_kd3a, target_accuracy

from fedrep.algorithms.kd3a.rule import KD3AOptions
from fedrep.config import parse_run_config

# Target "original" with two useful sources; a narrow network and 4 local epochs per round
# (r = 0.25) make the sources confident, so consensus focus has votes to weigh, in seconds.
SMALL = {"strategy": "kd3a", "dataset": "fmnist-domains", "model": "cnn-bn", "model-width": 8,
         "target-domain": "original", "source-domains": "lowres-noise,rotated", "num-clients": 3,
         "num-rounds": 5, "max-train-per-client": 240, "max-test-per-client": 300, "batch-size": 40,
         "lr": 0.05, "momentum": 0.9, "weight-decay": 5e-4, "client-threads": 1}
# inverted, half its labels shifted to (y + 1) mod 10 (the official attack), and a fifth party
# whose images carry no class information.
WITH_BAD_SOURCES = {**SMALL, "source-domains": "lowres-noise,rotated,inverted", "num-clients": 5,
                    "malicious-domain": "inverted", "poison-fraction": 0.5, "irrelevant-source": True}
SEEDS = (1, 2, 3)  # the target accuracy of one tiny run varies by about +-0.05


@pytest.mark.e2e
def test_consensus_focus_drives_poisoned_and_irrelevant_sources_down():
    options = KD3AOptions(rounds_per_epoch=0.25)
    without, with_bad = [], []
    for seed in SEEDS:
        clean_cfg = parse_run_config({**SMALL, "seed": seed})
        without.append(target_accuracy(clean_cfg, options, run_kd3a(clean_cfg, options)))

        bad_cfg = parse_run_config({**WITH_BAD_SOURCES, "seed": seed})
        assert bad_cfg.domain_layout() == ["original", "lowres-noise", "rotated", "inverted", "irrelevant"]
        run = run_kd3a(bad_cfg, options)
        with_bad.append(target_accuracy(bad_cfg, options, run))
        assert run.weights is not None
        good, bad = run.weights[1:3].tolist(), run.weights[3:].tolist()
        # the lowest weights, by a wide margin
        assert max(bad) < min(good) / 3, f"seed {seed}: good {good}, poisoned/irrelevant {bad}"

    assert statistics.mean(without) > 0.5  # far above chance (0.1): the comparison means something
    assert statistics.mean(with_bad) >= statistics.mean(without) - 0.05, (with_bad, without)


def test_without_consensus_focus_bad_sources_keep_an_equal_share():
    options = KD3AOptions(rounds_per_epoch=0.25, consensus_focus=False)
    cfg = parse_run_config({**WITH_BAD_SOURCES, "num-rounds": 1, "max-train-per-client": 80})
    weights = run_kd3a(cfg, options).weights
    assert weights is not None
    sources = weights[1:].tolist()
    assert sources == pytest.approx([sources[0]] * 4)  # the ablation: nothing singles them out
