"""The paper's Sec. 5 linear task (``synthetic.py`` generates it): what configuration knows about
it, and its keys with their own check (k <= d). Imports no torch."""

from __future__ import annotations

from pydantic import Field, model_validator

from fedrep.keys import DatasetSpec, KeySection

LINEAR_SYNTHETIC = DatasetSpec("linear-synthetic", 1, ("linear",))

SPECS = (LINEAR_SYNTHETIC,)


class LinearTaskKeys(KeySection):
    """Keys of the linear task (paper Sec. 5, Fig. 2)."""

    linear_dim: int = Field(20, ge=1, description="d, ambient dimension (paper Fig. 2: d=20).")
    linear_rank: int = Field(2, ge=1, description="k, representation rank (paper Fig. 2: k=2).")
    linear_samples: int = Field(10, ge=1, description="m, train samples per client.")
    linear_noise: float = Field(1e-3, ge=0, description="Std of additive label noise.")

    @model_validator(mode="after")
    def _rank_fits(self) -> LinearTaskKeys:
        if self.linear_rank > self.linear_dim:
            raise ValueError(
                f"linear-rank={self.linear_rank} exceeds linear-dim={self.linear_dim}; need k <= d")
        return self
