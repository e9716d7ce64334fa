"""FedBABU (Oh, Kim & Yun, ICLR 2022) as a fedrep strategy plugin.

During federated training only the body is updated and shared; the head stays at its random
initialisation, identical on every client. Personalization happens at evaluation: each client
fine-tunes (here: its head) on its own data before it is scored.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedrep import ClientData, ClientUpdateRule, EvalResult, Phase, SplitModel, StrategyPlugin, param_names


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
    # the platform's sample-weighted averaging of what clients share, by reference: a SuperNode
    # (which builds only client halves) never imports server code
    server="fedrep:SharedAveraging",
    client=FedBABUUpdate,
    config_keys=("local-epochs", "lr", "batch-size"),
    options=FedBABUOptions,
)
