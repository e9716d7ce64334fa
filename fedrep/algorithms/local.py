"""Local-only training: every client trains its own model and nothing is communicated."""

from __future__ import annotations

from fedrep.algorithms.base import ClientUpdateRule, all_params
from fedrep.algorithms.training import Phase
from fedrep.models.base import SplitModel


class LocalOnlyUpdate(ClientUpdateRule):
    def shared_keys(self, model: SplitModel) -> list[str]:
        return []

    def phases(self, model: SplitModel) -> list[Phase]:
        return [Phase(all_params(model), self.cfg.local_epochs)]
