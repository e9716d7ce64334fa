"""The `fedrep` command: bad input exits 2 with one clear line, before anything starts."""

from __future__ import annotations

from pathlib import Path

from conftest import fedrep_cli


def _fails(*args: str, **kw) -> str:
    proc = fedrep_cli(*args, check=False, timeout=60, **kw)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_strategies_lists_builtins_with_package():
    out = fedrep_cli("strategies").stdout
    line = next(x for x in out.splitlines() if x.startswith("fedrep "))
    assert line.endswith("[fedrep: fedrep.builtin_plugins:FEDREP]")
    assert "fedavg" in out and "config keys: head-epochs" in out
    # options as TOML a user can paste, with their descriptions
    assert "strategy-options (TOML inline table: --set 'strategy-options={personal = [\"head\"]}')" in out
    assert '    personal = ["head"]  # State-dict prefixes kept on the client' in out
    assert "    personal_batchnorm = false  # " in out and '    mode = "kd3a"  # ' in out
    # the keys every strategy with a shared part takes: robust aggregation, attacks, DP, with sources
    assert "  aggregation = 'mean': " in out and "(FedMedian)" in out
    assert "  dp = 'none': User-level differential privacy" in out and "McMahan et al. 2018" in out
    assert "  dp-accountant = 'without-replacement': " in out


def test_version_is_the_installed_distribution():
    from importlib.metadata import version

    assert fedrep_cli("--version").stdout.strip() == f"fedrep {version('fedrep')}"


def test_unknown_strategy():
    err = _fails("run", "--strategy", "fedmagic")
    assert "unknown strategy 'fedmagic'" in err and "fedrep" in err


def test_negative_epochs():
    assert "'head-epochs' = -1" in _fails("run", "--set", "head-epochs=-1")


def test_unknown_key_via_set():
    assert "Did you mean 'num-rounds'" in _fails("run", "--set", "num-round=3")


def test_s_larger_than_classes():
    assert "classes-per-client=12 exceeds" in _fails("run", "--classes-per-client", "12")


def test_missing_data_files_name_path(tmp_path: Path):
    err = _fails("run", "--set", f"data-dir={tmp_path}")
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err


def test_resume_of_a_non_run_folder(tmp_path: Path):
    assert "is not a fedrep run folder" in _fails("run", "--resume", str(tmp_path))


def test_strategy_refuses_a_run_it_cannot_do_before_ray_starts():
    assert "kd3a needs a multi-domain data set" in _fails("run", "--strategy", "kd3a")
    err = _fails("run", "--strategy", "split", "--set", 'strategy-options={personal = ["bodyx"]}')
    assert "strategy-options.personal: prefixes ['bodyx'] match no parameter" in err
    domains = ["--set", "dataset=fmnist-domains", "--set", "model=cnn-bn", "--set", "num-clients=5"]
    assert "partition 0 is KD3A's unlabelled target" in _fails("run", "--strategy", "fedavg", *domains)
    # BatchNorm cannot train on batches of one: KD3A would spin forever, FedAvg make no step
    for strategy, data in (("kd3a", domains), ("fedavg", ["--set", "model=cnn-bn"])):
        err = _fails("run", "--strategy", strategy, *data, "--set", "batch-size=1")
        assert "batch-size=1: model 'cnn-bn' has BatchNorm" in err and "batch-size=2 or more" in err
    assert "Ray" not in err  # refused before the simulation starts


def test_config_file_errors_name_the_file(tmp_path: Path):
    exp = tmp_path / "exp.toml"
    exp.write_text("head-epochs = -2\n")
    assert "'head-epochs' = -2" in _fails("run", "--config", str(exp))
    assert "does not exist" in _fails("run", "--config", str(tmp_path / "none.toml"))
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\x80\xff\xfe binary")
    for command in ("run", "compare"):
        err = _fails(command, *(["--config"] if command == "run" else []), str(binary))
        assert f"{binary} is not UTF-8 text" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_config_lists_every_key_with_default():
    from fedrep.config import allowed_keys

    out = fedrep_cli("config").stdout
    assert all(f"{key} " in out for key in allowed_keys())
    assert "head-epochs" in out and "official local_ep 11 - 1" in out


def test_an_unusable_run_folder_is_refused_before_ray_starts(tmp_path: Path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    err = _fails("run", "--set", f"run-dir={a_file}")
    assert f"run-dir {a_file}: cannot create the run folder" in err and "--out DIR" in err
    err = _fails("run", "--out", str(a_file))  # a new run folder would go inside a file
    assert "cannot create the run folder (Not a directory)" in err


def test_resuming_a_finished_run_does_not_start_anything(tmp_path: Path):
    from fedrep.config import RunConfig
    from fedrep.results import RunDir

    cfg = RunConfig(dataset="linear-synthetic", model="linear", num_clients=4, num_rounds=3)
    run, _ = RunDir.create(cfg.model_copy(update={"run_dir": str(tmp_path / "done")}))
    run.write_state(3, "completed")
    proc = fedrep_cli("run", "--resume", str(run.path), timeout=60)
    assert "already completed its 3 rounds; nothing to do" in proc.stderr
    assert "Ray" not in proc.stderr and f"results: {run.path}" in proc.stdout
