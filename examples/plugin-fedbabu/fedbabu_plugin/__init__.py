"""FedBABU (Oh, Kim & Yun, ICLR 2022) as a fedrep strategy plugin.

During federated training only the body is updated and shared; the head stays at its random
initialisation, identical on every client. Personalization happens at evaluation: each client
fine-tunes (here: its head) on its own data before it is scored.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedrep.algorithms.base import ClientUpdateRule, param_names
from fedrep.algorithms.training import EvalResult, Phase
from fedrep.data.federated import ClientData
from fedrep.models.base import SplitModel
from fedrep.registry import StrategyPlugin
from server.strategies.base import SharedAveraging


class FedBABUOptions(BaseModel):
    """Set with --set 'strategy-options={finetune_epochs = 5}'."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    finetune_epochs: int = Field(5, ge=0, description="Head epochs before each evaluation.")


class FedBABUUpdate(ClientUpdateRule):
    def shared_keys(self, model: SplitModel) -> list[str]:
        return model.representation_keys()  # the body travels ...

    def phases(self, model: SplitModel) -> list[Phase]:
        # ... and is the only thing trained: the head stays frozen at its initialisation.
        return [Phase(param_names(model.body, "body"), self.cfg.local_epochs)]

    def evaluate(self, model: SplitModel, data: ClientData, generator: torch.Generator) -> EvalResult:
        return self.finetune_and_evaluate(model, data, self.options.finetune_epochs, generator)


PLUGIN = StrategyPlugin(
    name="fedbabu",
    description="FedBABU: body trained and shared with a frozen random head; fine-tune to evaluate.",
    server=SharedAveraging,  # the platform's sample-weighted averaging of what clients share
    client=FedBABUUpdate,
    config_keys=("local-epochs", "lr", "batch-size"),
    options=FedBABUOptions,
)
