"""KD3A (Feng et al., ICML 2021, "KD3A: Unsupervised Multi-Source Decentralized Domain Adaptation via
Knowledge Distillation"): the math, in plain PyTorch, checked against the official code
(github.com/FengHZ/KD3A, ``lib/utils/federated_utils.py`` and ``train/train.py``).

One round, as the official ``train`` runs it (index 0 is the target domain, 1..S the sources):

1. each source trains its feature extractor and own classifier on its labelled data;
2. the target votes the sources' predictions into a consensus (:func:`knowledge_vote`, gate from
   :func:`confidence_gate`), trains on it with :func:`mixup` and :func:`target_distillation_loss`;
3. consensus focus of every source (:func:`consensus_focus_exact`) and the target's passed fraction
   give the round's :func:`domain_weights`, smoothed by :func:`moving_average_weights`;
4. the feature extractors are averaged with those weights, BN statistics included
   (:func:`aggregate_state_dicts`); classifiers stay local.

Modules: :mod:`.schedule`, :mod:`.vote`, :mod:`.consensus`, :mod:`.weights`, :mod:`.batchnorm`,
:mod:`.distill`.
"""

from fedrep.algorithms.kd3a.batchnorm import (
    BNStats,
    batch_statistics,
    bn_mmd_loss,
    bn_statistics_from_state,
    collect_bn_inputs,
    weighted_bn_statistics,
)
from fedrep.algorithms.kd3a.consensus import (
    consensus_focus_exact,
    consensus_focus_leave_one_out,
    consensus_focus_monte_carlo,
    consensus_quality,
    shapley_from_qualities,
    subset_qualities,
)
from fedrep.algorithms.kd3a.distill import MixedBatch, mixup, sample_mixup_lambda, target_distillation_loss
from fedrep.algorithms.kd3a.schedule import confidence_gate, training_schedule
from fedrep.algorithms.kd3a.vote import KnowledgeVote, confident_ballots, knowledge_vote
from fedrep.algorithms.kd3a.weights import (
    aggregate_state_dicts,
    domain_weights,
    initial_domain_weights,
    moving_average_weights,
)
from fedrep.models.base import is_bn_buffer

# The official consensus focus is the exact Shapley value.
consensus_focus_official = consensus_focus_exact

__all__ = [
    "BNStats",
    "KnowledgeVote",
    "MixedBatch",
    "aggregate_state_dicts",
    "batch_statistics",
    "bn_mmd_loss",
    "bn_statistics_from_state",
    "collect_bn_inputs",
    "confidence_gate",
    "confident_ballots",
    "consensus_focus_exact",
    "consensus_focus_leave_one_out",
    "consensus_focus_monte_carlo",
    "consensus_focus_official",
    "consensus_quality",
    "domain_weights",
    "initial_domain_weights",
    "is_bn_buffer",
    "knowledge_vote",
    "mixup",
    "moving_average_weights",
    "sample_mixup_lambda",
    "shapley_from_qualities",
    "subset_qualities",
    "target_distillation_loss",
    "training_schedule",
    "weighted_bn_statistics",
]
