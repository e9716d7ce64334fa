"""Knowledge vote (KD3A paper, section "Knowledge Vote"; official
``lib/utils/federated_utils.py::knowledge_vote``).

Every source model predicts class probabilities for each target sample; the vote turns these ``S``
opinions into one consensus label per sample, plus a 0/1 weight that drops the samples nobody is
sure about. What the official code does, step by step (shapes with ``S`` sources, ``N`` samples,
``C`` classes; the official tensor is laid out ``[N, S, C]``, here it is ``[S, N, C]``):

1. Each source's ballot is its max-probability ``m[s, n]`` for its arg-max class ``c[s, n]``.
2. A source is *confident* on a sample if ``m[s, n] > gate`` (strict).
3. If at least one source is confident, only confident sources vote (the others' ballots become 0).
   If none is, *all* sources vote with their unmasked ballots (official comment: "to solve the
   [0,0,0] situation"); such a sample nevertheless gets weight 0 (step 5).
4. Each class collects the sum of the ballots cast for it; the consensus class is the arg-max and
   the consensus *confidence* is that sum, i.e. ``n_i * mean confidence`` of the supporting sources.
   Since confident ballots lie in ``(gate, 1]``, for ``gate >= 0.5`` this is a majority vote whose
   ties are broken by summed confidence.
5. The weight of sample ``n`` is ``1[max_s m[s, n] > gate]`` (a float 0/1 mask, not the confidence).
6. The consensus *knowledge* distilled into the target is the **one-hot** consensus class.

The paper describes step 6 as a "mean ensemble" of the supporting sources' predictions, a soft
label; ``soft=True`` gives that variant (mean of the full probability vectors of the sources that
back the consensus class), the default follows the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KnowledgeVote:
    """Outcome of :func:`knowledge_vote` for ``N`` target samples and ``C`` classes.

    consensus:       [N, C] one-hot consensus class (official), or the supporters' mean prediction
                     (``soft=True``, paper's wording).
    label:           [N] long, the consensus class.
    confidence:      [N] sum of the ballots for the consensus class: the summed max-probabilities of
                     the confident sources that predicted it (for samples with no confident source, the
                     official fallback sum over all sources that predicted it).
    weight:          [N] float 0/1: 1 where at least one source passed the gate.
    num_supporting:  [N] long, ``n_i``: confident sources that predicted the consensus class (0 when
                     nobody passed the gate).
    passed_fraction: mean of ``weight``, the share of samples with a usable consensus.
    """

    consensus: Tensor
    label: Tensor
    confidence: Tensor
    weight: Tensor
    num_supporting: Tensor
    passed_fraction: float


def check_source_probs(source_probs: Tensor) -> None:
    """Raise a ValueError unless ``source_probs`` is a floating ``[S, N, C]`` tensor with S, N, C >= 1."""
    if source_probs.dim() != 3:
        raise ValueError(
            f"source_probs must be [sources, samples, classes], got shape {tuple(source_probs.shape)}"
        )
    if not source_probs.is_floating_point():
        raise ValueError(f"source_probs must be floating point probabilities, got {source_probs.dtype}")
    if min(source_probs.shape) == 0:
        raise ValueError(f"source_probs has an empty dimension: shape {tuple(source_probs.shape)}")


def source_ballots(source_probs: Tensor) -> tuple[Tensor, Tensor]:
    """``(max_prob [S, N], predicted_class [S, N])`` of every source on every sample.

    Ties inside one source's prediction go to the lowest class index (``argmax``'s documented rule)."""
    predicted = source_probs.argmax(dim=2)
    max_prob = source_probs.gather(2, predicted.unsqueeze(2)).squeeze(2)
    return max_prob, predicted


def confident_ballots(source_probs: Tensor, gate: float) -> Tensor:
    """[S, N, C]: ``m[s, n]`` at the predicted class of a confident source, 0 everywhere else.

    Summing over sources gives the per-class vote of the confident sources; the max over classes of
    that sum is the official ``consensus_knowledge_conf * consensus_knowledge_mask`` (0 for samples
    with no confident source), which is what consensus quality adds up."""
    check_source_probs(source_probs)
    max_prob, predicted = source_ballots(source_probs)
    confident = max_prob > gate
    ballots = torch.zeros_like(source_probs)
    ballots.scatter_(2, predicted.unsqueeze(2), (max_prob * confident).unsqueeze(2))
    return ballots


def knowledge_vote(source_probs: Tensor, gate: float, soft: bool = False) -> KnowledgeVote:
    """Vote the sources' predictions ``source_probs`` [S, N, C] into a consensus (see module docstring).

    ``gate`` is the confidence gate (:func:`~fedrep.algorithms.kd3a.schedule.confidence_gate`).
    Ties between classes go to the lowest class index. Official: ``knowledge_vote``.
    """
    check_source_probs(source_probs)
    num_classes = source_probs.shape[2]
    max_prob, predicted = source_ballots(source_probs)
    confident = max_prob > gate  # [S, N]
    anyone_confident = confident.any(dim=0)  # [N]
    # Official fallback: with no confident source every source votes, unmasked.
    voters = confident | ~anyone_confident.unsqueeze(0)
    ballots = torch.zeros_like(source_probs)
    ballots.scatter_(2, predicted.unsqueeze(2), (max_prob * voters).unsqueeze(2))
    class_scores = ballots.sum(dim=0)  # [N, C]
    label = class_scores.argmax(dim=1)
    confidence = class_scores.gather(1, label.unsqueeze(1)).squeeze(1)
    weight = anyone_confident.to(source_probs.dtype)
    supporters = voters & (predicted == label.unsqueeze(0))  # [S, N]
    num_supporting = (supporters & confident).sum(dim=0)
    if soft:
        backing = supporters.to(source_probs.dtype).unsqueeze(2)
        consensus = (source_probs * backing).sum(dim=0) / backing.sum(dim=0).clamp_min(1.0)
    else:
        consensus = torch.nn.functional.one_hot(label, num_classes).to(source_probs.dtype)
    return KnowledgeVote(
        consensus=consensus,
        label=label,
        confidence=confidence,
        weight=weight,
        num_supporting=num_supporting,
        passed_fraction=float(weight.mean()),
    )
