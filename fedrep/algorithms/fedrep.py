"""FedRep's local update (Collins et al., ICML 2021, Algorithm 1).

Per round a sampled client, starting from the global representation phi and its own head h_i:
1. tau_h epochs of SGD on h_i with phi frozen,
2. tau_b epochs of SGD on phi with the new h_i frozen,
then keeps h_i and sends phi back. Only the representation is ever shared.
"""

from __future__ import annotations

from fedrep.algorithms.base import ClientUpdateRule, param_names
from fedrep.algorithms.training import Phase
from fedrep.models.base import SplitModel


class FedRepUpdate(ClientUpdateRule):
    def shared_keys(self, model: SplitModel) -> list[str]:
        return model.representation_keys()

    def phases(self, model: SplitModel) -> list[Phase]:
        return [
            Phase(param_names(model.head, "head"), self.cfg.head_epochs),
            Phase(param_names(model.body, "body"), self.cfg.body_epochs),
        ]
