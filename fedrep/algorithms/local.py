"""Local-only training: every client trains its own model and nothing is communicated.

A client trains when the round samples it, as in every other strategy, so Local-only gets the same
local compute budget as FedAvg (``fraction-train=1.0`` trains every client every round)."""

from __future__ import annotations

from fedrep.algorithms.base import ClientUpdateRule, all_params
from fedrep.algorithms.training import Phase
from fedrep.models.base import SplitModel


class LocalOnlyUpdate(ClientUpdateRule):
    def shared_keys(self, model: SplitModel) -> list[str]:
        return []

    def phases(self, model: SplitModel) -> list[Phase]:
        return [Phase(all_params(model), self.cfg.local_epochs)]
