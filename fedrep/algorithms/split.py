"""Shared vs personal parameters by layer, trained jointly: FedPer, LG-FedAvg and friends.

* FedPer (Arivazhagan et al., 2019): base layers shared, personalization layers (the head)
  kept; all layers trained together each round.
* LG-FedAvg (Liang et al., 2020): the inverse, local representation and global head.
* Any other split by state-dict prefix: BN-only personalization (``personal = ["body.1"]`` for
  a BatchNorm at body index 1), "separate bottom layers" hard parameter sharing
  (``personal = ["body.0"]``), ...
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedrep.algorithms.base import ClientUpdateRule, all_params
from fedrep.algorithms.training import Phase
from fedrep.models.base import SplitModel


class SplitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    personal: tuple[str, ...] = Field(
        ("head",), description="State-dict prefixes kept on the client, e.g. ['head'] or ['body.0']."
    )

    @field_validator("personal")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or any(not p for p in value):
            raise ValueError("give at least one non-empty prefix, e.g. ['head']")
        return value


def _is_personal(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class SplitUpdate(ClientUpdateRule):
    """Joint training of all parameters for ``local-epochs``; only non-personal ones travel."""

    default_personal: tuple[str, ...] = ("head",)

    def personal_prefixes(self) -> tuple[str, ...]:
        if isinstance(self.options, SplitOptions):
            return self.options.personal
        return self.default_personal

    def shared_keys(self, model: SplitModel) -> list[str]:
        prefixes = self.personal_prefixes()
        keys = list(model.state_dict())
        unknown = [p for p in prefixes if not any(_is_personal(k, (p,)) for k in keys)]
        if unknown:
            raise ValueError(f"strategy-options.personal: prefixes {unknown} match no parameter; "
                             f"parameters are {keys}")
        return [k for k in keys if not _is_personal(k, prefixes)]

    def phases(self, model: SplitModel) -> list[Phase]:
        return [Phase(all_params(model), self.cfg.local_epochs)]


class FedPerUpdate(SplitUpdate):
    default_personal = ("head",)


class LGFedAvgUpdate(SplitUpdate):
    default_personal = ("body",)
