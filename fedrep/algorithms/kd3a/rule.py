"""KD3A's client half: what a source and what the target do in one round (plain PyTorch).

Partition 0 is the target domain (its train labels are withheld: -1), partitions 1..S the
labelled sources (``name*k`` in ``source-domains`` gives one domain k nodes, which split its data).
A deployed node may declare ``role="source"`` or ``role="target"`` in its node config; a role that
contradicts its partition stops the round with the fix. Every party holds a full model; the
feature extractor (``body``) is the shared, domain-weighted aggregate, the classifier (``head``)
stays with its party (official code).

* ``kd3a_source``: train body + head on the labelled data for 1/r of an epoch (``rounds-per-epoch``
  r, the paper's communication rounds per epoch), return the whole model: the target needs the
  source's classifier to vote.
* ``kd3a_target``: take the S source models, and for 1/r of an epoch over the unlabelled data vote
  per batch (knowledge vote with the round's confidence gate), train on the consensus with mixup,
  accumulate each subset's consensus quality for consensus focus; optionally add the paper's
  BN-MMD loss. Return the body and the round's statistics (passed fraction, focus per source).

The teachers (source models on the target) vote in training mode, as the official code's
``model.train()`` has them do: each normalises a target batch with that batch's own statistics,
which removes most of a domain's first- and second-moment shift before the vote. Their running
statistics then track the target's data as seen through each source's weights; the official
``federated_average`` averages exactly those (the models share one process there), so the target
sends them back (``source-<pid>-bn``, a few kB) and the server averages them in place of the
sources' own BN statistics.

The source-only baseline (``mode = "source-only"``) is FedAvg over the sources: whole models are
averaged and the target only evaluates the global model.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedrep.algorithms.base import ClientUpdateRule, all_params
from fedrep.algorithms.kd3a.batchnorm import bn_mmd_loss, bn_statistics_from_state, collect_bn_inputs
from fedrep.algorithms.kd3a.consensus import (
    consensus_focus_monte_carlo,
    shapley_from_qualities,
    subset_qualities,
)
from fedrep.algorithms.kd3a.distill import mixup, target_distillation_loss
from fedrep.algorithms.kd3a.schedule import official_cosine_lr, training_schedule
from fedrep.algorithms.kd3a.vote import knowledge_vote
from fedrep.algorithms.training import Phase, make_optimizer, shuffled_batches
from fedrep.data.domains_spec import MULTI_DOMAIN
from fedrep.data.federated import ClientData
from fedrep.models.base import SplitModel, is_bn_buffer
from fedrep.protocol import (
    GATE,
    LOCAL_STEPS,
    NODE_ROLE,
    NUM_EXAMPLES,
    PASSED_FRACTION,
    SERVER_ROUND,
    SOURCE_WEIGHTS,
    TRAIN_LOSS,
    ActionResult,
    focus_key,
    source_of_record,
    teacher_bn_record,
)

SOURCE_ACTION, TARGET_ACTION = "kd3a_source", "kd3a_target"  # Flower: identifiers
TARGET_PARTITION = 0


class KD3AOptions(BaseModel):
    """KD3A's hyper-parameters (``strategy-options``); defaults from the official Digit-5 config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["kd3a", "source-only"] = Field(
        "kd3a", description="'source-only': FedAvg over the sources, the target just evaluates.")
    rounds_per_epoch: float = Field(
        1.0, gt=0, description="r, communication rounds per local epoch (paper: 0.2, 0.5, 1, N).")
    gate_begin: float = Field(0.9, gt=0, lt=1, description="Confidence gate at the first round.")
    gate_end: float = Field(0.95, gt=0, lt=1, description="Confidence gate approached at the last round.")
    consensus_focus: bool = Field(True, description="false: sources share the weight equally (ablation).")
    focus_estimator: Literal["exact", "monte-carlo"] = Field(
        "exact", description="Shapley consensus focus over all 2^S subsets, or by sampled permutations.")
    permutations: int = Field(64, ge=1, description="Permutations per batch for 'monte-carlo'.")
    batchnorm: Literal["aggregate", "mmd-loss", "local"] = Field(
        "aggregate", description="'aggregate': BN statistics averaged with the domain weights (official "
        "BN-MMD); 'mmd-loss': that plus the paper's BN-MMD loss on the target; 'local': BN statistics "
        "never leave a party (ablation without BN-MMD).")
    teacher_batchnorm: Literal["target-batch", "running"] = Field(
        "target-batch", description="'target-batch': source models vote in training mode, normalising "
        "each target batch with its own statistics (official); 'running': with the sources' own "
        "running statistics (ablation).")
    mmd_weight: float = Field(1.0, ge=0, description="Weight of the BN-MMD loss in 'mmd-loss'.")
    mixup_alpha: float = Field(2.0, gt=0, description="Beta(alpha, alpha) mixup on the target (official 2).")
    weight_momentum: float = Field(
        0.9, ge=0, lt=1, description="Moving average of domain weights across rounds (official 0.9).")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="'cosine': the official schedule, lr_begin annealed to lr_end over the "
        "run (main.py CosineAnnealingLR, config/DigitFive.yaml 0.05 -> 0.001); 'constant': the run's lr "
        "every round (fedrep before 0.9).")
    lr_begin: float = Field(0.05, gt=0, description="'cosine': the first rounds' learning rate.")
    lr_end: float = Field(0.001, gt=0, description="'cosine': the learning rate approached at the end.")
    optimizer_state: Literal["persistent", "per-round"] = Field(
        "persistent", description="'persistent': each party keeps its SGD momentum across rounds, as the "
        "official per-model optimisers do (main.py builds them once), stored with its personal state; "
        "'per-round': a fresh optimiser each round (fedrep before 0.9).")
    target_passes: Literal["one", "as-sources"] = Field(
        "one", description="With rounds_per_epoch < 1 the sources train 1/r epochs per round; 'one': the "
        "target one epoch (official train.py); 'as-sources': 1/r epochs too (fedrep before 0.9).")


class WithMomentum(SplitModel):
    """The party's model plus its SGD momentum buffers, one per parameter, as buffers of a
    ``momentum`` submodule: they are state-dict entries, so they are personal (never shared) and
    saved, restored and resumed with the party's other personal state."""

    def __init__(self, model: SplitModel) -> None:
        super().__init__(model.body, model.head)
        self.task = model.task
        self.momentum = nn.Module()
        for name, param in model.named_parameters():
            self.momentum.register_buffer(_buffer_name(name), torch.zeros_like(param))

    def load_into(self, optimizer: torch.optim.Optimizer) -> None:
        for name, param in self._params():
            optimizer.state[param]["momentum_buffer"] = getattr(self.momentum, _buffer_name(name)).clone()

    def keep_from(self, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for name, param in self._params():
                buf = optimizer.state.get(param, {}).get("momentum_buffer")
                if buf is not None:
                    getattr(self.momentum, _buffer_name(name)).copy_(buf)

    def _params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("momentum.")]


def _buffer_name(param: str) -> str:
    return param.replace(".", "__")


def local_batches(num_samples: int, batch_size: int, rounds_per_epoch: float) -> int:
    """Batches a party trains per round: :func:`~fedrep.algorithms.kd3a.schedule.training_schedule`
    (the official ``decentralized_training_strategy``) with the party's own samples as the epoch,
    r >= 1 cutting an epoch into r rounds; r < 1 repeats the epoch 1/r times (official ``train.py``
    for the sources). At least one batch."""
    if rounds_per_epoch >= 1:
        per_round, _ = training_schedule(rounds_per_epoch, num_samples, batch_size, 1)
        return max(1, per_round)
    per_epoch, _ = training_schedule(1, num_samples, batch_size, 1)
    return max(1, per_epoch * round(1 / rounds_per_epoch))


def _batches(n: int, batch_size: int, count: int, generator: torch.Generator):
    """``count`` index batches (r rounds per epoch makes this a fraction of a pass, or several),
    reshuffling at every pass over the data."""
    done = 0
    while 0 < n and done < count:
        before = done
        for idx in shuffled_batches(n, batch_size, generator, min_size=2):  # BatchNorm: two or more
            yield idx
            done += 1
            if done == count:
                return
        if done == before:  # no batch of two fits (batch-size=1): stop, never spin
            return


class KD3ARule(ClientUpdateRule):
    """Client rule for every KD3A party; the action says which role a message asks for."""

    options: KD3AOptions
    needs_labels_everywhere = False  # the target learns from the sources' vote

    def check(self, model: SplitModel) -> None:
        if self.cfg.dataset not in MULTI_DOMAIN:  # it needs a target domain and labelled sources
            raise ValueError(f"dataset={self.cfg.dataset!r}: kd3a needs a multi-domain data set, "
                             f"one of {list(MULTI_DOMAIN)}; set dataset=\"fmnist-domains\"")
        super().check(model)

    def prepare_model(self, model: SplitModel) -> SplitModel:
        return WithMomentum(model) if self.options.optimizer_state == "persistent" else model

    def shared_keys(self, model: SplitModel) -> list[str]:
        if self.options.mode == "source-only":
            return [k for k in model.state_dict() if not k.startswith("momentum.")]
        keys = model.representation_keys()
        if self.options.batchnorm == "local":
            keys = [k for k in keys if not is_bn_buffer(k)]
        return keys

    def phases(self, model: SplitModel) -> list[Phase]:
        return [Phase(all_params(model), self.cfg.local_epochs)]

    def finetune_and_evaluate(self, model, data, epochs, generator):  # noqa: ANN001 - base signature
        """No fine-tuning: the target has no labels to fine-tune on."""
        return self.evaluate(model, data, generator)

    def act(self, action: str, model: SplitModel, data: ClientData, partition: int,
            inputs: dict[str, dict[str, torch.Tensor]], config: dict, generator: torch.Generator
            ) -> ActionResult:
        role = "target" if partition == TARGET_PARTITION else "source"
        declared = config.get(NODE_ROLE)
        if declared is not None and declared != role:
            raise RuntimeError(f"this node's config says role={declared!r}, but partition {partition} is "
                               f"a {role} (partition 0 is the target); fix the node's --node-config")
        if action == SOURCE_ACTION:
            if partition == TARGET_PARTITION:
                raise RuntimeError("the target (partition 0) got a source task; it has no labels")
            return self.train_source(model, data, generator, config)
        if action == TARGET_ACTION:
            if partition != TARGET_PARTITION:
                raise RuntimeError(f"partition {partition} is a source but got the target task")
            weights = torch.tensor([float(w) for w in config[SOURCE_WEIGHTS]])
            return self.adapt_target(model, data, inputs, float(config[GATE]), weights, generator, config)
        raise ValueError(f"KD3A has no action {action!r}")

    def round_lr(self, server_round: int) -> float:
        """This round's learning rate (``lr_schedule``); Flower rounds are 1-based."""
        if self.options.lr_schedule == "constant":
            return self.cfg.lr
        return official_cosine_lr(server_round - 1, self.cfg.num_rounds, self.options.lr_begin,
                                  self.options.lr_end)

    def _optimizer(self, model: SplitModel, config: dict) -> torch.optim.Optimizer:
        """SGD at this round's rate, resuming the party's momentum when it keeps one."""
        lr = self.round_lr(int(config.get(SERVER_ROUND, 1)))
        optimizer = make_optimizer(model, self.cfg.model_copy(update={"lr": lr}))
        if isinstance(model, WithMomentum) and self.cfg.momentum > 0:
            model.load_into(optimizer)
        return optimizer

    # -- sources ----------------------------------------------------------------------------------
    def train_source(self, model: SplitModel, data: ClientData, generator: torch.Generator,
                     config: dict | None = None) -> ActionResult:
        count = local_batches(data.num_train, self.cfg.batch_size, self.options.rounds_per_epoch)
        optimizer = self._optimizer(model, config or {})
        model.train()
        total, seen = 0.0, 0
        for idx in _batches(data.num_train, self.cfg.batch_size, count, generator):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        if isinstance(model, WithMomentum):
            model.keep_from(optimizer)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()
                 if not k.startswith("momentum.")}  # the network; the momentum stays home
        return ActionResult(state, {TRAIN_LOSS: total / max(seen, 1), NUM_EXAMPLES: data.num_train,
                                    LOCAL_STEPS: count})

    # -- target -----------------------------------------------------------------------------------
    def adapt_target(self, model: SplitModel, data: ClientData, sources: dict[str, dict[str, torch.Tensor]],
                     gate: float, source_weights: torch.Tensor, generator: torch.Generator,
                     config: dict | None = None) -> ActionResult:
        """One round of target adaptation; ``sources`` maps 'source-<pid>' to a full state dict.

        Never reads ``data.y_train`` (withheld labels)."""
        names = sorted(sources, key=source_of_record)
        vote_on_target_batches = self.options.teacher_batchnorm == "target-batch"
        teachers = []
        for name in names:
            teacher = copy.deepcopy(SplitModel(model.body, model.head))  # the network, not our momentum
            teacher.load_state_dict(sources[name])
            teacher.train(vote_on_target_batches)  # copies: their running statistics are ours to update
            teachers.append(teacher)
        source_bn = [bn_statistics_from_state(sources[n]) for n in names]
        r = self.options.rounds_per_epoch
        one_pass = r < 1 and self.options.target_passes == "one"  # official: only the sources repeat
        count = local_batches(data.num_train, self.cfg.batch_size, 1.0 if one_pass else r)
        optimizer = self._optimizer(model, config or {})
        model.train()
        num_sources = len(names)
        qualities = torch.zeros(2 ** num_sources, dtype=torch.float64)
        focus_mc = torch.zeros(num_sources, dtype=torch.float64)
        passed, seen, total = 0.0, 0, 0.0
        for idx in _batches(data.num_train, self.cfg.batch_size, count, generator):
            x = data.x_train[idx]
            with torch.no_grad():
                probs = torch.stack([torch.softmax(t(x), dim=1) for t in teachers])  # [S, B, C]
            vote = knowledge_vote(probs, gate)
            if self.options.focus_estimator == "exact":
                qualities += subset_qualities(probs, gate)
            else:
                focus_mc += consensus_focus_monte_carlo(probs, gate, self.options.permutations, generator)
            mixed = mixup(x, vote.consensus, vote.weight, self.options.mixup_alpha, generator)
            optimizer.zero_grad(set_to_none=True)
            if self.options.batchnorm == "mmd-loss":
                with collect_bn_inputs(model) as target_stats:
                    logits = model(mixed.x)
                mmd = bn_mmd_loss(target_stats, source_bn, source_weights, per_channel_mean=True)
                distill = target_distillation_loss(logits, mixed.labels, mixed.weights)
                loss = distill + self.options.mmd_weight * mmd
            else:
                loss = target_distillation_loss(model(mixed.x), mixed.labels, mixed.weights)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            passed += float(vote.weight.sum())
            seen += len(idx)
        focus = shapley_from_qualities(qualities) if self.options.focus_estimator == "exact" else focus_mc
        if isinstance(model, WithMomentum):
            model.keep_from(optimizer)
        state = model.state_dict()
        metrics: dict[str, float | int] = {TRAIN_LOSS: total / max(seen, 1), NUM_EXAMPLES: data.num_train,
                                           PASSED_FRACTION: passed / max(seen, 1), LOCAL_STEPS: count}
        for name, value in zip(names, focus.tolist(), strict=True):
            metrics[focus_key(source_of_record(name))] = float(value)
        extra: dict[str, dict[str, torch.Tensor]] = {}
        if vote_on_target_batches and self.options.batchnorm != "local":
            for name, teacher in zip(names, teachers, strict=True):
                extra[teacher_bn_record(source_of_record(name))] = {
                    k: v.detach().clone() for k, v in teacher.state_dict().items() if is_bn_buffer(k)}
        return ActionResult({k: state[k].detach().clone() for k in self.shared_keys(model)}, metrics, extra)
