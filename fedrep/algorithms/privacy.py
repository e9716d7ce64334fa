"""The arithmetic of user-level differential privacy on the shared part (plain NumPy, no Flower).

What is private is a client's *update* of the shared arrays, ``trained - sent`` (for FedRep the
body; heads never leave the client). Each update is clipped to L2 norm ``C`` over all its floating
arrays together (flat clipping, McMahan et al. 2018, as Flower's ``compute_clip_model_update``),
then Gaussian noise is added: once to the round's sum on the server (central DP) or by each client
to its own update (local DP). Integer arrays (BatchNorm's batch counter) count batches, which
depends on the data: under DP they are not released; the global value is kept.

Why not Flower's noise helpers: ``flwr.supercore.differential_privacy.add_gaussian_noise_inplace``
draws from NumPy's global generator, so a resumed run could not be bitwise the run it continues, and
two simulated clients in one process would share a stream. Here every draw comes from a generator
named by (seed, round, party), or from the OS when the run asks for unpredictable noise.

Adaptive clipping follows Andrew et al. (NeurIPS 2021), Algorithm 1: ``b_i = [||Delta_i|| <= C]``,
``b = (sum b_i + N(0, sigma_b^2)) / k``, ``C <- C exp(-eta (b - gamma))``. (Flower 1.41's adaptive
wrappers count *clipped* updates in that formula, which moves C the wrong way: more clipping makes
C smaller still. Not used for that reason.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedrep.algorithms.aggregate import weighted_average

DP_SALT = 0xD1FF  # keeps the noise streams apart from every other stream of the run's seed
# The streams of a round: the server's noise, its count noise, and CLIENT_NOISE + partition.
SERVER_NOISE, COUNT_NOISE, CLIENT_NOISE = 0, 1, 2

Arrays = Mapping[str, np.ndarray]


def _released(value: np.ndarray) -> bool:
    """Whether DP releases this array (floating arrays only; see the module note)."""
    return bool(np.issubdtype(value.dtype, np.floating))


def update_norm(sent: Arrays, trained: Arrays) -> float:
    """L2 norm of ``trained - sent`` over all floating arrays together (in float64)."""
    total = 0.0
    for key, value in trained.items():
        if _released(value):
            diff = np.asarray(value, dtype=np.float64) - np.asarray(sent[key], dtype=np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


@dataclass(frozen=True)
class Clipped:
    """One client's update after clipping: the arrays to aggregate, and its norm before."""

    arrays: dict[str, np.ndarray]
    norm: float

    def unclipped(self, clip_norm: float) -> bool:
        return self.norm <= clip_norm


def clip_update(sent: Arrays, trained: Arrays, clip_norm: float) -> Clipped:
    """``sent + min(1, C / ||Delta||) Delta`` for the floating arrays; integer arrays are ``sent``'s."""
    norm = update_norm(sent, trained)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for key, value in trained.items():
        base = np.asarray(sent[key])
        if not _released(value):
            out[key] = base.copy()
        elif factor == 1.0:
            out[key] = np.array(value, copy=True)
        else:
            out[key] = (base + (np.asarray(value) - base) * factor).astype(value.dtype, copy=False)
    return Clipped(out, norm)


def noise_generator(seed: int, source: str, server_round: int, stream: int) -> np.random.Generator:
    """The generator of one round's noise for one party: seeded by (seed, round, stream) so a
    resumed run draws the same noise, or from the OS (``dp-noise-source = "os"``)."""
    if source == "os":
        return np.random.default_rng()
    return np.random.default_rng([seed, DP_SALT, server_round, stream])


def add_noise(arrays: Arrays, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``arrays`` plus independent N(0, std^2) on every floating value, in key order (float64
    draws cast to each array's dtype); integer arrays unchanged."""
    out = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if _released(value) and std > 0:
            out[key] = (value + rng.normal(0.0, std, value.shape).astype(value.dtype)).astype(value.dtype)
        else:
            out[key] = np.array(value, copy=True)
    return out


def noised_mean(sent: Arrays, clipped: Sequence[Clipped], noise_multiplier: float, clip_norm: float,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Central DP's release: the equal-weight mean of the clipped updates plus N(0, (z C / k)^2)
    per value, i.e. noise z C on their sum (sensitivity C per client); integer arrays are ``sent``'s."""
    k = len(clipped)
    mean = weighted_average([(c.arrays, 1.0) for c in clipped])
    noised = add_noise(mean, noise_multiplier * clip_norm / k, rng)
    return {key: value if _released(value) else np.array(sent[key], copy=True)
            for key, value in noised.items()}


def local_release(sent: Arrays, trained: Arrays, clip_norm: float, noise_multiplier: float,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Local DP: what a client sends instead of ``trained``: its clipped update plus N(0, (z C)^2)
    per value, on top of ``sent``."""
    return add_noise(clip_update(sent, trained, clip_norm).arrays, noise_multiplier * clip_norm, rng)


# -- adaptive clipping (Andrew et al. 2021) ------------------------------------------------------

def count_stddev(configured: float, per_round: int) -> float:
    """sigma_b: as configured, or clients per round / 20 (Andrew et al.'s recommendation)."""
    return configured if configured > 0 else per_round / 20


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """z_Delta such that the update noise and the count noise together cost what z alone would:
    ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021, Sec. 3.1)."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_std <= noise_multiplier:
        raise ValueError(f"dp-count-stddev={count_std:g} is too small for dp-noise-multiplier="
                         f"{noise_multiplier:g}: adaptive clipping needs 2 * sigma_b > z; raise "
                         "dp-count-stddev (or sample more clients a round)")
    return (noise_multiplier ** -2 - (2 * count_std) ** -2) ** -0.5


def next_clip_norm(clip_norm: float, unclipped: int, k: int, count_std: float, lr: float,
                   target_quantile: float, rng: np.random.Generator) -> tuple[float, float]:
    """The next round's C and the noised share of unclipped updates it was computed from."""
    share = (unclipped + rng.normal(0.0, count_std)) / k
    return clip_norm * math.exp(-lr * (share - target_quantile)), share
