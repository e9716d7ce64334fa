"""Ditto (Li et al., ICML 2021): a global model trained as in FedAvg, and per client a personal
model trained on the local objective plus ``lambda/2 ||v - w_global||^2``.

The client's model becomes a pair: the global network (``body``/``head``, shared) and a
personal copy (``personal.*``, kept). Evaluation uses the personal model.
"""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedrep.algorithms.base import ClientUpdateRule, all_params, param_names, proximal_term
from fedrep.algorithms.training import Phase
from fedrep.models.base import SplitModel


class DittoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lam: float = Field(1.0, ge=0, description="lambda, pull of the personal model to the global "
                       "one (official lam_ditto=1).")
    personal_epochs: int = Field(1, ge=0, description="Epochs on the personal model per round.")


class DittoPair(SplitModel):
    """Global network (shared) + personal copy (kept). ``forward`` is the personal model."""

    def __init__(self, model: SplitModel) -> None:
        super().__init__(model.body, model.head)
        self.task = model.task
        self.personal = copy.deepcopy(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.personal(x)

    def global_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DittoUpdate(ClientUpdateRule):
    def _options(self) -> DittoOptions:
        return self.options if isinstance(self.options, DittoOptions) else DittoOptions()

    def prepare_model(self, model: SplitModel) -> SplitModel:
        return DittoPair(model)

    def shared_keys(self, model: SplitModel) -> list[str]:
        return [k for k in model.state_dict() if not k.startswith("personal.")]

    def phases(self, model: SplitModel) -> list[Phase]:
        assert isinstance(model, DittoPair), "Ditto needs prepare_model's DittoPair"
        opts = self._options()
        global_names = param_names(model.body, "body") | param_names(model.head, "head")
        personal_names = all_params(model) - global_names
        # The personal model is pulled towards the global model as received this round.
        pull = proximal_term(model, global_names, opts.lam, prefix="personal.")
        return [
            Phase(personal_names, opts.personal_epochs, forward=model.personal, penalty=pull),
            Phase(global_names, self.cfg.local_epochs, forward=model.global_forward),
        ]

    def finetune_phases(self, model: SplitModel, epochs: int) -> list[Phase]:
        assert isinstance(model, DittoPair)
        return [Phase(param_names(model.personal.head, "personal.head"), epochs,
                      forward=model.personal)]
