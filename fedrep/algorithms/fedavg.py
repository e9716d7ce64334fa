"""FedAvg's local update (McMahan et al., 2017): all parameters trained jointly, all shared.

Here mainly as the reference FedRep is measured against; the personalization baselines
(FedAvg+FT, FedPer, LG-FedAvg, ...) build on the same pieces.
"""

from __future__ import annotations

from fedrep.algorithms.base import ClientUpdateRule
from fedrep.algorithms.training import Phase
from fedrep.models.base import SplitModel


class FedAvgUpdate(ClientUpdateRule):
    def shared_keys(self, model: SplitModel) -> list[str]:
        return list(model.state_dict())

    def phases(self, model: SplitModel) -> list[Phase]:
        everything = frozenset(name for name, _ in model.named_parameters())
        return [Phase(everything, self.cfg.local_epochs)]
