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
