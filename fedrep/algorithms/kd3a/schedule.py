"""KD3A's schedules: the rising confidence gate and the rounds-per-epoch split.

Both follow the official code (github.com/FengHZ/KD3A): the gate formula is the one line in
``train/train.py::train``, the split is ``lib/utils/federated_utils.py::decentralized_training_strategy``.
"""

from __future__ import annotations

import math

# Communication rounds below one per epoch that the official code accepts: aggregate every 5 or 2 epochs.
OFFICIAL_FRACTIONAL_ROUNDS = (0.2, 0.5)


def confidence_gate(
    round_or_epoch: int, total: int, gate_begin: float = 0.9, gate_end: float = 0.95
) -> float:
    """The knowledge-vote confidence gate, rising linearly from ``gate_begin`` to ``gate_end``.

    Paper ("Knowledge Vote"): the gate starts lower and grows during training. Official ``train.py::train``:
    ``gate = (end - begin) * (epoch / total_epochs) + begin`` with a 0-based ``epoch`` in
    ``[0, total_epochs)``, so the last epoch uses ``begin + (end - begin) * (T - 1) / T``
    and ``gate_end`` itself is never reached. ``total_epochs`` there is the *rescaled* count from
    :func:`training_schedule`, i.e. the number of aggregation rounds. Pass a 0-based round (Flower's
    round 1 is ``round_or_epoch=0``); ``round_or_epoch == total`` is allowed and gives ``gate_end``.

    Official defaults: 0.9 -> 0.95 (DigitFive, Office-Caltech10, Office31, AmazonReview), 0.8 -> 0.95
    (DomainNet, MiniDomainNet).
    """
    if total <= 0:
        raise ValueError(f"confidence_gate: total must be positive, got {total}")
    if not 0 <= round_or_epoch <= total:
        raise ValueError(
            f"confidence_gate: round_or_epoch={round_or_epoch} is outside [0, {total}]; pass the 0-based "
            "round (Flower round - 1)"
        )
    return (gate_end - gate_begin) * (round_or_epoch / total) + gate_begin


def training_schedule(
    communication_rounds: float, epoch_samples: int, batch_size: int, total_epochs: int
) -> tuple[int, int]:
    """``(batches_per_round, total_rounds)`` for ``r = communication_rounds`` aggregations per epoch.

    Official ``decentralized_training_strategy``: for ``r >= 1`` an epoch of ``epoch_samples`` is cut
    into ``r`` rounds of ``round(epoch_samples / r)`` samples, and there are ``round(total_epochs * r)``
    rounds; for ``r`` in {0.2, 0.5} every round is a full epoch of sources' training repeated ``1/r``
    times by the caller (``train.py``), and there are ``round(total_epochs * r)`` rounds. Python's
    ``round`` (half to even) is kept so the counts match the official ones.
    """
    if batch_size <= 0 or epoch_samples <= 0 or total_epochs <= 0:
        raise ValueError("training_schedule: epoch_samples, batch_size and total_epochs must be positive")
    if communication_rounds >= 1:
        samples = round(epoch_samples / communication_rounds)
        return round(samples / batch_size), round(total_epochs * communication_rounds)
    if communication_rounds in OFFICIAL_FRACTIONAL_ROUNDS:
        return round(epoch_samples / batch_size), round(total_epochs * communication_rounds)
    raise ValueError(
        f"training_schedule: communication_rounds={communication_rounds} is not supported; use a value >= 1 "
        f"or one of {OFFICIAL_FRACTIONAL_ROUNDS} (the official code's choices)"
    )


def official_cosine_lr(round_index: int, total: int, lr_begin: float = 0.05, lr_end: float = 0.001) -> float:
    """The learning rate of 0-based round (epoch) ``round_index`` under the official schedule.

    Official ``main.py``: ``CosineAnnealingLR(optimizer, total_epochs, eta_min=learning_rate_end)``
    with ``learning_rate_begin`` 0.05 and ``learning_rate_end`` 0.001 (``config/DigitFive.yaml``),
    stepped as ``scheduler.step(epoch)`` *after* epoch ``epoch`` trained. The closed form
    ``eta(e) = end + (begin - end) * (1 + cos(pi * e / T)) / 2`` set by ``step(e)`` is therefore the
    rate of epoch ``e + 1``: epoch 0 and epoch 1 both train at ``begin``, epoch ``e >= 1`` at
    ``eta(e - 1)``. Kept exactly, off-by-one included."""
    if total <= 0 or not 0 <= round_index < max(total, 1) + 1:
        raise ValueError(f"official_cosine_lr: round {round_index} outside [0, {total}]")
    e = max(round_index - 1, 0)
    return lr_end + (lr_begin - lr_end) * (1 + math.cos(math.pi * e / total)) / 2
