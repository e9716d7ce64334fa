"""The shared, boring training loop. Algorithms differ only in which parameters each phase trains.

No DataLoader: a client's data is already one tensor pair in memory, and index batching with an
explicit ``torch.Generator`` keeps shuffles reproducible per (seed, round, client) without
touching global RNG state, which is what makes resumed runs match uninterrupted ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedrep.algorithms.linear_head import linear_head_epochs, supports_closed_form
from fedrep.config import RunConfig
from fedrep.models.base import SplitModel, is_batchnorm


@dataclass(frozen=True)
class Phase:
    """Train exactly ``trainable`` (parameter names) for ``epochs`` epochs; all else is frozen.

    ``forward`` replaces ``model(x)`` (Ditto trains a second, personal network); ``penalty`` is
    added to each batch loss (FedProx's and Ditto's proximal terms)."""

    trainable: frozenset[str]
    epochs: int
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    penalty: Callable[[], torch.Tensor] | None = None


@dataclass(frozen=True)
class LocalResult:
    num_examples: int
    loss: float  # mean of the per-epoch train losses, all phases (official code); nan if no step
    steps: int


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float | None  # None for regression


# round_generator purposes: each use of randomness in a round draws its own stream.
TRAIN, FINETUNE, EVAL = 0, 1, 2


def round_generator(seed: int, server_round: int, client: int, purpose: int = 0) -> torch.Generator:
    """Independent, reproducible stream per (run seed, round, client, purpose)."""
    state = np.random.SeedSequence([seed, server_round, client, purpose]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def loss_fn(model: SplitModel, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if model.task == "regression":
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """SGD with momentum, weight decay on weights only (official ``LocalUpdate.train``). One
    optimizer spans all phases of a local update, as in the official code."""
    weights = [p for n, p in model.named_parameters() if "bias" not in n.rsplit(".", 1)[-1]]
    biases = [p for n, p in model.named_parameters() if "bias" in n.rsplit(".", 1)[-1]]
    return torch.optim.SGD(
        [
            {"params": weights, "weight_decay": cfg.weight_decay},
            {"params": biases, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )


def set_trainable(model: nn.Module, trainable: Iterable[str]) -> None:
    wanted = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in wanted)


def _head_only(model: SplitModel, trainable: frozenset[str]) -> bool:
    head = {f"head.{name}" for name, _ in model.head.named_parameters()}
    return bool(trainable) and trainable <= head


def batchnorm_layers(model: nn.Module) -> tuple[str, ...]:
    """Module names of every BatchNorm layer (1d, 2d, 3d, sync), in model order."""
    return tuple(name for name, m in model.named_modules() if is_batchnorm(m))


def min_batch_size(model: nn.Module) -> int:
    """BatchNorm cannot normalise a batch of one sample in training mode, so a model with any
    BatchNorm layer trains on batches of at least two."""
    return 2 if batchnorm_layers(model) else 1


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator,
                     min_size: int = 1) -> Iterator[torch.Tensor]:
    """One pass over ``n`` samples in a fresh order, as index batches. The trailing batch is
    dropped when it is smaller than ``min_size`` (see :func:`min_batch_size`), unless the data
    holds fewer samples than that and there is no other batch to train on."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < min_size and n >= min_size:
            continue
        yield idx


@torch.no_grad()
def body_features(model: SplitModel, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """The body's output for every sample, ``chunk`` samples at a time: small chunks keep a
    conv body's activations in cache (on this CPU the paper's CNN takes 0.09 s for 600 images in
    chunks of 64, 0.18 s in one chunk)."""
    return torch.cat([model.body(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def uses_channels_last(model: nn.Module, x: torch.Tensor, enabled: bool) -> bool:
    """Whether a local update or evaluation runs in channels-last memory format: images (4-D
    inputs) on the CPU through a model with 2-D convolutions, unless the run turned it off. (On a
    GPU the layout is left as it is: its speed there is unmeasured, no GPU having been lent.)"""
    return (enabled and x.dim() == 4 and x.device.type == "cpu"
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


@contextmanager
def memory_layout(model: nn.Module, x: torch.Tensor, enabled: bool) -> Iterator[torch.Tensor]:
    """Run the block with the model's conv weights and the images ``x`` in channels-last memory
    format, then put the weights back in PyTorch's default layout (so state dicts, messages and
    checkpoints never see the difference). oneDNN's convolutions are much faster in that layout on
    CPUs: on this machine 3.7x on the paper's CNN forward pass and 1.38x on a training epoch
    (``python -m bench.local_update``). The values are the same up to float reassociation;
    ``channels-last=false`` keeps the default."""
    if not uses_channels_last(model, x, enabled):
        yield x
        return
    # Only the conv weights change layout (Module.to walks every parameter and buffer, which
    # costs more than a one-batch update of a tiny client); ``.data`` keeps the Parameter objects.
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    # ``.to(memory_format=...)``, not ``.contiguous(...)``: a one-channel tensor (a greyscale
    # batch, the first conv's weight) counts as contiguous in both layouts, so ``.contiguous``
    # would leave its strides, and oneDNN would pick its slow path for the whole network.
    for weight in weights:
        weight.data = weight.data.to(memory_format=torch.channels_last)
    try:
        yield x.to(memory_format=torch.channels_last)
    finally:
        for weight in weights:
            weight.data = weight.data.to(memory_format=torch.contiguous_format)


def run_phases(
    model: SplitModel,
    x: torch.Tensor,
    y: torch.Tensor,
    phases: Iterable[Phase],
    cfg: RunConfig,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> LocalResult:
    """Run the phases in order with one optimizer; ``augment`` (CIFAR's crop + flip) transforms
    each train batch with draws from ``generator``.

    A phase that trains only the head, on a body without dropout or batch statistics and on
    inputs that are not augmented, sees the same body output for a sample in every epoch; those
    features are computed once and the epochs run on the head alone (exact up to float
    reassociation; ``cache-head-features=false`` turns it off). For FedRep's tau_h=10 head
    epochs this removes most of the local FLOPs."""
    with memory_layout(model, x, cfg.channels_last) as x:
        return _run_phases(model, x, y, phases, cfg, generator, augment)


def _run_phases(model: SplitModel, x: torch.Tensor, y: torch.Tensor, phases: Iterable[Phase],
                cfg: RunConfig, generator: torch.Generator,
                augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None) -> LocalResult:
    optimizer = make_optimizer(model, cfg)
    model.train()
    n, min_size = len(y), min_batch_size(model)
    steps, epoch_losses = 0, []
    for phase in phases:
        set_trainable(model, phase.trainable)
        inputs, forward = x, phase.forward or model
        if (cfg.cache_head_features and augment is None and phase.forward is None
                and phase.epochs > 1 and _head_only(model, phase.trainable)
                and model.body_is_deterministic()):
            inputs, forward = body_features(model, x), model.head
            if (cfg.closed_form_head and phase.penalty is None and model.task == "classification"
                    and isinstance(model.head, nn.Linear) and supports_closed_form(model.head, optimizer)):
                losses, done = linear_head_epochs(
                    model.head, inputs, y, phase.epochs, optimizer,
                    lambda: shuffled_batches(n, cfg.batch_size, generator, min_size))
                epoch_losses, steps = epoch_losses + losses, steps + done
                continue
        for _ in range(phase.epochs):
            total, count = 0.0, 0
            for idx in shuffled_batches(n, cfg.batch_size, generator, min_size):
                optimizer.zero_grad(set_to_none=True)
                batch = inputs[idx] if augment is None else augment(inputs[idx], generator)
                loss = loss_fn(model, forward(batch), y[idx])
                objective = loss if phase.penalty is None else loss + phase.penalty()
                objective.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                count += len(idx)
                steps += 1
            if count:
                epoch_losses.append(total / count)
    set_trainable(model, (name for name, _ in model.named_parameters()))
    loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan")
    return LocalResult(num_examples=n, loss=loss, steps=steps)


def evaluate(model: SplitModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128,
             channels_last: bool = False) -> EvalResult:
    """Loss and top-1 accuracy on a client's local test split (official test batch size 128);
    ``channels_last``: see :func:`memory_layout`."""
    with memory_layout(model, x, channels_last) as x:
        return _evaluate(model, x, y, batch_size)


@torch.no_grad()
def _evaluate(model: SplitModel, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> EvalResult:
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += loss_fn(model, out, target).item() * len(target)
        if model.task == "classification":
            correct += int((out.argmax(dim=1) == target).sum())
    if len(y) == 0:  # nothing to evaluate on: report no numbers rather than a fake 0%
        return EvalResult(num_examples=0, loss=float("nan"), accuracy=None)
    accuracy = correct / len(y) if model.task == "classification" else None
    return EvalResult(num_examples=len(y), loss=total_loss / len(y), accuracy=accuracy)
