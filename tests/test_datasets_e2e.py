"""`fedrep run` on each of the paper's data sets and on other frameworks' partitions, through the
real CLI and Flower simulation, on small files the tests write in the exact real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import fedrep_cli
from fedrep.data.partition_file import write_index_partition
from fedrep.results import RunDir
from fixtures_cifar import write_cifar_folder
from fixtures_leaf import write_glove, write_leaf_femnist, write_leaf_sent140
from fixtures_partitions import disjoint_parts, write_pfllib_folder

FAST = ["--rounds", "2", "--set", "head-epochs=1", "--set", "final-finetune-epochs=1",
        "--set", "fraction-train=1.0", "--set", "wait-for-clients=60"]


def _run_folder(out: Path) -> RunDir:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return RunDir(folder)


def _sizes(run: RunDir, kind: str) -> dict[int, int]:
    """num-examples each partition reported in its `kind` replies (one value per partition)."""
    seen: dict[int, set[int]] = {}
    for row in run.read_audit():
        if row["kind"] == kind and not row.get("error"):
            seen.setdefault(row["partition"], set()).add(row["metrics"]["num-examples"])
    assert all(len(v) == 1 for v in seen.values()), seen
    return {p: v.pop() for p, v in seen.items()}


@pytest.mark.e2e
@pytest.mark.parametrize(("dataset", "model"), [("cifar10", "cnn"), ("cifar100", "cnn-cifar100")])
def test_cifar_runs_end_to_end_with_the_official_model(tmp_path: Path, dataset: str, model: str):
    write_cifar_folder(tmp_path / "data", dataset, per_batch=1000 if dataset == "cifar100" else 40)
    fedrep_cli("run", "--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--num-clients", "4",
               "--classes-per-client", "2", "--out", str(tmp_path / "runs"), *FAST)
    run = _run_folder(tmp_path / "runs")
    cfg = run.saved_config()
    assert (cfg.model, cfg.augment, cfg.partition) == (model, True, "pathological")
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [1, 2] and 0 <= rows[-1]["accuracy-mean"] <= 1
    assert len(_sizes(run, "train")) == 4


@pytest.mark.e2e
def test_femnist_replays_leaf_writers_as_clients(tmp_path: Path):
    users = {"w3": ([0, 1, 1, 2, 9, 45], [1, 2]), "w1": ([3] * 9, [3, 3, 3]),  # 45 = 'j': filtered out
             "w9": ([40], [41]),  # letters only: no digit sample, skipped
             "w2": ([4, 5, 6, 7], [7]), "w5": ([8, 8], [8])}
    write_leaf_femnist(tmp_path / "leaf", users, files=2)
    fedrep_cli("run", "--dataset", "femnist", "--data-dir", str(tmp_path / "leaf" / "data"),
               "--num-clients", "3", "--out", str(tmp_path / "runs"), *FAST)
    run = _run_folder(tmp_path / "runs")
    cfg = run.saved_config()
    assert (cfg.model, cfg.partition, cfg.femnist_classes) == ("mlp", "natural", "digits")
    # the first three users with digit samples, in LEAF's order: w3, w1, w2
    assert _sizes(run, "train") == {0: 5, 1: 9, 2: 4}
    assert _sizes(run, "evaluate") == {0: 2, 1: 3, 2: 1}


@pytest.mark.e2e
def test_sent140_runs_on_leaf_tweets_and_glove_vectors(tmp_path: Path):
    tweets = {"alice": ([("good day :)", 1), ("bad day", 0), ("so good", 1)], [("good", 1)]),
              "bob": ([("awful traffic", 0), ("great food", 1)], [("awful", 0), ("great", 1)])}
    write_leaf_sent140(tmp_path / "leaf", tweets, files=1)
    write_glove(tmp_path / "leaf" / "data" / "glove.6B.300d.txt", ["good", "bad", "day", "so", "great"])
    fedrep_cli("run", "--dataset", "sent140", "--data-dir", str(tmp_path / "leaf" / "data"),
               "--num-clients", "2", "--out", str(tmp_path / "runs"), "--set", "batch-size=4", *FAST)
    run = _run_folder(tmp_path / "runs")
    assert run.saved_config().model == "lstm"
    assert _sizes(run, "train") == {0: 3, 1: 2} and _sizes(run, "evaluate") == {0: 1, 1: 2}
    shared = {name for row in run.read_audit() if row["kind"] == "train" for name in row["arrays"]}
    assert shared == {f"arrays/body.{k}" for k in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0",
                                                     "rnn.bias_hh_l0", "fc.weight", "fc.bias")}  # no head


def test_missing_glove_stops_the_run_before_anything_starts(tmp_path: Path):
    write_leaf_sent140(tmp_path / "leaf", 3, files=1)
    proc = fedrep_cli("run", "--dataset", "sent140", "--data-dir", str(tmp_path / "leaf" / "data"),
                      "--num-clients", "2", "--out", str(tmp_path / "runs"), check=False, timeout=60)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "glove.6B.300d.txt" in line and "embs.json" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.e2e
def test_a_pfllib_folder_replays_its_clients(tmp_path: Path):
    sizes = [(30, 8), (12, 5), (21, 6)]
    folder = write_pfllib_folder(tmp_path / "Cifar10", sizes, num_classes=10, shape=(3, 32, 32))
    fedrep_cli("run", "--dataset", "pfllib", "--partition-file", str(folder), "--num-clients", "3",
               "--out", str(tmp_path / "runs"), *FAST)
    run = _run_folder(tmp_path / "runs")
    assert run.saved_config().model == "fedavg-cnn"
    assert _sizes(run, "train") == {i: tr for i, (tr, _) in enumerate(sizes)}
    assert _sizes(run, "evaluate") == {i: te for i, (_, te) in enumerate(sizes)}


@pytest.mark.e2e
def test_compare_on_a_partition_file_gives_every_strategy_the_same_clients(tmp_path: Path):
    write_cifar_folder(tmp_path / "data", "cifar10", per_batch=20)  # 100 train, 20 test images
    parts = disjoint_parts(3, 100, 20, seed=4)[:3]
    parts = [type(p)(p.train[: 10 + 7 * i], p.test[: 2 + i]) for i, p in enumerate(parts)]
    clients = tmp_path / "clients.json"
    write_index_partition(clients, parts, "cifar10")
    spec = tmp_path / "cmp.toml"
    spec.write_text(
        'strategies = ["fedrep", "fedavg"]\n[config]\ndataset = "cifar10"\nnum-clients = 3\n'
        f'partition = "file"\npartition-file = "{clients}"\ndata-dir = "{tmp_path / "data"}"\n'
        'num-rounds = 2\nhead-epochs = 1\nfinal-finetune-epochs = 1\nfraction-train = 1.0\n')
    fedrep_cli("compare", str(spec), "--out", str(tmp_path / "cmp"))
    expected = {i: len(p.train) for i, p in enumerate(parts)}
    for strategy in ("fedrep", "fedavg"):
        run = RunDir(tmp_path / "cmp" / strategy)
        assert _sizes(run, "train") == expected
        assert _sizes(run, "evaluate") == {i: len(p.test) for i, p in enumerate(parts)}


def test_a_bad_cifar_batch_stops_the_run_before_anything_starts(tmp_path: Path):
    folder = write_cifar_folder(tmp_path / "data", "cifar10", per_batch=20)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    proc = fedrep_cli("run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                      "--num-clients", "2", "--out", str(tmp_path / "runs"), check=False, timeout=60)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "data_batch_3" in line
    assert not (tmp_path / "runs").exists()  # nothing started, no run folder


def test_a_partition_file_that_contradicts_the_run_is_refused_naming_the_client(tmp_path: Path):
    write_cifar_folder(tmp_path / "data", "cifar10", per_batch=20)
    parts = disjoint_parts(2, 100, 20)
    parts[1] = type(parts[1])(np.append(parts[1].train, parts[0].train[0]), parts[1].test)
    write_index_partition(tmp_path / "p.json", parts, "cifar10")
    proc = fedrep_cli("run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                      "--num-clients", "2", "--partition", "file", "--partition-file",
                      str(tmp_path / "p.json"), "--out", str(tmp_path / "runs"), check=False, timeout=60)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "client 0" in line and "client 1" in line and "p.json" in line


def test_partition_schema_is_printed():
    from fedrep.data.partition_file import PARTITION_FILE_SCHEMA

    proc = fedrep_cli("config", "--partition-schema", timeout=60)
    assert proc.stdout.strip() == PARTITION_FILE_SCHEMA.strip()
    assert '"format": "fedrep-partition/1"' in proc.stdout
