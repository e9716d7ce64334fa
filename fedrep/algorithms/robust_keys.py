"""The keys of robust aggregation of the shared part and of the simulated attacks it is tested
against (issue 21). Declared beside the rules; :class:`fedrep.config.RunConfig` mixes them in and
checks them against the number of clients a round aggregates. Imports no torch.

There is no official FedRep code for this: the aggregators are Flower's own (``FedMedian``,
``FedTrimmedAvg``, ``Krum``, ``MultiKrum``, ``Bulyan`` in ``flwr.serverapp.strategy``; Yin et al.
2018, Blanchard et al. 2017, El Mhamdi et al. 2018), applied to the body only; heads stay local.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedrep.keys import KeySection

AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")


def aggregation_problem(aggregation: str, clients: int, trim: float, byzantine: int,
                        select: int) -> str | None:
    """Why ``aggregation`` cannot run on ``clients`` replies a round (None when it can)."""
    if aggregation == "trimmed-mean" and clients - 2 * int(trim * clients) < 1:
        return f"trims int({trim} * {clients}) from each end of {clients} clients, leaving none"
    if aggregation in ("krum", "multi-krum") and clients < 2 * byzantine + 3:
        return (f"Krum needs at least 2 * byzantine-clients + 3 = {2 * byzantine + 3} clients a round, "
                f"but a round aggregates {clients}")
    if aggregation == "multi-krum" and select > clients - byzantine:
        return f"krum-select={select} exceeds the {clients} - {byzantine} clients Multi-Krum may keep"
    if aggregation == "bulyan" and clients < 4 * byzantine + 3:
        return (f"Bulyan needs at least 4 * byzantine-clients + 3 = {4 * byzantine + 3} clients a round, "
                f"but a round aggregates {clients}")
    return None


class RobustKeys(KeySection):
    """How the server combines the clients' shared parts, and who attacks (simulation)."""

    aggregation: Literal["mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"] = Field(
        "mean", description="How the shared part (the body) is combined: 'mean' (FedRep's and "
        "FedAvg's weighted average, aggregation-weights), or a robust aggregator from Flower: "
        "'median' (FedMedian), 'trimmed-mean' (FedTrimmedAvg, trim-fraction), 'krum', 'multi-krum' "
        "(byzantine-clients, krum-select), 'bulyan'. Heads stay local whatever is chosen.")
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="trimmed-mean: share of the values cut from each end (Flower "
        "FedTrimmedAvg beta).")
    byzantine_clients: int = Field(
        0, ge=0, description="krum, multi-krum, bulyan: f, the attackers a round is assumed to hold.")
    krum_select: int = Field(
        0, ge=0, description="multi-krum: m, the updates averaged (0 = all but byzantine-clients).")
    attack: Literal["none", "label-flip", "sign-flip", "scale"] = Field(
        "none", description="Simulated attackers (attack-share of the clients, fixed by the seed): "
        "'label-flip' trains on labels C-1-y; 'sign-flip' sends global - attack-scale * (its "
        "update); 'scale' sends global + attack-scale * (its update).")
    attack_share: float = Field(0.0, ge=0, lt=1, description="Share of the clients that attack.")
    attack_scale: float = Field(
        4.0, gt=0, description="sign-flip / scale: the factor on the attacker's body update.")
