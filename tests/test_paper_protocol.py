"""The paper's protocol: its metric, LG-FedAvg and Local-only as the official code runs them, the
official aggregation weights, and several seeds in one comparison."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import SMALL_FMNIST, fedrep_cli
from fedrep.algorithms.aggregate import last_rounds_mean, summarize
from fedrep.algorithms.split import LGFedAvgOptions, LGFedAvgUpdate
from fedrep.config import parse_run_config
from fedrep.models import build_model
from fedrep.results import RunDir
from server.loop import evaluates


def test_last_10_rounds_mean_by_hand():
    per_round = {r: r / 100 for r in range(1, 16)}  # 0.01 .. 0.15
    # rounds 6..15: (0.06 + ... + 0.15) / 10 = 1.05 / 10
    assert last_rounds_mean(per_round, 15) == pytest.approx(0.105)
    assert last_rounds_mean(per_round, 3) == pytest.approx((0.01 + 0.02 + 0.03) / 3)  # fewer rounds ran
    per_round[9] = None  # a round of the window was not evaluated: no number rather than a wrong one
    assert last_rounds_mean(per_round, 15) is None
    assert last_rounds_mean(per_round, 20) is None


def test_test_size_weighted_mean_by_hand():
    # three clients: 1/2 of 10 test images, 3/4 of 4, 0/1 of 1 -> (5 + 3 + 0) / 15
    stats = summarize([0.5, 0.75, 0.0], [10, 4, 1])
    assert stats["weighted-mean"] == pytest.approx(8 / 15)
    assert stats["mean"] == pytest.approx(1.25 / 3)


def test_the_last_10_rounds_are_always_evaluated():
    cfg = parse_run_config({"num-rounds": 30, "eval-every": 5})
    assert [r for r in range(1, 31) if evaluates(cfg, r)] == [5, 10, 15, 20, *range(21, 31)]


def test_lg_fedavg_shares_the_official_layers_of_the_papers_cnn():
    """Official main_fedrep.py, alg 'lg' on CIFAR: w_glob_keys = weight_keys[1, 2] = fc2, fc3."""
    cfg = parse_run_config({"dataset": "cifar10", "strategy": "lg-fedavg"})
    model = build_model(cfg)
    shared = LGFedAvgUpdate(cfg).shared_keys(model)
    # fc2 (120 -> 64) is the body's last Linear, fc3 the head
    assert shared == ["body.9.weight", "body.9.bias", "head.weight", "head.bias"]
    assert model.state_dict()["body.9.weight"].shape == (64, 120)
    head_only = LGFedAvgUpdate(cfg, LGFedAvgOptions(global_layers="head")).shared_keys(model)
    assert head_only == ["head.weight", "head.bias"]
    mlp = build_model(parse_run_config({"dataset": "femnist", "strategy": "lg-fedavg"}))  # [2, 3]
    assert LGFedAvgUpdate(cfg).shared_keys(mlp) == ["body.5.weight", "body.5.bias", "head.weight",
                                                    "head.bias"]


def test_official_aggregation_weights_per_data_set():
    assert parse_run_config({"aggregation-weights": "official", "dataset": "cifar10"}).equal_aggregation()
    assert not parse_run_config({"aggregation-weights": "official", "dataset": "femnist"}).equal_aggregation()
    assert parse_run_config({"aggregation-weights": "equal"}).equal_aggregation()
    assert not parse_run_config({}).equal_aggregation()


def _rows(run: RunDir, kind: str) -> list[dict]:
    return [r for r in run.read_audit() if r["kind"] == kind and not r.get("error")]


@pytest.mark.e2e
def test_metrics_carry_the_papers_metric_and_local_trains_everyone(tmp_path: Path, fmnist_dir: Path):
    run_dir = tmp_path / "local"
    proc = fedrep_cli("run", *SMALL_FMNIST, "--strategy", "local", "--rounds", "3",
                      "--set", f"run-dir={run_dir}", "--set", "final-finetune-epochs=0")
    run = RunDir(run_dir)
    rows = run.read_metrics()
    for row in rows:  # weighted by each client's test-set size, from the clients' own replies
        evals = [r for r in _rows(run, "evaluate") if r["round"] == row["round"]]
        weighted = sum(r["metrics"]["accuracy"] * r["metrics"]["num-examples"] for r in evals) / \
            sum(r["metrics"]["num-examples"] for r in evals)
        assert row["accuracy-weighted-mean"] == pytest.approx(weighted)
        # official main_local.py: every client trains in every round
        trained = sorted(r["partition"] for r in _rows(run, "train") if r["round"] == row["round"])
        assert trained == list(range(6))
    assert rows[-1]["accuracy-last10"] == pytest.approx(sum(r["accuracy-weighted-mean"] for r in rows) / 3)
    assert f"{rows[-1]['accuracy-last10']:.4f}" in proc.stderr and "the paper's metric" in proc.stderr
    with (run_dir / "metrics.csv").open() as fh:
        assert "accuracy-last10" in next(csv.reader(fh))


@pytest.mark.e2e
def test_compare_over_seeds_reports_mean_std_and_paired_differences(tmp_path: Path, fmnist_dir: Path):
    spec = tmp_path / "seeds.toml"
    spec.write_text('strategies = ["fedrep", "fedavg"]\n[config]\nnum-clients = 6\nclasses-per-client = 2\n'
                    'max-train-per-client = 60\nmax-test-per-client = 30\nfraction-train = 0.5\n'
                    'head-epochs = 1\nnum-rounds = 2\nfinal-finetune-epochs = 1\n')
    out = tmp_path / "cmp"
    proc = fedrep_cli("compare", str(spec), "--seeds", "1,2", "--out", str(out), timeout=600)
    table = (out / "results.md").read_text()
    assert table in proc.stdout and "Seeds 1, 2" in table
    with (out / "results.csv").open() as fh:
        rows = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert rows["fedrep"]["seeds"] == rows["fedavg"]["seeds"] == "2"
    paper = [RunDir(out / f"seed-{s}" / "fedavg").read_metrics()[-1]["accuracy-last10"] for s in (1, 2)]
    assert float(rows["fedavg"]["accuracy-last10-mean"]) == pytest.approx(sum(paper) / 2)
    assert float(rows["fedavg"]["accuracy-last10-std"]) == pytest.approx(abs(paper[0] - paper[1]) / 2 ** 0.5)
    assert rows["fedavg"]["paired-seeds"] == "2" and rows["fedrep"]["paired-difference-mean"] == ""
    assert (out / "accuracy.png").is_file() and (out / "seed-2" / "fedrep" / "state.json").is_file()
    again = fedrep_cli("compare", str(spec), "--seeds", "1,2", "--out", str(out), timeout=300)
    assert "Seeds 1, 2" in again.stdout  # finished runs are skipped, the table rebuilt
    bad = fedrep_cli("compare", str(spec), "--seeds", "1,x", "--out", str(out), check=False, timeout=60)
    assert bad.returncode == 2 and "--seeds" in bad.stderr


PAPER_EXPERIMENTS = sorted((Path(__file__).parent.parent / "experiments" / "paper").glob("*.toml"))


@pytest.mark.parametrize("path", PAPER_EXPERIMENTS, ids=lambda p: p.stem)
def test_every_paper_experiment_names_its_official_scripts_and_validates(path: Path):
    from fedrep.compare import load_comparison

    text = path.read_text()
    assert "scripts/FedRep_" in text and "scripts/FedAvg_" in text
    _, configs = load_comparison(path)
    fedrep, fedavg = configs["fedrep"], configs["fedavg"]
    assert fedrep.aggregation_weights == "official" and fedrep.fraction_train == 0.1
    # the official FedAvg runs 5 local epochs at n=1000 and on FEMNIST, 10 on Sent140, else 1
    expected = {"cifar10-n1000-s2": 5, "fmnist-n1000-s2": 5, "femnist-n150": 5, "sent140-n183": 10}
    assert fedavg.local_epochs == expected.get(path.stem, 1)
    assert len(PAPER_EXPERIMENTS) == 11  # every Table 1 cell + the four Fashion-MNIST reruns


def test_new_clients_are_a_seeded_share_never_everyone():
    from fedrep.algorithms.sampling import new_clients

    held = new_clients(100, 0.2, seed=1)
    assert len(held) == 20 and held == new_clients(100, 0.2, seed=1) and held != new_clients(100, 0.2, 2)
    assert new_clients(6, 0.01, 1) and len(new_clients(3, 0.9, 1)) == 2 and not new_clients(10, 0.0, 1)


@pytest.mark.e2e
def test_new_clients_train_only_after_the_run_from_the_final_model(tmp_path: Path, fmnist_dir: Path):
    from fedrep.algorithms.sampling import new_clients

    run_dir = tmp_path / "gen"
    proc = fedrep_cli("run", *SMALL_FMNIST, "--rounds", "2", "--set", "new-clients=0.34",
                      "--set", "new-client-epochs=3", "--set", f"run-dir={run_dir}")
    held = new_clients(6, 0.34, seed=3)
    assert len(held) == 2
    run = RunDir(run_dir)
    trained = {r["partition"] for r in _rows(run, "train")}
    assert trained and not trained & held  # never trained during the run
    evals = _rows(run, "evaluate")
    last = [r for r in evals if r["round"] == 2]
    assert {r["partition"] for r in evals if r["round"] == 1} == set(range(6)) - held
    new = [r for r in last if r["partition"] in held]
    assert len(new) == 2 and all("accuracy-finetuned" in r["metrics"] for r in new)
    assert all(r["metrics"]["personal-restored"] in (0, 4) for r in new)  # a fresh head: never trained
    row = run.read_metrics()[-1]
    expected = sum(r["metrics"]["accuracy-finetuned"] for r in new) / 2
    assert row["new-clients-accuracy-finetuned-mean"] == pytest.approx(expected)
    assert row["eval-clients"] == 4  # the federation's own evaluation leaves them out
    assert "new clients after 3 epochs" in proc.stderr
    from fedrep.compare import final_client_metrics  # compare pairs the two groups apart

    assert set(final_client_metrics(run)) == set(range(6)) - held
    assert set(final_client_metrics(run, new=True)) == held
