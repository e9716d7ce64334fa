"""What every configuration concern shares: the error a user can fix, the base of a key section,
and a data set's declaration.

A run's configuration is one flat ``{key: value}`` mapping (Flower's run config, an experiment
TOML, ``--set key=value``), but its keys belong to different owners: the core run keys
(:mod:`fedrep.config`), the local-update keys of the built-in rules
(:mod:`fedrep.algorithms.update_keys`), and each data-set family's own keys and facts
(``fedrep/data/*_spec.py``). Each owner declares its keys as a :class:`KeySection` with its own
validator; :class:`fedrep.config.RunConfig` is their union, so users still see one flat key space
and one error format. This module imports only pydantic, so a section never pulls in torch or the
data loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key and the fix."""


def kebab(name: str) -> str:
    """Field name -> run-config key (Flower writes keys in kebab-case)."""
    return name.replace("_", "-")


class KeySection(BaseModel):
    """The keys one concern owns. Sections are mixed into :class:`fedrep.config.RunConfig`; a
    section's ``model_validator(mode="after")`` checks its keys (it may read the core keys, such
    as ``dataset`` and ``num_clients``, which every run has)."""

    model_config = ConfigDict(
        alias_generator=kebab, populate_by_name=True, extra="forbid", frozen=True,
        allow_inf_nan=False,  # lr = inf would only diverge later
    )


@dataclass(frozen=True)
class DatasetSpec:
    """What configuration needs to know about one data set, declared by the data set's family.

    ``models``: the networks it can run, the official one first (the default). ``defaults``: the
    official script's settings applied when the data set is given and the key is not.
    ``natural_clients``: the data fixes the clients (LEAF's users): ``partition = "natural"``.
    ``indexable``: a JSON index partition file can point into its train/test arrays.
    ``num_classes``: 0 when the data says (a PFLlib folder's config.json)."""

    name: str
    num_classes: int
    models: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    natural_clients: bool = False
    indexable: bool = False
    multi_domain: bool = False
    default_partition: str = ""
