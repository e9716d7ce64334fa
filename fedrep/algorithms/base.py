"""The client half of a strategy: which parameters travel and how a client trains.

A rule is plain PyTorch: it never sees Flower. The ClientApp loads the shared parameters the
server sent and the client's personal parameters from its own state into one model, calls
:meth:`ClientUpdateRule.fit`, sends back :meth:`shared_keys` and keeps the rest.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from fedrep.algorithms.training import EvalResult, LocalResult, Phase, evaluate, run_phases
from fedrep.config import RunConfig
from fedrep.data.federated import ClientData
from fedrep.models.base import SplitModel


def param_names(module: torch.nn.Module, prefix: str) -> frozenset[str]:
    return frozenset(f"{prefix}.{name}" for name, _ in module.named_parameters())


class ClientUpdateRule(ABC):
    """Client half of a strategy plugin."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def shared_keys(self, model: SplitModel) -> list[str]:
        """State-dict keys exchanged with the server, in state-dict order."""

    def personal_keys(self, model: SplitModel) -> list[str]:
        """State-dict keys that never leave the client (everything not shared)."""
        shared = set(self.shared_keys(model))
        return [key for key in model.state_dict() if key not in shared]

    @abstractmethod
    def phases(self, model: SplitModel) -> list[Phase]:
        """What one local update trains, in order."""

    def fit(self, model: SplitModel, data: ClientData, generator: torch.Generator) -> LocalResult:
        return run_phases(model, data.x_train, data.y_train, self.phases(model), self.cfg, generator)

    def evaluate(self, model: SplitModel, data: ClientData) -> EvalResult:
        return evaluate(model, data.x_test, data.y_test)

    def finetune_phases(self, model: SplitModel, epochs: int) -> list[Phase]:
        """What 'fine-tune before the final evaluation' trains: the head, body frozen (the
        official code's last round, and FedAvg+FT)."""
        return [Phase(param_names(model.head, "head"), epochs)]

    def finetune_and_evaluate(self, model: SplitModel, data: ClientData, epochs: int,
                              generator: torch.Generator) -> EvalResult:
        """Fine-tune in place (the caller discards the result) and evaluate."""
        run_phases(model, data.x_train, data.y_train, self.finetune_phases(model, epochs),
                   self.cfg, generator)
        return self.evaluate(model, data)
