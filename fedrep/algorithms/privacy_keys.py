"""The keys of user-level differential privacy on the shared part (issue 21). Declared beside the
rules; :class:`fedrep.config.RunConfig` mixes them in and checks them against the strategy, the
aggregation and the number of clients a round samples. Imports no torch.

There is no official FedRep code for this. The mechanisms are DP-FedAvg's (McMahan et al., ICLR
2018: clip each client's update to norm C, add Gaussian noise to the sum) with adaptive clipping
from Andrew et al. (NeurIPS 2021, Algorithm 1); the accountant is Flower 1.41's ``RdpAccountant``
(``flwr.supercore.privacy_accounting``, a wrapper of Google's ``dp-accounting``). Only the shared
part is clipped and noised; heads never leave the client and are not covered (docs/privacy.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedrep.keys import KeySection

DP_MODES = ("none", "central", "local")


def privacy_problem(dp: str, clipping: str, adaptive: bool, noise: float, budget: float,
                    aggregation: str) -> str | None:
    """Why these privacy settings cannot run (None when they can). The strategy and data-set
    checks live in :class:`fedrep.config.RunConfig`, which knows them."""
    if dp == "none":
        return None
    if dp == "central" and aggregation != "mean":
        return (f"central DP calibrates its noise to the mean of clipped updates; aggregation="
                f"{aggregation!r} is not a mean: use dp='local' with a robust aggregator, or "
                "aggregation='mean'")
    if adaptive and (dp != "central" or clipping != "server"):
        return ("dp-adaptive-clip needs dp='central' with dp-clipping='server' (the server sees each "
                "update's norm; clients would have to report it otherwise)")
    if budget > 0 and noise == 0:
        return "dp-epsilon-budget needs noise: with dp-noise-multiplier=0 epsilon is infinite from round 1"
    return None


class PrivacyKeys(KeySection):
    """User-level differential privacy of what clients share (the body for FedRep)."""

    dp: Literal["none", "central", "local"] = Field(
        "none", description="User-level differential privacy of the shared part: 'central' (each "
        "client's update clipped to dp-clip-norm, on the server or the client, dp-clipping; the "
        "server adds N(0, (z C)^2) to the sum of the round's updates; McMahan et al. 2018, Flower's "
        "DifferentialPrivacy*FixedClipping) or 'local' (each client clips and noises its own update "
        "with the same z C before it leaves the client). Heads stay local and unnoised. Central DP "
        "averages with equal weights (its sensitivity is per client).")
    dp_clipping: Literal["server", "client"] = Field(
        "server", description="dp='central': where each update is clipped. 'server' (Flower's "
        "DifferentialPrivacyServerSideFixedClipping) or 'client' (ClientSide + fixedclipping_mod: "
        "only clipped updates reach the server). The same arithmetic either way.")
    dp_clip_norm: float = Field(
        1.0, gt=0, description="C: the L2 norm each client's update of the shared part is clipped to "
        "(the starting value with dp-adaptive-clip).")
    dp_noise_multiplier: float = Field(
        1.0, ge=0, description="z: the Gaussian noise's standard deviation over C (0 = clipping "
        "only, epsilon infinite).")
    dp_adaptive_clip: bool = Field(
        False, description="Adapt C each round towards the dp-target-quantile of the update norms "
        "(Andrew et al. 2021, Algorithm 1, with a noised count; the update noise is raised so that "
        "both together cost what z alone would).")
    dp_target_quantile: float = Field(
        0.5, gt=0, lt=1, description="dp-adaptive-clip: gamma, the share of updates meant to be left "
        "unclipped (Andrew et al.'s default 0.5).")
    dp_clip_lr: float = Field(
        0.2, gt=0, description="dp-adaptive-clip: eta_C, the geometric step of C (Andrew et al. 0.2).")
    dp_count_stddev: float = Field(
        0.0, ge=0, description="dp-adaptive-clip: sigma_b, the noise on the count of unclipped "
        "updates (0 = clients per round / 20, Andrew et al.'s recommendation).")
    dp_delta: float = Field(
        1e-5, gt=0, lt=1, description="delta at which epsilon is reported and the budget is checked.")
    dp_epsilon_budget: float = Field(
        0.0, ge=0, description="Stop before a round that would take epsilon above this (state saved; "
        "resume with a larger budget to go on); 0 = no budget.")
    dp_accountant: Literal["without-replacement", "no-amplification"] = Field(
        "without-replacement", description="How the accountant treats client sampling (dp='central'): "
        "'without-replacement' (fedrep samples a fixed-size subset each round; replace-one neighbours, "
        "sensitivity 2C, dp-accounting's SampledWithoutReplacementDpEvent) or 'no-amplification' "
        "(add/remove-one, no credit for sampling: Flower's accounted fixed-clipping mode; needs no "
        "secret sampling). dp='local' never gets sampling credit.")
    dp_noise_source: Literal["seeded", "os"] = Field(
        "seeded", description="Where the noise comes from: 'seeded' (streams of the run's seed, so a "
        "resumed run is bitwise the same; keep the seed secret, anyone who knows it can remove the "
        "noise) or 'os' (the operating system's entropy: what a deployment wants; resume is then not "
        "bitwise).")
