"""The same federated arithmetic as the Flower app, as one plain PyTorch loop in one process.

Used three ways: as the ground truth the Flower simulation is compared against (same seed, same
sampled clients, same shuffles, so the same bodies), as the lower bound in ``bench/``, and for
fast math tests such as recovering B* on the linear task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedrep.algorithms.aggregate import summarize, weighted_average
from fedrep.algorithms.base import ClientUpdateRule
from fedrep.algorithms.sampling import sample_clients
from fedrep.algorithms.training import EVAL, round_generator
from fedrep.config import RunConfig
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.models.base import SplitModel


@dataclass
class ReferenceRun:
    shared: dict[str, torch.Tensor]
    personal: dict[int, dict[str, torch.Tensor]]
    history: list[dict[str, float]] = field(default_factory=list)


def _state(model: SplitModel, keys: list[str]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


def run_reference(
    cfg: RunConfig,
    rule: ClientUpdateRule,
    rounds: int | None = None,
    on_round: Callable[[int, SplitModel, ReferenceRun], dict[str, float]] | None = None,
) -> ReferenceRun:
    """Run ``rounds`` rounds (default ``cfg.num_rounds``); ``on_round`` may add metrics."""
    model = rule.prepare_model(build_model(cfg))
    shared_keys, personal_keys = rule.shared_keys(model), rule.personal_keys(model)
    initial_personal = _state(model, personal_keys)
    run = ReferenceRun(shared=_state(model, shared_keys), personal={})
    torch.set_num_threads(cfg.client_threads)
    for server_round in range(1, (cfg.num_rounds if rounds is None else rounds) + 1):
        updates, losses, weights = [], [], []
        for client in sample_clients(cfg.seed, server_round, range(cfg.num_clients), cfg.fraction_train):
            data = load_client_data(cfg, client)
            personal = run.personal.get(client, initial_personal)
            model.load_state_dict({**run.shared, **personal})
            result = rule.fit(model, data, round_generator(cfg.seed, server_round, client))
            run.personal[client] = _state(model, personal_keys)
            shared_now = {k: v.numpy() for k, v in _state(model, shared_keys).items()}
            updates.append((shared_now, result.num_examples))
            losses.append(result.loss)
            weights.append(result.num_examples)
        averaged = weighted_average(updates)
        run.shared = {k: torch.from_numpy(v) for k, v in averaged.items()}
        metrics: dict[str, float] = {
            "round": server_round, "train-loss": summarize(losses, weights)["weighted-mean"]}
        if on_round is not None:
            model.load_state_dict({**run.shared, **initial_personal})
            metrics.update(on_round(server_round, model, run))
        run.history.append(metrics)
    return run


def evaluate_all(cfg: RunConfig, rule: ClientUpdateRule, run: ReferenceRun) -> dict[str, float]:
    rounds_done = len(run.history)
    """Mean of local accuracies (and loss) over all clients, each with its own personal part."""
    model = rule.prepare_model(build_model(cfg))
    initial_personal = _state(model, rule.personal_keys(model))
    accs, losses = [], []
    for client in range(cfg.num_clients):
        model.load_state_dict({**run.shared, **run.personal.get(client, initial_personal)})
        gen = round_generator(cfg.seed, rounds_done, client, EVAL)
        res = rule.evaluate(model, load_client_data(cfg, client), gen)
        losses.append(res.loss)
        if res.accuracy is not None:
            accs.append(res.accuracy)
    out = {f"loss-{k}": v for k, v in summarize(losses).items()}
    if accs:
        out.update({f"accuracy-{k}": v for k, v in summarize(accs).items()})
    return out
