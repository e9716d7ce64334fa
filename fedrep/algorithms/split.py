"""Shared vs personal parameters by layer, trained jointly: FedPer, LG-FedAvg and friends.

* FedPer (Arivazhagan et al., 2019): base layers shared, personalization layers (the head)
  kept; all layers trained together each round.
* LG-FedAvg (Liang et al., 2020): the inverse, local representation and global head.
* Any other split by state-dict prefix: "separate bottom layers" hard parameter sharing
  (``personal = ["body.0"]``), one BatchNorm layer (``personal = ["body.1"]`` on ``cnn-bn``), ...
* BN-only personalization, as FedBN (Li et al., ICLR 2021): ``personal = []`` with
  ``personal_batchnorm = true`` keeps every BatchNorm layer's affine weights and running
  statistics on the client, whatever the layers are called.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from fedrep.algorithms.base import ClientUpdateRule, all_params
from fedrep.algorithms.training import Phase, batchnorm_layers
from fedrep.models.base import SplitModel


class SplitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    personal: tuple[str, ...] = Field(
        ("head",), description="State-dict prefixes kept on the client, e.g. ['head'] or ['body.0']."
    )

    personal_batchnorm: bool = Field(
        False, description="Also keep every BatchNorm layer (weights and running statistics) on "
        "the client: FedBN with personal = [] (needs model cnn-bn).")

    @field_validator("personal")
    @classmethod
    def _no_empty_prefix(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p for p in value):
            raise ValueError("a prefix is empty; give prefixes such as ['head'] or ['body.0']")
        return value

    @model_validator(mode="after")
    def _something_personal(self) -> SplitOptions:
        if not self.personal and not self.personal_batchnorm:
            raise ValueError("nothing is personal: give a prefix such as ['head'], or "
                             "personal_batchnorm = true (or use strategy fedavg)")
        return self


def _is_personal(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class SplitUpdate(ClientUpdateRule):
    """Joint training of all parameters for ``local-epochs``; only non-personal ones travel."""

    default_personal: tuple[str, ...] = ("head",)

    def personal_prefixes(self, model: SplitModel) -> tuple[str, ...]:
        if not isinstance(self.options, SplitOptions):
            return self.default_personal
        prefixes = self.options.personal
        keys = list(model.state_dict())
        unknown = [p for p in prefixes if not any(_is_personal(k, (p,)) for k in keys)]
        if unknown:
            raise ValueError(f"strategy-options.personal: prefixes {unknown} match no parameter; "
                             f"parameters are {keys}")
        if self.options.personal_batchnorm:
            norms = batchnorm_layers(model)
            if not norms:
                raise ValueError(f"strategy-options.personal_batchnorm: model {self.cfg.model!r} has "
                                 "no BatchNorm layer; use model cnn-bn")
            prefixes += norms
        return prefixes

    def shared_keys(self, model: SplitModel) -> list[str]:
        prefixes = self.personal_prefixes(model)
        return [k for k in model.state_dict() if not _is_personal(k, prefixes)]

    def phases(self, model: SplitModel) -> list[Phase]:
        return [Phase(all_params(model), self.cfg.local_epochs)]


class FedPerUpdate(SplitUpdate):
    default_personal = ("head",)


class LGFedAvgOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    global_layers: Literal["official", "head"] = Field(
        "official", description="'official': the layers the official FedRep code shares for "
        "LG-FedAvg (main_fedrep.py, alg 'lg'): the top two fully connected layers (the paper's CNN: "
        "fc2, fc3; the MLP: the last hidden and the output layer; Sent140's LSTM: the LSTM's input "
        "weights and the decoder); 'head': only the head (fedrep before 0.9).")


def official_lg_keys(model: SplitModel) -> list[str]:
    """LG-FedAvg's global (shared) state-dict keys as the official code chooses them: the head
    and the body's last ``nn.Linear``; for the Sent140 LSTM the official ``net_keys[0, 6, 7]``
    (``rnn.weight_ih_l0``, ``decoder.weight``, ``decoder.bias``)."""
    from fedrep.models.lstm import Sent140LSTM

    if isinstance(model, Sent140LSTM):
        wanted = {"body.rnn.weight_ih_l0", "head.weight", "head.bias"}
        return [k for k in model.state_dict() if k in wanted]
    linears = [name for name, m in model.body.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"LG-FedAvg 'official' shares the body's last fully connected layer and the "
                         f"head; {type(model).__name__} has no fully connected layer in its body. Use "
                         "strategy-options={global_layers = \"head\"}")
    prefixes = (f"body.{linears[-1]}", "head")
    return [k for k in model.state_dict() if _is_personal(k, prefixes)]


class LGFedAvgUpdate(SplitUpdate):
    """Local representation, global top layers; trained jointly for ``local-epochs``."""

    default_personal = ("body",)

    def shared_keys(self, model: SplitModel) -> list[str]:
        layers = self.options.global_layers if isinstance(self.options, LGFedAvgOptions) else "official"
        if layers == "head":
            return [k for k in model.state_dict() if not _is_personal(k, ("body",))]
        return official_lg_keys(model)
