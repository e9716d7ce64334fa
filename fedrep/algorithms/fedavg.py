"""FedAvg's local update (McMahan et al., 2017): all parameters trained jointly, all shared.

Here mainly as the reference FedRep is measured against; the personalization baselines
(FedAvg+FT, FedPer, LG-FedAvg, ...) build on the same pieces.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedrep.algorithms.base import ClientUpdateRule, all_params
from fedrep.algorithms.training import EvalResult, Phase
from fedrep.data.federated import ClientData
from fedrep.models.base import SplitModel


class FedAvgUpdate(ClientUpdateRule):
    def shared_keys(self, model: SplitModel) -> list[str]:
        return list(model.state_dict())

    def phases(self, model: SplitModel) -> list[Phase]:
        everything = frozenset(name for name, _ in model.named_parameters())
        return [Phase(everything, self.cfg.local_epochs)]


class FedAvgFTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    finetune_epochs: int = Field(10, ge=0, description="Head epochs on local data before each "
                                 "evaluation (official FedAvg last round: 10).")
    finetune: Literal["head", "all"] = Field(
        "head", description="What the fine-tune trains: 'head' (body frozen, as the official FedRep "
        "code) or 'all' (the whole global model, the other common reading of FedAvg+FT).")


class FedAvgFTUpdate(FedAvgUpdate):
    """FedAvg+FT: FedAvg training; every evaluation first fine-tunes the global model's head on
    the client's train split (not kept), as the official code's final round does for FedAvg."""

    def evaluate(self, model: SplitModel, data: ClientData, generator: torch.Generator) -> EvalResult:
        epochs = self.options.finetune_epochs if isinstance(self.options, FedAvgFTOptions) else 10
        return self.finetune_and_evaluate(model, data, epochs, generator)

    def finetune_phases(self, model: SplitModel, epochs: int) -> list[Phase]:
        if isinstance(self.options, FedAvgFTOptions) and self.options.finetune == "all":
            return [Phase(all_params(model), epochs)]
        return super().finetune_phases(model, epochs)
