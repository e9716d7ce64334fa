"""FedProx (Li et al., MLSys 2020): FedAvg's local update plus ``mu/2 ||w - w_global||^2``,
which keeps heterogeneous clients near the global model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedrep.algorithms.base import all_params, proximal_term
from fedrep.algorithms.fedavg import FedAvgUpdate
from fedrep.algorithms.training import Phase
from fedrep.models.base import SplitModel


class FedProxOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mu: float = Field(0.1, ge=0, description="Proximal weight (official FedRep repo default 0.1).")


class FedProxUpdate(FedAvgUpdate):
    def phases(self, model: SplitModel) -> list[Phase]:
        mu = self.options.mu if isinstance(self.options, FedProxOptions) else 0.1
        names = all_params(model)
        return [Phase(names, self.cfg.local_epochs, penalty=proximal_term(model, names, mu))]
