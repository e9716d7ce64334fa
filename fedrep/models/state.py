"""Load a complete state dict into a model: ``load_state_dict``'s result, at a fraction of its cost.

Why: a client loads the received shared part and its own personal part into its model on every
message. ``Module.load_state_dict`` walks the module tree and runs each module's
``_load_from_state_dict`` with its hooks, checks and error bookkeeping: about 0.37 ms for the
paper's CNN, an eighth of the arithmetic of a one-batch client (1,000 tiny clients a round).

:func:`load_full_state` does what ``load_state_dict`` does for a plain model and a state dict
with exactly the model's keys and shapes: ``tensor.copy_(value)`` under ``no_grad`` for every
parameter and persistent buffer. The tensors are looked up by (module, attribute) on each call,
never cached, since :func:`fedrep.algorithms.training.memory_layout` swaps a conv weight's
``.data`` during training. Anything else goes to ``load_state_dict`` itself: a model with a
module that loads its own way (a ``_load_from_state_dict`` other than PyTorch's plain and
BatchNorm ones, or load hooks), and a state dict with a missing, extra or mis-shaped entry
(whose error message is then PyTorch's own).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

_PLAIN_LOADERS = (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)
# model -> [(state-dict key, owning module, attribute name)], or None when the model must go
# through load_state_dict; weak, so that a model's entry goes with the model
_TARGETS: weakref.WeakKeyDictionary[nn.Module, list[tuple[str, nn.Module, str]] | None] = (
    weakref.WeakKeyDictionary())


def _plain(module: nn.Module) -> bool:
    return (type(module)._load_from_state_dict in _PLAIN_LOADERS
            and not module._load_state_dict_pre_hooks and not module._load_state_dict_post_hooks
            and not module._state_dict_hooks and not module._state_dict_pre_hooks)


def _targets(model: nn.Module) -> list[tuple[str, nn.Module, str]] | None:
    if model in _TARGETS:
        return _TARGETS[model]
    targets: list[tuple[str, nn.Module, str]] | None = []
    for prefix, module in model.named_modules():
        if not _plain(module):
            targets = None
            break
        dot = f"{prefix}." if prefix else ""
        targets += [(dot + name, module, name) for name, p in module._parameters.items() if p is not None]
        targets += [(dot + name, module, name) for name, b in module._buffers.items()
                    if b is not None and name not in module._non_persistent_buffers_set]
    if targets is not None and [key for key, _, _ in targets] != list(model.state_dict()):
        targets = None  # e.g. a module reachable under two names: state_dict lists it twice
    _TARGETS[model] = targets
    return targets


def load_full_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` (strict) for a ``state`` that names every parameter and
    persistent buffer of ``model``; copies in place, faster (see the module docstring)."""
    targets = _targets(model)
    if targets is None or len(state) != len(targets):
        model.load_state_dict(state)
        return
    pairs = []
    for key, module, name in targets:
        value = state.get(key)
        current = getattr(module, name)
        if value is None or value.shape != current.shape:
            model.load_state_dict(state)  # raises PyTorch's own error for this entry
            return
        pairs.append((current, value))
    with torch.no_grad():
        for current, value in pairs:
            current.copy_(value)
