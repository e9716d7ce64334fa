"""Configuration fails at start, naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from fedrep.config import (
    ConfigError,
    RunConfig,
    load_experiment_file,
    parse_override,
    parse_run_config,
)
from fedrep.registry import get_strategy

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_flower_app_config():
    """[tool.flwr.app.config] must list every key with RunConfig's default, or `flwr run
    --run-config` could not override it and the two sources of defaults would drift."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_flower()


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"head-epoch": 3})
    msg = str(err.value)
    assert "unknown key 'head-epoch'" in msg and "Did you mean 'head-epochs'" in msg
    assert "body-epochs" in msg  # the list of valid keys


def test_negative_epochs_rejected_with_key_name():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"head-epochs": -1})
    msg = str(err.value)
    assert "'head-epochs' = -1" in msg and "greater than or equal to 0" in msg


def test_unknown_strategy_lists_installed():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"strategy": "fedmagic"})
    msg = str(err.value)
    assert "'strategy' = 'fedmagic'" in msg and "fedrep" in msg and "fedavg" in msg


def test_classes_per_client_larger_than_classes():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"classes-per-client": 11})
    assert "classes-per-client=11 exceeds the 10 classes" in str(err.value)


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"partition": "shards"})
    msg = str(err.value)
    assert "'partition'" in msg and "'pathological'" in msg and "'dirichlet'" in msg


def test_model_must_fit_dataset():
    with pytest.raises(ConfigError, match="does not fit dataset"):
        parse_run_config({"dataset": "linear-synthetic", "model": "cnn"})


def test_a_boolean_is_not_a_number():
    with pytest.raises(ConfigError, match="'eval-every' = True: a true/false value"):
        parse_run_config({"eval-every": True})
    assert parse_run_config({"irrelevant-source": True}).irrelevant_source is True


def test_resume_needs_run_dir():
    with pytest.raises(ConfigError, match="resume=true needs run-dir"):
        parse_run_config({"resume": True})


def test_experiment_file_and_overrides(tmp_path: Path):
    exp = tmp_path / "exp.toml"
    exp.write_text('num-rounds = 7\nstrategy = "fedavg"\n')
    values = load_experiment_file(exp)
    values.update([parse_override("lr=0.05"), parse_override("partition=iid")])
    cfg = parse_run_config(values)
    assert (cfg.num_rounds, cfg.strategy, cfg.lr, cfg.partition) == (7, "fedavg", 0.05, "iid")


def test_experiment_file_takes_strategy_options_as_a_table(tmp_path: Path):
    exp = tmp_path / "prox.toml"
    exp.write_text('strategy = "fedprox"\nstrategy-options = {mu = 0.01}\n')
    cfg = parse_run_config(load_experiment_file(exp))
    assert cfg.strategy_options == "{mu = 0.01}"
    assert get_strategy("fedprox").parse_options(cfg.strategy_options).mu == 0.01


def test_experiment_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment_file(bad)
    nested = tmp_path / "nested.toml"
    nested.write_text("[fedrep]\nnum-rounds = 3\n")
    with pytest.raises(ConfigError, match="flat keys"):
        load_experiment_file(nested)


def test_strategy_options_are_typed_strictly_and_named():
    bad = {'{personal_batchnorm = "yes"}': "personal_batchnorm = 'yes': expected bool, not str",
           "{personal_batchnorm = 1}": "personal_batchnorm = 1: expected bool, not int",
           "{personal = []}": "strategy-options: nothing is personal"}
    for options, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            parse_run_config({"strategy": "split", "strategy-options": options})
    with pytest.raises(ConfigError, match="mu = '0.5': expected float, not str"):
        parse_run_config({"strategy": "fedprox", "strategy-options": '{mu = "0.5"}'})
    assert parse_run_config({"strategy": "fedprox", "strategy-options": "{mu = 1}"})  # int for float
    with pytest.raises(ConfigError, match="'lr' = inf: Input should be a finite number"):
        parse_run_config({"lr": float("inf")})


def test_resume_compares_strategy_options_as_tables_not_text(tmp_path: Path):
    from fedrep.results import RunDir

    first = parse_run_config({"strategy": "split", "model": "cnn-bn", "run-dir": str(tmp_path / "r"),
                              "strategy-options": "{personal = [], personal_batchnorm = true}"})
    run, _ = RunDir.create(first)
    same = first.model_copy(update={"strategy_options": "{personal_batchnorm=true,personal=[ ]}"})
    run.check_resumable_with(same)  # reordered and respaced: the same options
    other = first.model_copy(update={"strategy_options": '{personal = ["head"]}'})
    with pytest.raises(ConfigError, match="strategy-options: saved"):
        run.check_resumable_with(other)


def test_toml_value_round_trips_tables_with_any_key():
    from fedrep.config import toml_value

    value = {"mu": 0.5, "my key": [1, "x"], "nested": {"on": True}}
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value
    with pytest.raises(ConfigError, match="strategy-options.nested: Extra inputs"):  # not a TOML error
        parse_run_config({"strategy": "fedprox", "strategy-options": {"nested": {"a": 1}}})


def test_a_data_set_brings_its_official_model_partition_and_script_settings():
    from fedrep.config import parse_run_config

    sent = parse_run_config({"dataset": "sent140"})
    assert (sent.model, sent.partition, sent.num_clients, sent.batch_size) == ("lstm", "natural", 183, 4)
    assert (sent.head_epochs, sent.body_epochs) == (10, 5)  # FedRep_sent140.sh: local_ep 15, rep 5
    femnist = parse_run_config({"dataset": "femnist", "num-clients": 20, "model": "femnist-cnn"})
    assert (femnist.num_clients, femnist.model, femnist.num_classes()) == (20, "femnist-cnn", 10)
    assert parse_run_config({"dataset": "cifar100"}).classes_per_client == 20
    cifar10 = parse_run_config({"dataset": "cifar10"})
    assert (cifar10.model, cifar10.head_epochs, cifar10.body_epochs, cifar10.augment) == ("cnn", 10, 1, True)


@pytest.mark.parametrize(("values", "message"), [
    ({"dataset": "femnist", "partition": "iid"}, "use partition='natural'"),
    ({"dataset": "cifar10", "partition": "natural"}, "use partition='natural'"),
    ({"dataset": "cifar10", "partition": "file"}, "needs partition-file"),
    ({"dataset": "sent140", "partition": "file", "partition-file": "x.json"}, "use partition='natural'"),
    ({"dataset": "pfllib", "partition": "iid"}, "partition-file=FOLDER"),
    ({"dataset": "cifar10", "partition-file": "x.json"}, "set partition='file'"),
    ({"dataset": "sent140", "model": "cnn"}, "does not fit dataset 'sent140'"),
])
def test_data_set_and_partition_mismatches_name_the_fix(values: dict, message: str):
    from fedrep.config import ConfigError, parse_run_config

    with pytest.raises(ConfigError, match=message):
        parse_run_config(values)


def test_keys_are_declared_by_their_concern_and_form_one_flat_key_space():
    """The core model holds no data-set or local-update key; each section owns its keys and its
    check, and RunConfig is exactly their union, so users see one flat key space."""
    from fedrep.algorithms.privacy_keys import PrivacyKeys
    from fedrep.algorithms.robust_keys import RobustKeys
    from fedrep.algorithms.update_keys import LocalUpdateKeys
    from fedrep.config import DATASETS, CoreKeys
    from fedrep.data.domains_spec import DomainKeys
    from fedrep.data.images_spec import ImageKeys
    from fedrep.data.leaf_spec import LeafKeys
    from fedrep.data.linear_spec import LinearTaskKeys

    sections = (LocalUpdateKeys, RobustKeys, PrivacyKeys, ImageKeys, LeafKeys, DomainKeys, LinearTaskKeys)
    owned = [set(section.model_fields) for section in sections]
    assert all(not (keys & set(CoreKeys.model_fields)) for keys in owned)
    assert set().union(CoreKeys.model_fields, *owned) == set(RunConfig.model_fields)
    assert {"head_epochs", "linear_dim", "target_domain", "femnist_classes", "augment"}.isdisjoint(
        CoreKeys.model_fields)
    # A section's own check keeps the flat error format: key names, the fix.
    with pytest.raises(ConfigError, match="linear-rank=5 exceeds linear-dim=3; need k <= d"):
        parse_run_config({"linear-rank": 5, "linear-dim": 3})
    with pytest.raises(ConfigError, match="set num-clients=5"):
        parse_run_config({"dataset": "fmnist-domains", "num-clients": 3})
    # Each data set's facts come from its family's declaration.
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["femnist"].natural_clients
    assert parse_run_config({"dataset": "sent140"}).batch_size == DATASETS["sent140"].defaults["batch-size"]
