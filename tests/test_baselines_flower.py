"""Baselines with unusual shapes through the real Flower simulation: Local-only shares nothing,
Ditto carries a personal model that must never travel."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.results import RunDir

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("strategy", ["local", "ditto"])
def test_baseline_runs_and_keeps_personal_parts_home(tmp_path: Path, fmnist_dir: Path,
                                                      strategy: str):
    run_dir = tmp_path / strategy
    fedrep_cli("run", *SMALL_FMNIST, "--strategy", strategy, "--rounds", "2",
               "--set", f"run-dir={run_dir}", "--set", f"data-dir={fmnist_dir}",
               "--set", "local-epochs=2")
    run = RunDir(run_dir)
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["accuracy-trained-mean"] > 0.6
    train = [r for r in run.read_audit() if r["kind"] == "train"]
    assert train
    for row in train:
        if strategy == "local":
            assert row["arrays"] == [] and row["bytes"] == 0
        else:
            assert row["arrays"] and not any("personal" in a for a in row["arrays"])


def test_batchnorm_only_personalization_through_flower(tmp_path: Path, fmnist_dir: Path):
    """FedBN-style split on Fashion-MNIST: every BatchNorm layer stays home, the rest travels."""
    run_dir = tmp_path / "fedbn"
    fedrep_cli("run", *SMALL_FMNIST, "--strategy", "split", "--rounds", "2",
               "--set", "model=cnn-bn", "--set", "model-width=8",
               "--set", "strategy-options={personal = [], personal_batchnorm = true}",
               "--set", f"run-dir={run_dir}", "--set", f"data-dir={fmnist_dir}")
    run = RunDir(run_dir)
    # the head is shared too, so on 2-class clients the body is what to judge: fine-tune a head
    assert run.read_metrics()[-1]["accuracy-finetuned-mean"] > 0.8
    train = [r for r in run.read_audit() if r["kind"] == "train"]
    assert train
    norms = ("body.1.", "body.5.", "body.10.")
    for row in train:
        names = [a.split("/", 1)[-1] for a in row["arrays"]]  # "arrays/body.0.weight"
        assert "head.weight" in names and "body.0.weight" in names
        assert not any(a.startswith(norms) for a in names), names
    assert not any(k.startswith(norms) for k in run.load_checkpoint(2))  # nor the global model
