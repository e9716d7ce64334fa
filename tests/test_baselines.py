"""The baselines' client rules: what they share, what they train, checked by hand."""

from __future__ import annotations

import pytest
import torch
from single_process import evaluate_all, run_reference

from fedrep.algorithms.ditto import DittoPair
from fedrep.algorithms.training import EVAL, round_generator
from fedrep.config import ConfigError, parse_run_config
from fedrep.data.federated import ClientData
from fedrep.models import build_model
from fedrep.registry import get_strategy


def _rule(name: str, **values):
    cfg = parse_run_config({"strategy": name, "model": "mlp", **values})
    plugin = get_strategy(name)
    rule = plugin.client_rule(cfg)
    return cfg, rule, rule.prepare_model(build_model(cfg))


def _toy(n: int = 30) -> ClientData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ClientData(x, y, x, y)


def test_what_each_baseline_shares():
    _, rule, model = _rule("fedper")
    assert rule.shared_keys(model) == model.representation_keys()
    _, rule, model = _rule("lg-fedavg")  # official: the top two layers (the MLP's last hidden, output)
    assert rule.shared_keys(model) == ["body.5.weight", "body.5.bias", *model.head_keys()]
    _, rule, model = _rule("lg-fedavg", **{"strategy-options": '{global_layers = "head"}'})
    assert rule.shared_keys(model) == model.head_keys()
    _, rule, model = _rule("local")
    assert rule.shared_keys(model) == [] and rule.personal_keys(model) == list(model.state_dict())
    _, rule, model = _rule("split", **{"strategy-options": '{personal = ["body.1"]}'})
    assert rule.personal_keys(model) == ["body.1.weight", "body.1.bias"]
    _, rule, model = _rule("ditto")
    assert all(not k.startswith("personal.") for k in rule.shared_keys(model))
    assert set(rule.personal_keys(model)) == {k for k in model.state_dict() if k.startswith("personal.")}


def test_split_prefix_must_match_a_layer():
    _, rule, model = _rule("split", **{"strategy-options": '{personal = ["body.99"]}'})
    with pytest.raises(ValueError, match="match no parameter"):
        rule.shared_keys(model)


def test_options_are_validated_at_start_with_their_name():
    with pytest.raises(ConfigError, match=r"strategy-options.mu: .*greater than or equal to 0"):
        parse_run_config({"strategy": "fedprox", "strategy-options": "{mu = -1}"})
    with pytest.raises(ConfigError, match=r"strategy-options.nu.*options of 'fedprox': mu"):
        parse_run_config({"strategy": "fedprox", "strategy-options": "{nu = 1}"})
    with pytest.raises(ConfigError, match="not a TOML inline table"):
        parse_run_config({"strategy": "fedprox", "strategy-options": "{mu = }"})
    cfg = parse_run_config({"strategy": "fedprox", "strategy-options": {"mu": 0.5}})
    assert cfg.strategy_options == "{mu = 0.5}"  # dict from a TOML file/--set becomes text


def test_fedprox_step_matches_hand_computation():
    """Two full-batch GD steps: the first equals FedAvg's (w = w_global there), the second adds
    mu * (w - w_global) to the gradient."""
    mu, lr = 0.7, 0.1
    values = {"lr": lr, "momentum": 0.0, "weight-decay": 0.0, "batch-size": 30, "local-epochs": 2}
    cfg, rule, model = _rule("fedprox", **values, **{"strategy-options": f"{{mu = {mu}}}"})
    data = _toy()
    manual = build_model(cfg)
    manual.load_state_dict(model.state_dict())
    anchor = {n: p.detach().clone() for n, p in manual.named_parameters()}
    rule.fit(model, data, round_generator(1, 1, 0))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(manual(data.x_train), data.y_train)
        grads = torch.autograd.grad(loss, list(manual.parameters()))
        with torch.no_grad():
            for (name, p), g in zip(manual.named_parameters(), grads, strict=True):
                p -= lr * (g + mu * (p - anchor[name]))
    for key, value in manual.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_ditto_pulls_personal_model_to_global_and_evaluates_it():
    data = _toy()
    moved = {}
    for lam in (0.0, 10.0):
        cfg, rule, model = _rule("ditto", lr=0.05, **{"strategy-options": f"{{lam = {lam}}}"})
        assert isinstance(model, DittoPair)
        received = {n: p.detach().clone() for n, p in model.named_parameters()
                    if not n.startswith("personal.")}
        with torch.no_grad():  # a personal model away from the received global one
            for p in model.personal.parameters():
                p.add_(0.002)
        rule.fit(model, data, round_generator(1, 1, 0))
        params = dict(model.named_parameters())
        moved[lam] = sum(float((params["personal." + n] - v).detach().norm())
                         for n, v in received.items())
        out = model(data.x_test)
        torch.testing.assert_close(out, model.personal(data.x_test))  # evaluation: personal
    assert moved[10.0] < 0.8 * moved[0.0], moved


def test_fedavg_ft_finetunes_only_the_head_before_evaluating():
    cfg, rule, model = _rule("fedavg-ft", **{"strategy-options": "{finetune_epochs = 3}"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rule.evaluate(model, _toy(), round_generator(1, 1, 0, EVAL))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in model.representation_keys())
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_fedavg_ft_can_finetune_the_whole_model():
    _, rule, model = _rule("fedavg-ft", **{"strategy-options": '{finetune_epochs = 2, finetune = "all"}'})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rule.evaluate(model, _toy(), round_generator(1, 1, 0, EVAL))
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # body and head both trained


@pytest.mark.parametrize("name", ["fedavg", "fedavg-ft", "fedper", "lg-fedavg", "local",
                                  "fedprox", "ditto", "fedrep"])
def test_every_strategy_learns_on_the_linear_task(name: str):
    """Five rounds of each through the reference loop beat the untrained model."""
    cfg = parse_run_config({
        "strategy": name, "dataset": "linear-synthetic", "model": "linear", "num-clients": 10,
        "fraction-train": 1.0, "lr": 0.05, "momentum": 0.0, "weight-decay": 0.0,
        "local-epochs": 5, "head-epochs": 5, "body-epochs": 1, "num-rounds": 5})
    rule = get_strategy(name).client_rule(cfg)
    start = evaluate_all(cfg, rule, run_reference(cfg, rule, rounds=0))["loss-mean"]
    end = evaluate_all(cfg, rule, run_reference(cfg, rule, rounds=5))["loss-mean"]
    assert end < start, (start, end)


def test_batchnorm_only_personalization_keeps_every_bn_layer_home():
    cfg, rule, model = _rule("split", model="cnn-bn",
                             **{"strategy-options": "{personal = [], personal_batchnorm = true}"})
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms == ["body.1", "body.5", "body.10"]  # the cnn-bn layout on 1x28x28 Fashion-MNIST
    expected = [k for k in model.state_dict() if k.rsplit(".", 1)[0] in norms]
    assert rule.personal_keys(model) == expected and len(expected) == 3 * 5  # w, b, mean, var, count
    assert "head.weight" in rule.shared_keys(model) and "body.0.weight" in rule.shared_keys(model)
    rule.check(model)  # a runnable setup: nothing raised
    _, rule, model = _rule("split", **{"strategy-options": "{personal_batchnorm = true}"})  # mlp
    with pytest.raises(ValueError, match="personal_batchnorm: model 'mlp' has no BatchNorm"):
        rule.check(model)
    with pytest.raises(ConfigError, match="nothing is personal"):
        _rule("split", **{"strategy-options": "{personal = []}"})


def test_supervised_strategies_refuse_a_multi_domain_set():
    cfg = parse_run_config({"strategy": "fedavg", "dataset": "fmnist-domains", "model": "cnn-bn",
                            "num-clients": 5})
    rule = get_strategy("fedavg").client_rule(cfg)
    with pytest.raises(ValueError, match="partition 0 is KD3A's unlabelled target"):
        rule.check(build_model(cfg))
    kd3a = get_strategy("kd3a").client_rule(cfg.model_copy(update={"strategy": "kd3a"}))
    kd3a.check(build_model(cfg))  # KD3A is made for it
