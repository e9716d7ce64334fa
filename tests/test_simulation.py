"""A real Flower simulation (Simulation Runtime, Ray backend) on Fashion-MNIST subsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from single_process import run_reference

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.algorithms.fedrep import FedRepUpdate
from fedrep.config import parse_run_config
from fedrep.models import build_model
from fedrep.results import RunDir, client_state_file

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fedrep_run(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: Path) -> RunDir:
    out = tmp_path_factory.mktemp("runs")
    run_dir = out / "small"
    proc = fedrep_cli("run", *SMALL_FMNIST, "--rounds", "3", "--set", f"run-dir={run_dir}",
                      "--set", f"data-dir={fmnist_dir}")
    assert "round   3/3" in proc.stderr  # live progress
    assert f"results: {run_dir}" in proc.stdout
    # fedrep's own lines only: not the actors' shutdown warnings (those need --verbose)
    assert "Manually terminating" not in proc.stderr + proc.stdout
    return RunDir(run_dir)


def test_run_folder_is_complete(fedrep_run: RunDir):
    assert fedrep_run.state() ["status"] == "completed"
    rows = fedrep_run.read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3]
    for name in ("config.json", "metrics.csv", "plot.png", "checkpoints/round-0003.pt"):
        assert (fedrep_run.path / name).is_file(), name
    csv_lines = (fedrep_run.path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "accuracy-mean" in csv_lines[0]
    assert json.loads((fedrep_run.path / "config.json").read_text())["strategy"] == "fedrep"


def test_accuracy_rises_above_chance(fedrep_run: RunDir):
    rows = fedrep_run.read_metrics()
    # Chance on a client's own 2 classes is 0.5 (0.1 over all 10).
    assert rows[-1]["accuracy-mean"] > 0.7, rows[-1]
    assert rows[-1]["eval-clients"] == 6 and rows[-1]["train-clients"] == 3


def test_head_never_leaves_client(fedrep_run: RunDir):
    """Every message the server received: train replies carry exactly the representation,
    evaluation replies carry no arrays at all. A simulation sends no query messages: the server
    reads each node's partition id from the Simulation Runtime."""
    cfg = fedrep_run.saved_config()
    model = build_model(cfg)
    body = {f"arrays/{k}" for k in model.representation_keys()}
    audit = fedrep_run.read_audit()
    kinds = {row["kind"] for row in audit}
    assert kinds == {"train", "evaluate"}
    for row in audit:
        assert row["error"] is None
        assert not any("head" in name for name in row["arrays"]), row
        if row["kind"] == "train":
            assert set(row["arrays"]) == body
        else:
            assert row["arrays"] == [] and row["bytes"] == 0
    body_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items() if k.startswith("body."))
    train_rows = [r for r in audit if r["kind"] == "train"]
    assert all(abs(r["bytes"] - body_bytes) < 0.01 * body_bytes for r in train_rows)


def test_heads_persist_across_rounds(fedrep_run: RunDir):
    audit = fedrep_run.read_audit()
    seen: set[int] = set()
    restored_from_file = 0
    for row in sorted((r for r in audit if r["kind"] == "train"), key=lambda r: r["round"]):
        expected = 2 if row["partition"] in seen else 0  # 2 = its head file, 0 = fresh head
        assert row["metrics"]["personal-restored"] == expected, row
        restored_from_file += expected
        seen.add(row["partition"])
    assert restored_from_file > 0, "no client trained twice; the test proves nothing"
    for pid in seen:
        versions = torch.load(client_state_file(fedrep_run.path / "client-state", pid),
                              weights_only=True)
        assert all(set(v) == {"head.weight", "head.bias"} for v in versions.values())
    evals = [r for r in audit if r["kind"] == "evaluate" and r["partition"] in seen]
    assert all(r["metrics"]["personal-restored"] != 0 for r in evals if r["round"] == 3)


def test_flower_run_equals_single_process_reference(fedrep_run: RunDir):
    """Same seed -> same sampled clients, shuffles and sums: the Flower simulation computes
    exactly the plain PyTorch loop's representation."""
    cfg = fedrep_run.saved_config()
    reference = run_reference(cfg, FedRepUpdate(cfg), rounds=3)
    final = fedrep_run.load_checkpoint(3)
    assert set(final) == set(reference.shared)
    for key, value in reference.shared.items():
        np.testing.assert_allclose(final[key], value.numpy(), rtol=1e-5, atol=1e-6, err_msg=key)


def test_plot_command_redraws(fedrep_run: RunDir, tmp_path: Path):
    target = tmp_path / "new-folder" / "again.pdf"  # a folder that does not exist yet, a PDF
    proc = fedrep_cli("plot", str(fedrep_run.path), "--out", str(target))
    assert target.is_file() and target.read_bytes().startswith(b"%PDF") and str(target) in proc.stdout
    folder = tmp_path / "plots"  # an existing folder: plot.png inside it
    folder.mkdir()
    assert str(folder / "plot.png") in fedrep_cli("plot", str(fedrep_run.path), "--out", str(folder)).stdout
    assert (folder / "plot.png").is_file()
    bad = fedrep_cli("plot", str(fedrep_run.path), "--out", str(tmp_path / "x.pnj"), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert ".pnj is not an image format" in bad.stderr and ".png" in bad.stderr


def test_parse_of_saved_config_roundtrips(fedrep_run: RunDir):
    cfg = fedrep_run.saved_config()
    assert parse_run_config(cfg.to_flower()) == cfg
