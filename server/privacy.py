"""The server's side of differential privacy on the shared part: the round's release (central DP),
the clipping norm (adaptive clipping), the privacy accountant and the budget.

The accountant is Flower 1.41's ``RdpAccountant`` (``flwr.supercore.privacy_accounting``), which
wraps Google's ``dp-accounting``; its ledger is JSON, so it lives in ``state.json`` with the round
and a resumed run goes on from the epsilon it had. How rounds are accounted:

* central DP, ``dp-accountant = "without-replacement"`` (default): fedrep samples a fixed-size
  subset of the federation each round (:func:`fedrep.algorithms.sampling.sample_clients`), so each
  round is dp-accounting's ``SampledWithoutReplacementDpEvent`` (Wang, Balle, Kasiviswanathan
  2019), which is defined for replace-one neighbours: one client's data swapped for another's
  moves the sum of clipped updates by up to 2C, so the accountant gets ``z / 2``;
* central DP, ``"no-amplification"``: add/remove-one neighbours (sensitivity C, the accountant
  gets ``z``), no credit for sampling: what Flower's accounted fixed-clipping wrapper does;
* local DP: each client's own release is a Gaussian mechanism on its clipped update (any two
  inputs differ by up to 2C: ``z / 2``), composed over the rounds it took part in, with no
  sampling credit (the server sees who sent what); epsilon is the worst client's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedrep.algorithms.privacy import (
    COUNT_NOISE,
    SERVER_NOISE,
    Clipped,
    clip_update,
    count_stddev,
    next_clip_norm,
    noise_generator,
    noised_mean,
    update_noise_multiplier,
    update_norm,
)
from fedrep.config import RunConfig


class PrivacyBudgetReached(RuntimeError):
    """The next round would take epsilon above ``dp-epsilon-budget``; the rounds before it are
    saved and the run can go on with a larger budget."""


class PrivacyLedger:
    """What the server keeps for DP across rounds (:meth:`state_dict` goes to ``state.json``)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.population = cfg.federation_size()
        self.per_round = cfg.clients_per_round()
        self.clip_norm = cfg.dp_clip_norm
        self.participations: dict[int, int] = {}  # local DP: partition -> rounds it released in
        self.accountant = self._new_accountant()
        self.last_metrics: dict[str, float] = {}

    # -- accounting ------------------------------------------------------------------------------
    def _accounted_multiplier(self) -> float:
        """The noise multiplier the accountant sees (std over the neighbouring relation's
        sensitivity; see the module note)."""
        z = self.cfg.dp_noise_multiplier
        if self.cfg.dp == "central" and self.cfg.dp_accountant == "no-amplification":
            return z
        return z / 2

    def _new_accountant(self) -> RdpAccountant | None:
        if self.cfg.dp_noise_multiplier == 0:
            return None  # nothing to account: epsilon is infinite
        if self.cfg.dp == "central" and self.cfg.dp_accountant == "without-replacement":
            config = PrivacyConfig(self.cfg.dp_delta, self.population, NeighboringRelation.REPLACE_ONE,
                                   SamplingMethod.WITHOUT_REPLACEMENT)
        elif self.cfg.dp == "central":
            config = PrivacyConfig(self.cfg.dp_delta, self.population,
                                   NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
        else:  # local: one client's releases, no sampling credit
            config = PrivacyConfig(self.cfg.dp_delta, 1, NeighboringRelation.ADD_OR_REMOVE_ONE,
                                   SamplingMethod.NO_AMPLIFICATION)
        return RdpAccountant(config)

    def _round_event(self, sampled: int) -> GaussianPrivacyEvent:
        if self.cfg.dp == "local":
            return GaussianPrivacyEvent(self._accounted_multiplier(), 1, 1)
        return GaussianPrivacyEvent(self._accounted_multiplier(), sampled, self.population)

    def _local_epsilon(self, releases: int) -> float:
        if releases == 0:
            return 0.0
        fresh = self._new_accountant()
        assert fresh is not None
        fresh.compose(self._round_event(1), releases)
        return fresh.get_epsilon(self.cfg.dp_delta)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``dp-delta`` (inf without noise)."""
        if self.accountant is None:
            return math.inf
        if self.cfg.dp == "local":
            return self._local_epsilon(max(self.participations.values(), default=0))
        if self.accountant.num_releases == 0:
            return 0.0
        return self.accountant.get_epsilon(self.cfg.dp_delta)

    def check_budget(self, server_round: int, sampled: Sequence[int]) -> None:
        """Refuse a round that would take epsilon above the budget, before any client trains."""
        budget = self.cfg.dp_epsilon_budget
        if budget <= 0 or self.accountant is None or not sampled:
            return
        if self.cfg.dp == "local":
            worst = max(max((self.participations.get(p, 0) for p in sampled), default=0) + 1,
                        max(self.participations.values(), default=0))
            after = self._local_epsilon(worst)
        else:
            projected = RdpAccountant(self.accountant.config)
            projected.load_state_dict(self.accountant.state_dict())
            projected.compose(self._round_event(len(sampled)))
            after = projected.get_epsilon(self.cfg.dp_delta)
        if after > budget:
            raise PrivacyBudgetReached(
                f"privacy budget: round {server_round} would take epsilon from {self.epsilon():.4g} to "
                f"{after:.4g} at delta {self.cfg.dp_delta:g}, above dp-epsilon-budget={budget:g}; the run "
                f"stopped after round {server_round - 1} (saved). To go on, resume with a larger budget: "
                f"fedrep run --resume RUN_DIR --set dp-epsilon-budget=...")

    def account(self, sampled: int, released_by: Sequence[int]) -> None:
        """Compose the round just released: ``sampled`` clients asked, ``released_by`` the
        partitions whose update reached the server."""
        if self.accountant is None or not released_by:
            return
        if self.cfg.dp == "local":
            for partition in released_by:
                self.participations[partition] = self.participations.get(partition, 0) + 1
        else:
            self.accountant.compose(self._round_event(sampled))

    # -- central DP's release --------------------------------------------------------------------
    def release(self, server_round: int, sent: Mapping[str, np.ndarray],
                updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The round's shared arrays from the clients' ``updates`` (partition order): clipped (on
        the server, unless the clients did), averaged with equal weights, noised; adapts C."""
        cfg = self.cfg
        clip_norm = self.clip_norm
        clipped = [self._clipped(sent, arrays, clip_norm) for arrays in updates]
        z = cfg.dp_noise_multiplier
        sigma_b = count_stddev(cfg.dp_count_stddev, self.per_round)
        if cfg.dp_adaptive_clip:
            z = update_noise_multiplier(z, sigma_b)
        rng = noise_generator(cfg.seed, cfg.dp_noise_source, server_round, SERVER_NOISE)
        out = noised_mean(sent, clipped, z, clip_norm, rng)
        self.last_metrics = {"dp-clip-norm": clip_norm, "dp-noise-std": z * clip_norm / len(clipped)}
        if cfg.dp_adaptive_clip:
            unclipped = sum(c.unclipped(clip_norm) for c in clipped)
            count_rng = noise_generator(cfg.seed, cfg.dp_noise_source, server_round, COUNT_NOISE)
            self.clip_norm, share = next_clip_norm(clip_norm, unclipped, len(clipped), sigma_b,
                                                   cfg.dp_clip_lr, cfg.dp_target_quantile, count_rng)
            self.last_metrics["dp-unclipped-share"] = share  # noised: safe to release
        return out

    def _clipped(self, sent: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray],
                 clip_norm: float) -> Clipped:
        """One update, clipped: here, or (dp-clipping='client') already by its client, taken as it
        came so that both places give the same arithmetic; an update over the norm (a client that
        did not clip) is clipped here all the same."""
        if self.cfg.dp_clipping == "client":
            norm = update_norm(sent, arrays)
            if norm <= clip_norm * (1 + 1e-5):  # float32 rounding of the client's clipped arrays
                return Clipped({k: np.array(v, copy=True) for k, v in arrays.items()}, norm)
        return clip_update(sent, arrays, clip_norm)

    def round_metrics(self) -> dict[str, float]:
        """This round's DP figures for metrics.csv: epsilon (omitted without noise), delta, C."""
        out = dict(self.last_metrics)
        if self.cfg.dp == "local":
            out = {"dp-clip-norm": self.clip_norm,
                   "dp-noise-std": self.cfg.dp_noise_multiplier * self.clip_norm}
        epsilon = self.epsilon()
        if math.isfinite(epsilon):
            out["dp-epsilon"] = epsilon
            out["dp-delta"] = self.cfg.dp_delta
        return out

    # -- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clip-norm": self.clip_norm,
                "participations": {str(k): v for k, v in sorted(self.participations.items())},
                "accountant": self.accountant.state_dict() if self.accountant is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clip_norm = float(state["clip-norm"])
        self.participations = {int(k): int(v) for k, v in state.get("participations", {}).items()}
        if self.accountant is not None and state.get("accountant") is not None:
            self.accountant.load_state_dict(state["accountant"])
