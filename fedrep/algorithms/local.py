"""Local-only training: every client trains its own model and nothing is communicated.

Two schedules (``strategy-options={schedule = ...}``):

* ``"official"`` (default), as the official ``main_local.py`` runs it: every client trains its
  whole model for as many epochs as the run has rounds (``for iter in range(args.epochs)``), with
  SGD at ``lr``, momentum ``momentum`` and no weight decay. Here that is one epoch per round for
  every client (the server samples all of them), so the per-round curve shows its progress.
  Deviation: the official code keeps one optimizer (momentum buffer) across all epochs; ours starts
  a fresh one each round, as every other strategy's local update does.
* ``"sampled"``: a client trains ``local-epochs`` when the round samples it, as in every other
  strategy, so Local-only gets the same local compute budget as FedAvg.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedrep.algorithms.base import ClientUpdateRule, all_params
from fedrep.algorithms.training import LocalResult, Phase, run_phases
from fedrep.config import RunConfig
from fedrep.data.federated import ClientData
from fedrep.models.base import SplitModel


class LocalOnlyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Literal["official", "sampled"] = Field(
        "official", description="'official': every client, one epoch every round, no weight decay "
        "(official main_local.py); 'sampled': local-epochs when sampled, like the other strategies.")


def is_official(options: object) -> bool:
    return not isinstance(options, LocalOnlyOptions) or options.schedule == "official"


def local_server_config(cfg: RunConfig, options: object) -> RunConfig:
    """The official schedule trains every client every round."""
    return cfg.model_copy(update={"fraction_train": 1.0}) if is_official(options) else cfg


class LocalOnlyUpdate(ClientUpdateRule):
    def shared_keys(self, model: SplitModel) -> list[str]:
        return []

    def phases(self, model: SplitModel) -> list[Phase]:
        epochs = 1 if is_official(self.options) else self.cfg.local_epochs
        return [Phase(all_params(model), epochs)]

    def fit(self, model: SplitModel, data: ClientData, generator: torch.Generator) -> LocalResult:
        cfg = self.cfg.model_copy(update={"weight_decay": 0.0}) if is_official(self.options) else self.cfg
        return run_phases(model, data.x_train, data.y_train, self.phases(model), cfg, generator, data.augment)
