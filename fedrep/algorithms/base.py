"""The client half of a strategy: which parameters travel and how a client trains.

A rule is plain PyTorch: it never sees Flower. The ClientApp loads the shared parameters the
server sent and the client's personal parameters from its own state into one model, calls
:meth:`ClientUpdateRule.fit`, sends back :meth:`shared_keys` and keeps the rest
(:meth:`personal_keys`). Most algorithms only override :meth:`shared_keys` and :meth:`phases`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from fedrep.algorithms.training import (
    EvalResult,
    LocalResult,
    Phase,
    evaluate,
    min_batch_size,
    run_phases,
)
from fedrep.config import RunConfig
from fedrep.data.domains_spec import MULTI_DOMAIN
from fedrep.data.federated import ClientData
from fedrep.models.base import SplitModel


def param_names(module: torch.nn.Module, prefix: str) -> frozenset[str]:
    return frozenset(f"{prefix}.{name}" for name, _ in module.named_parameters())


def all_params(model: torch.nn.Module) -> frozenset[str]:
    return frozenset(name for name, _ in model.named_parameters())


def proximal_term(model: torch.nn.Module, names: frozenset[str] | set[str], weight: float,
                  prefix: str = "") -> Any:
    """``weight/2 * sum ||p - p_0||^2`` over ``names``, anchored at their values *now* (the
    global model just received). Used by FedProx and Ditto; ``prefix`` maps a trained parameter
    ``prefix+name`` onto the anchor ``name``."""
    params = dict(model.named_parameters())
    anchor = {n: params[n].detach().clone() for n in names}
    pairs = [(params[prefix + n], a) for n, a in anchor.items()]

    def penalty() -> torch.Tensor:
        return 0.5 * weight * sum(((p - a) ** 2).sum() for p, a in pairs)

    return penalty


class ClientUpdateRule(ABC):
    """Client half of a strategy plugin. ``options`` is the plugin's validated options model."""

    # Trains on labels on every client. Multi-domain sets withhold partition 0's labels (KD3A's
    # unlabelled target), so such a rule cannot run on them.
    needs_labels_everywhere: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, options: Any = None) -> None:
        self.cfg = cfg
        self.options = options

    def prepare_model(self, model: SplitModel) -> SplitModel:
        """Wrap or extend the run's model (Ditto adds a personal copy). Default: unchanged."""
        return model

    def check(self, model: SplitModel) -> None:
        """Reject a run this rule cannot do before anything starts (the CLI calls it before Ray
        starts, the ServerApp before round 1), rather than in every client later. Raise
        ValueError naming the run-config key and the fix. Overrides should call this one."""
        if self.needs_labels_everywhere and self.cfg.dataset in MULTI_DOMAIN:
            raise ValueError(f"dataset={self.cfg.dataset!r}: its partition 0 is KD3A's unlabelled "
                             "target, and this strategy trains on labels on every client; use "
                             "strategy kd3a, or dataset fashion-mnist (model cnn-bn for BatchNorm)")
        self.shared_keys(model)  # e.g. a personal prefix that names no layer
        smallest = min_batch_size(model)
        if self.cfg.batch_size < smallest:
            raise ValueError(f"batch-size={self.cfg.batch_size}: model {self.cfg.model!r} has "
                             f"BatchNorm, which needs batches of {smallest} or more; set "
                             f"batch-size={smallest} or more")

    @abstractmethod
    def shared_keys(self, model: SplitModel) -> list[str]:
        """State-dict keys exchanged with the server, in state-dict order. A function of the
        model's architecture and the run config only: the ClientApp asks once per model and
        keeps the answer."""

    def personal_keys(self, model: SplitModel) -> list[str]:
        """State-dict keys that never leave the client (everything not shared); asked once per
        model, like :meth:`shared_keys`."""
        shared = set(self.shared_keys(model))
        return [key for key in model.state_dict() if key not in shared]

    @abstractmethod
    def phases(self, model: SplitModel) -> list[Phase]:
        """What one local update trains, in order. Called at the start of each update, with
        the received shared parameters already loaded (proximal anchors are taken here)."""

    def fit(self, model: SplitModel, data: ClientData, generator: torch.Generator) -> LocalResult:
        return run_phases(model, data.x_train, data.y_train, self.phases(model), self.cfg, generator,
                          data.augment)

    def evaluate(self, model: SplitModel, data: ClientData, generator: torch.Generator) -> EvalResult:
        """Local test metrics of this client's model. Personalization by fine-tuning
        (FedAvg+FT) overrides this; ``generator`` seeds any training it does."""
        return evaluate(model, data.x_test, data.y_test, channels_last=self.cfg.channels_last)

    def act(self, action: str, model: SplitModel, data: ClientData, partition: int,
            inputs: dict[str, dict[str, torch.Tensor]], config: dict, generator: torch.Generator) -> Any:
        """Handle a plugin's own message type ``train.<action>`` (see StrategyPlugin.client_actions).

        ``model`` holds the received shared and the restored personal parameters; ``inputs`` are
        the message's other array records as state dicts, ``config`` its config record. Return an
        object with ``arrays`` (a state dict to send back) and ``metrics`` (scalars), and optionally
        ``extra`` (name -> state dict, each sent as its own array record); the
        personal parameters are saved afterwards, as after ``fit``."""
        raise NotImplementedError(f"{type(self).__name__} handles no action {action!r}")

    def finetune_phases(self, model: SplitModel, epochs: int) -> list[Phase]:
        """What 'fine-tune before the final evaluation' trains: the head, body frozen (the
        official code's last round, and FedAvg+FT)."""
        return [Phase(param_names(model.head, "head"), epochs)]

    def finetune_and_evaluate(self, model: SplitModel, data: ClientData, epochs: int,
                              generator: torch.Generator) -> EvalResult:
        """Fine-tune in place (the caller discards the result) and evaluate."""
        run_phases(model, data.x_train, data.y_train, self.finetune_phases(model, epochs),
                   self.cfg, generator, data.augment)
        return evaluate(model, data.x_test, data.y_test, channels_last=self.cfg.channels_last)
