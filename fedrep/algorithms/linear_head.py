"""Head epochs of a linear classification head on cached body features, without autograd.

FedRep's tau_h head epochs train a single ``nn.Linear`` on features the frozen body computed once
(see :func:`fedrep.algorithms.training.run_phases`). There each SGD step is a 10 x 64 matrix
product, so autograd's graph building, the optimiser's per-parameter bookkeeping and
``zero_grad`` cost more than the arithmetic: writing the gradient of cross-entropy by hand
(softmax minus one-hot, over the batch) and PyTorch's SGD update (weight decay, momentum buffer,
step) in place makes the head phase about 2.5x faster on this CPU (issue 23,
``python -m bench.local_update``).

It is the same arithmetic as ``loss.backward(); optimizer.step()`` up to float reassociation:
same batches from the same generator, the optimiser's own hyper-parameters, and its momentum
buffers read before and written back after, so a later phase of the same local update continues
from exactly the state the autograd loop would leave. A test compares the two paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn


def supports_closed_form(head: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """A bare ``nn.Linear`` with a bias, trained by plain SGD (no Nesterov, no dampening,
    not maximising): the case :func:`linear_head_epochs` reproduces."""
    if type(head) is not nn.Linear or head.bias is None or type(optimizer) is not torch.optim.SGD:
        return False
    return all(not g["nesterov"] and g["dampening"] == 0 and not g["maximize"]
               for g in optimizer.param_groups)


def _group(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@torch.no_grad()
def linear_head_epochs(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, epochs: int,
                       optimizer: torch.optim.Optimizer,
                       batches: Callable[[], Iterator[torch.Tensor]]) -> tuple[list[float], int]:
    """``epochs`` passes of cross-entropy SGD on ``head`` over ``features``; ``batches()``
    yields one epoch's index batches (called once per epoch, as the autograd loop does).
    Returns the per-epoch mean train losses (epochs without a batch are left out) and steps."""
    weight, bias = head.weight, head.bias
    params = [(weight, _group(optimizer, weight)), (bias, _group(optimizer, bias))]
    buffers = [optimizer.state[p].get("momentum_buffer") for p, _ in params]
    epoch_losses, steps = [], 0
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in batches():
            x, y = features[idx], labels[idx]
            rows = torch.arange(len(idx))
            log_p = torch.log_softmax(torch.addmm(bias, x, weight.t()), dim=1)
            loss = -log_p[rows, y].mean()
            grad_logits = log_p.exp_()  # d(mean cross-entropy)/d(logits) = (softmax - onehot) / B
            grad_logits[rows, y] -= 1.0
            grad_logits /= len(idx)
            grads = (grad_logits.t().mm(x), grad_logits.sum(dim=0))
            for i, ((param, group), grad) in enumerate(zip(params, grads, strict=True)):
                if group["weight_decay"]:
                    grad = grad.add_(param, alpha=group["weight_decay"])
                if group["momentum"]:
                    if buffers[i] is None:
                        buffers[i] = grad.clone()
                    else:
                        buffers[i].mul_(group["momentum"]).add_(grad)
                    grad = buffers[i]
                param.add_(grad, alpha=-group["lr"])
            total += loss.item() * len(idx)
            count += len(idx)
            steps += 1
        if count:
            epoch_losses.append(total / count)
    for (param, _), buffer in zip(params, buffers, strict=True):
        if buffer is not None:
            optimizer.state[param]["momentum_buffer"] = buffer
    return epoch_losses, steps
