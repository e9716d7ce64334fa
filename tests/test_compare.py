"""`fedrep compare`: identical splits and seeds, one table and one plot, resumable."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import fedrep_cli
from fedrep.compare import load_comparison
from fedrep.config import ConfigError


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
    ok = tmp_path / "ok.toml"
    ok.write_text('strategies = ["fedrep", "fedprox"]\n[config]\nseed = 4\n'
                  '[overrides.fedprox]\nstrategy-options = {mu = 0.5}\n')
    _, configs = load_comparison(ok)
    assert configs["fedprox"].strategy_options == "{mu = 0.5}" and configs["fedrep"].seed == 4
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
    local_row = next(line for line in table.splitlines() if line.startswith("| local |"))
    assert local_row.endswith("| 0 B |")  # Local-only sends no parameters either way
    again = fedrep_cli("compare", str(spec), "--out", str(out), timeout=120)  # all done: skips
    assert "results:" in again.stdout
