"""The paper's Section 5 linear representation task.

Client i observes ``y = x^T B* w*_i + eps`` with ``x ~ N(0, I_d)``, a ground-truth ``d x k``
representation ``B*`` (orthonormal columns) shared by all clients and a client-specific head
``w*_i ~ N(0, I_k)``. Each client's data is generated from its own seed stream, so a client process
builds only its own samples; ``B*`` comes from a stream all parties derive from the run seed.
"""

from __future__ import annotations

import numpy as np
import torch


def ground_truth_representation(dim: int, rank: int, seed: int) -> np.ndarray:
    """B*: (d, k) with orthonormal columns."""
    rng = np.random.default_rng([seed, 0xB5])
    q, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
    return q


def client_linear_data(
    client: int,
    dim: int,
    rank: int,
    num_train: int,
    num_test: int,
    noise: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (m, d), y_train (m, 1), x_test (m', d), y_test (m', 1)) as float32 tensors."""
    b_star = ground_truth_representation(dim, rank, seed)
    rng = np.random.default_rng([seed, 0x11, client])
    w_star = rng.standard_normal(rank)
    x = rng.standard_normal((num_train + num_test, dim))
    y = x @ b_star @ w_star + noise * rng.standard_normal(num_train + num_test)
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(y.astype(np.float32)).unsqueeze(1)
    return xt[:num_train], yt[:num_train], xt[num_train:], yt[num_train:]


def principal_angle_distance(b_hat: np.ndarray | torch.Tensor, b_star: np.ndarray) -> float:
    """dist(B_hat, B*) = || B_hat_perp^T B*_orth ||_2, the sine of the largest principal angle
    between the column spaces (paper Sec. 5; 0 = same subspace, 1 = orthogonal)."""
    b_hat = np.asarray(b_hat.detach().cpu() if isinstance(b_hat, torch.Tensor) else b_hat, float)
    q_hat, _ = np.linalg.qr(b_hat)
    q_star, _ = np.linalg.qr(np.asarray(b_star, float))
    residual = q_star - q_hat @ (q_hat.T @ q_star)
    return float(np.linalg.norm(residual, ord=2))
