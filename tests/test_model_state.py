"""fedrep.models.state.load_full_state: load_state_dict's result, and its errors, on real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrep.algorithms.training import memory_layout
from fedrep.config import parse_run_config
from fedrep.models import build_model
from fedrep.models.state import load_full_state


def _random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point()
                else torch.randint(0, 50, v.shape, generator=g, dtype=v.dtype))
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_name", ["cnn", "cnn-bn", "mlp"])
def test_equals_load_state_dict_bit_for_bit(model_name: str):
    cfg = parse_run_config({"model": model_name})
    ours, theirs = build_model(cfg), build_model(cfg)
    for seed in (1, 2):  # the second load goes through the cached targets
        state = _random_state(ours, seed)
        load_full_state(ours, state)
        theirs.load_state_dict(state)
        for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b) and a.dtype == b.dtype, key
            assert torch.equal(a, state[key])
    # the parameters stay the module's own Parameter objects (optimizers hold them)
    params = {id(p) for p in ours.parameters()}
    load_full_state(ours, _random_state(ours, 3))
    assert {id(p) for p in ours.parameters()} == params


def test_after_memory_layout_swapped_the_conv_weights():
    model = build_model(parse_run_config({"model": "cnn"}))
    load_full_state(model, _random_state(model, 1))  # targets cached before the swap
    x = torch.zeros(2, 1, 28, 28)
    with memory_layout(model, x, enabled=True):
        pass  # the conv weights' .data are new tensors now
    state = _random_state(model, 2)
    load_full_state(model, state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_states_get_pytorchs_own_errors():
    model = build_model(parse_run_config({"model": "cnn"}))
    state = _random_state(model, 1)
    key = next(iter(state))
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(RuntimeError, match=f"Missing key.*{key}"):
        load_full_state(model, missing)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_full_state(model, {**state, key: state[key].reshape(-1)[:1]})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_full_state(model, {**state, "extra.weight": torch.zeros(1)})


def test_a_module_with_its_own_loading_goes_through_load_state_dict():
    class Loud(nn.Linear):
        loads = 0

        def _load_from_state_dict(self, *args, **kwargs):
            Loud.loads += 1
            super()._load_from_state_dict(*args, **kwargs)

    model = nn.Sequential(Loud(3, 2), nn.ReLU())
    load_full_state(model, {"0.weight": torch.ones(2, 3), "0.bias": torch.zeros(2)})
    assert Loud.loads == 1 and torch.equal(model[0].weight, torch.ones(2, 3))
