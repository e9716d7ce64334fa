"""`fedrep compare`: identical splits and seeds, one table and one plot, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import fedrep_cli
from fedrep.compare import load_comparison, write_sweep_table
from fedrep.config import ConfigError
from fedrep.results import RunDir


def test_comparison_file_is_validated_up_front(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('strategies = ["fedrep", "nope"]\n[config]\nnum-rounds = 2\n')
    with pytest.raises(ConfigError, match="unknown strategy 'nope'"):
        load_comparison(bad)
    bad.write_text('strategies = ["fedrep"]\n[overrides.fedavg]\nlr = 0.1\n')
    with pytest.raises(ConfigError, match="not in strategies"):
        load_comparison(bad)
    bad.write_text('strategies = ["fedrep"]\n[config]\nhead-epochs = -1\n')
    with pytest.raises(ConfigError, match="'head-epochs' = -1"):
        load_comparison(bad)
    bad.write_text('strategies = []\n')
    with pytest.raises(ConfigError, match=r"bad.toml: strategies: List should have at least 1 item")\
            as err:
        load_comparison(bad)
    assert "\n" not in str(err.value) and "http" not in str(err.value)  # one line, no pydantic URL
    for text in ('strategies = ["..=fedavg"]\n', 'strategies = ["a/b=fedavg"]\n',
                 'strategies = ["fedrep"]\n[sweep]\ntarget-domain = ["/tmp/x", "y"]\n'):
        bad.write_text(text)  # labels and swept values name folders under --out: they stay there
        with pytest.raises(ConfigError, match="names a run folder under --out"):
            load_comparison(bad)
    bad.write_text('strategies = ["fedrep"]\n[sweep]\nstrategy = ["fedrep", "fedavg"]\n')
    with pytest.raises(ConfigError, match=r"sets \['strategy'\]; the comparison decides"):
        load_comparison(bad)
    bad.write_text('strategies = ["fedrep"]\n')
    with pytest.raises(ConfigError, match=r"sets \['run-dir'\]"):
        load_comparison(bad, settings={"run-dir": "/x"})  # `fedrep compare --set run-dir=/x`
    bad.write_text('strategies = ["fedrep"]\n[config]\nstrategy = "fedavg"\n')
    with pytest.raises(ConfigError, match=r"\[config\] sets \['strategy'\]; the comparison decides"):
        load_comparison(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('strategies = ["fedrep", "fedprox"]\n[config]\nseed = 4\n'
                  '[overrides.fedprox]\nstrategy-options = {mu = 0.5}\n')
    _, configs = load_comparison(ok)
    assert configs["fedprox"].strategy_options == "{mu = 0.5}" and configs["fedrep"].seed == 4
    _, reseeded = load_comparison(ok, settings={"seed": 7})  # `fedrep compare --set seed=7`
    assert {c.seed for c in reseeded.values()} == {7}
    assert reseeded["fedprox"].strategy_options == "{mu = 0.5}"
    with pytest.raises(ConfigError, match="--set head-epochs=-2"):
        load_comparison(ok, settings={"head-epochs": -2})
    variants = tmp_path / "variants.toml"  # one strategy twice, told apart by labels
    variants.write_text('strategies = ["fedprox", "strong=fedprox"]\n[overrides.strong]\n'
                        'strategy-options = {mu = 1.0}\n')
    _, configs = load_comparison(variants)
    assert list(configs) == ["fedprox", "strong"] and configs["strong"].strategy == "fedprox"
    assert configs["strong"].strategy_options == "{mu = 1.0}" and configs["fedprox"].strategy_options == ""


@pytest.mark.e2e
def test_compare_runs_writes_table_and_resumes(tmp_path: Path):
    spec = tmp_path / "lin.toml"
    spec.write_text(
        'strategies = ["fedrep", "fedavg", "local"]\n[config]\n'
        'dataset = "linear-synthetic"\nmodel = "linear"\nnum-clients = 10\nfraction-train = 1.0\n'
        'num-rounds = 4\nlr = 0.05\nmomentum = 0.0\nweight-decay = 0.0\nfinal-finetune-epochs = 0\n')
    out = tmp_path / "cmp"
    partial = fedrep_cli("compare", str(spec), "--out", str(out), "--only", "fedrep,local", timeout=300)
    assert "| fedrep |" in partial.stdout and "| fedavg |" not in partial.stdout
    assert not (out / "fedavg").exists()
    bad = fedrep_cli("compare", str(spec), "--out", str(out), "--only", "fedbabu", check=False)
    assert bad.returncode == 2 and "--only ['fedbabu']" in bad.stderr
    proc = fedrep_cli("compare", str(spec), "--out", str(out), timeout=300)  # runs fedavg only
    table = (out / "results.md").read_text()
    assert table in proc.stdout
    for name in ("fedrep", "fedavg", "local"):
        assert f"| {name} |" in table
        assert (out / name / "state.json").is_file()
    assert (out / "distance.png").is_file() and (out / "results.csv").is_file()
    fedavg_rows = [r for r in RunDir(out / "fedavg").read_audit()  # FedAvg keeps nothing personal:
                   if r["kind"] in ("train", "evaluate")]         # no state file read or written
    assert fedavg_rows and {r["metrics"]["personal-restored"] for r in fedavg_rows} == {3}
    assert not any((out / "fedavg" / "client-state").glob("*"))
    local_row = next(line for line in table.splitlines() if line.startswith("| local |"))
    assert local_row.endswith("| 0 B |")  # Local-only sends no parameters either way
    again = fedrep_cli("compare", str(spec), "--out", str(out), timeout=120)  # all done: skips
    assert "results:" in again.stdout
    longer = fedrep_cli("compare", str(spec), "--out", str(out), "--only", "local",  # extends
                        "--set", "num-rounds=5", timeout=300)
    assert [r["round"] for r in RunDir(out / "local").read_metrics()] == [1, 2, 3, 4, 5]
    assert "| local |" in longer.stdout
    reseeded = fedrep_cli("compare", str(spec), "--out", str(out), "--set", "seed=9", check=False)
    assert reseeded.returncode == 2 and "seed: saved 1 vs given 9" in reseeded.stderr


@pytest.mark.e2e
def test_a_diverged_strategy_is_reported_and_the_others_still_run(tmp_path: Path):
    spec = tmp_path / "div.toml"
    spec.write_text(
        'strategies = ["fedavg", "local"]\n[config]\n'
        'dataset = "linear-synthetic"\nmodel = "linear"\nnum-clients = 4\nfraction-train = 1.0\n'
        'num-rounds = 2\nmomentum = 0.0\nfinal-finetune-epochs = 0\n[overrides.fedavg]\nlr = 1e30\n')
    out = tmp_path / "cmp"
    first = fedrep_cli("compare", str(spec), "--out", str(out), check=False, timeout=300)
    assert first.returncode == 1 and "Traceback" not in first.stderr
    assert "fedavg diverged" in first.stderr and "another --out" in first.stderr
    assert "-v" not in first.stderr.splitlines()[-1]  # compare has no -v to suggest
    assert "| local |" in (out / "results.md").read_text()  # the other strategy ran and is tabulated
    again = fedrep_cli("compare", str(spec), "--out", str(out), check=False, timeout=300)
    assert again.returncode == 1 and "fedavg diverged" in again.stderr
    assert "setup changed" not in again.stderr  # it did not; the run diverged


def test_sweep_runs_every_strategy_per_value_and_pivots_the_headline(tmp_path: Path):
    spec = tmp_path / "lodo.toml"
    spec.write_text('strategies = ["kd3a", "source-only=kd3a"]\n'
                    '[sweep]\ntarget-domain = ["original", "rotated"]\n'
                    '[config]\ndataset = "fmnist-domains"\nmodel = "cnn-bn"\nnum-clients = 5\n'
                    '[overrides.source-only]\nstrategy-options = {mode = "source-only"}\n')
    _, first = load_comparison(spec)
    _, rotated = load_comparison(spec, "rotated")
    assert {c.target_domain for c in first.values()} == {"original"}
    assert rotated["source-only"].target_domain == "rotated"
    assert rotated["source-only"].strategy_options == '{mode = "source-only"}'
    bad = tmp_path / "bad.toml"
    bad.write_text('strategies = ["kd3a"]\n[sweep]\ntarget-domain = ["original"]\nseed = [1, 2]\n')
    with pytest.raises(ConfigError, match="sweep one key per file"):
        load_comparison(bad)
    bad.write_text('strategies = ["kd3a"]\n[config]\ndataset = "fmnist-domains"\nmodel = "cnn-bn"\n'
                   'num-clients = 5\n[sweep]\ntarget-domain = ["original", "nowhere"]\n')
    with pytest.raises(ConfigError, match="target-domain = 'nowhere'"):
        load_comparison(bad, "nowhere")

    def row(acc: float) -> dict:
        return {"target-accuracy": acc, "accuracy-mean": 0.9, "bytes-per-round": 2e6}

    tables = {"original": {"kd3a": row(0.8), "source-only": row(0.7)},
              "rotated": {"kd3a": row(0.6)}}  # source-only not finished there yet
    write_sweep_table("target-domain", ["kd3a", "source-only"], tables, tmp_path)
    lines = (tmp_path / "results.md").read_text().splitlines()
    assert lines[0].startswith("| strategy (target accuracy) | target-domain = original | "
                               "target-domain = rotated | mean |")
    assert lines[2] == "| kd3a | 0.8000 | 0.6000 | 0.7000 | 2.0 MB |"
    assert lines[3] == "| source-only | 0.7000 | - | - | 2.0 MB |"  # no mean over a partial row
    assert "target-domain=rotated" in (tmp_path / "results.csv").read_text()


def _evaluated(path: Path, rounds: dict[int, dict[int, dict]]) -> RunDir:
    """A run folder whose audit holds the given evaluate replies (round -> partition -> metrics)."""
    path.mkdir()
    run = RunDir(path)
    run.append_audit([{"round": rnd, "kind": "evaluate", "partition": p, "error": None,
                       "metrics": m} for rnd, clients in rounds.items() for p, m in clients.items()])
    return run


def test_paired_differences_use_each_clients_last_evaluation(tmp_path: Path):
    from fedrep.compare import final_client_metrics, paired_differences, paired_table

    early = {p: {"accuracy": 0.0} for p in range(3)}  # superseded by the later round
    ref = _evaluated(tmp_path / "ref", {10: early, 20: {
        0: {"accuracy": 0.9, "accuracy-finetuned": 0.95}, 1: {"accuracy": 0.8, "accuracy-finetuned": 0.8},
        2: {"accuracy": 0.7, "accuracy-finetuned": 0.9}}})
    other = _evaluated(tmp_path / "other", {10: early, 20: {
        0: {"accuracy": 0.6, "accuracy-finetuned": 0.95}, 1: {"accuracy": 0.8, "accuracy-finetuned": 0.7},
        2: {"accuracy": 0.8}}})  # client 2 reports no fine-tuned accuracy: left out of that pair
    clients = {"ref": final_client_metrics(ref), "other": final_client_metrics(other)}
    assert clients["ref"][1] == {"accuracy": 0.8, "accuracy-finetuned": 0.8}
    rows = {r["metric"]: r for r in paired_differences(clients, "ref")}
    # accuracy: differences 0.3, 0.0, -0.1 -> mean 0.2/3; sample variance
    # ((0.3-m)^2 + m^2 + (-0.1-m)^2) / 2 = 0.0433..., standard error sqrt(var / 3) = 0.1202
    acc = rows["accuracy"]
    assert acc["clients"] == 3 and acc["mean-difference"] == pytest.approx(0.2 / 3)
    assert acc["standard-error"] == pytest.approx(0.12019, abs=1e-5)
    assert (acc["reference-better"], acc["ties"], acc["reference-worse"]) == (1, 1, 1)
    tuned = rows["accuracy-finetuned"]  # differences 0.0 and 0.1 over the two clients both report
    assert tuned["clients"] == 2 and tuned["mean-difference"] == pytest.approx(0.05)
    assert tuned["standard-error"] == pytest.approx(0.05)
    assert (tuned["reference-better"], tuned["ties"], tuned["reference-worse"]) == (1, 1, 0)
    table = paired_table(list(rows.values()))
    assert "| other | +0.0667 ± 0.1202 | +0.0500 ± 0.0500 | 3 | 1 / 1 / 1 |" in table
    assert paired_table([]) == "" and final_client_metrics(RunDir(tmp_path / "none")) == {}


def test_a_run_folder_from_another_setup_is_neither_skipped_nor_resumed(tmp_path: Path):
    from fedrep.compare import _run_one
    from fedrep.config import RunConfig

    cfg = RunConfig(dataset="linear-synthetic", model="linear", num_clients=4, num_rounds=3)
    run, _ = RunDir.create(cfg.model_copy(update={"run_dir": str(tmp_path / "fedrep")}))
    run.write_state(3, "completed")
    assert _run_one(cfg, run.path) == 0.0  # the same setup, finished: skipped
    with pytest.raises(ConfigError, match=r"seed: saved 1 vs given 2.*pass another --out"):
        _run_one(cfg.model_copy(update={"seed": 2}), run.path)
    # fewer rounds than the folder holds: its longer run would stand in the table for a short one
    with pytest.raises(ConfigError, match=r"num-rounds=2: .* completed 3 rounds.*pass another --out"):
        _run_one(cfg.model_copy(update={"num_rounds": 2}), run.path)
