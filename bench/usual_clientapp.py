"""FedRep written the usual way, for ``bench/round_overhead.py`` (issue 23): the reference a user
compares fedrep against when deciding whether to switch.

A ClientApp as Flower's documentation teaches it, on the same model, data and settings as
fedrep's: every message builds the model, loads its partition, restores its head from
``context.state`` and trains with a plain PyTorch loop: ``head-epochs`` epochs of the head and then
``body-epochs`` epochs of the body, each step a forward pass through the whole network (no cached
body features, no per-process caches). It speaks fedrep's message protocol (partition id, sample
counts, train loss, local accuracy), so fedrep's ServerApp drives it unchanged:

    fedrep run --client-app bench.usual_clientapp:app ...

Not fedrep's arithmetic step for step (its own batch order and initial head), so it is for timing,
not for accuracy comparisons.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedrep.config import parse_run_config
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.protocol import (
    ACCURACY,
    ARRAYS,
    LOSS,
    METRICS,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    NUM_TEST,
    NUM_TRAIN,
    PARTITION_ID,
    TRAIN_LOSS,
)

app = ClientApp()
HEAD = "head"  # the context.state record holding this client's head


def _setup(context: Context):
    cfg = parse_run_config(dict(context.run_config))
    torch.set_num_threads(cfg.client_threads)
    partition = int(context.node_config[NODE_PARTITION_ID])
    return cfg, partition, build_model(cfg), load_client_data(cfg, partition)


def _load(model: nn.Module, msg: Message, context: Context) -> None:
    """The server's body, and this client's head if it has one (else the model's initial head)."""
    state = model.state_dict()
    state.update(msg.content[ARRAYS].to_torch_state_dict())
    if HEAD in context.state:
        state.update(context.state[HEAD].to_torch_state_dict())
    model.load_state_dict(state)


def _epochs(model: nn.Module, trainable: str, epochs: int, x: torch.Tensor, y: torch.Tensor, cfg) -> float:
    """``epochs`` of plain SGD on the parameters whose names start with ``trainable``."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size,
                                         shuffle=True)
    loss_sum, steps = 0.0, 0
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
    return loss_sum / max(steps, 1)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, partition, _, data = _setup(context)
    info = {PARTITION_ID: partition, NUM_TRAIN: data.num_train, NUM_TEST: data.num_test,
            NUM_PARTITIONS: int(context.node_config.get(NODE_NUM_PARTITIONS, cfg.num_clients))}
    return Message(RecordDict({METRICS: MetricRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition, model, data = _setup(context)
    _load(model, msg, context)
    _epochs(model, "head", cfg.head_epochs, data.x_train, data.y_train, cfg)
    loss = _epochs(model, "body", cfg.body_epochs, data.x_train, data.y_train, cfg)
    state = model.state_dict()
    context.state[HEAD] = ArrayRecord({k: v for k, v in state.items() if k.startswith("head")})
    body = ArrayRecord({k: v for k, v in state.items() if k.startswith("body")})
    metrics = MetricRecord({NUM_EXAMPLES: data.num_train, TRAIN_LOSS: loss, PARTITION_ID: partition})
    return Message(RecordDict({ARRAYS: body, METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, partition, model, data = _setup(context)
    _load(model, msg, context)
    model.eval()
    with torch.no_grad():
        logits = model(data.x_test)
        loss = nn.functional.cross_entropy(logits, data.y_test).item()
        accuracy = (logits.argmax(1) == data.y_test).float().mean().item()
    metrics = MetricRecord({NUM_EXAMPLES: data.num_test, PARTITION_ID: partition, LOSS: loss,
                            ACCURACY: accuracy})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
