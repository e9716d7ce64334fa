"""Does FedAvg+FT beat FedRep on small clients because its head starts from the global head?

FedRep's heads never leave their clients: each starts from the initial (random) head and learns
from local data only. FedAvg+FT fine-tunes the *global* head, which has seen every client's data.
With few local images that starting point may be worth more than a personal head. This script
separates the head's starting point from the body, client by client, on a finished run and with
the run's own fine-tune settings:

* ``final head``: fine-tune the head the run ended with (FedAvg: the global head, so this is
  FedAvg+FT; FedRep: the client's personal head, so this is FedRep+FT);
* ``initial head``: the same body, the head first reset to the run's initial head.

Run on both a FedAvg and a FedRep run of one comparison, the ``initial head`` columns compare the
two bodies under one head procedure.

    python experiments/head_init_check.py RUN_DIR [--epochs N]

prints mean local accuracy of both variants by quartile of clients' training-set size.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from fedrep.algorithms.training import FINETUNE, round_generator
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.registry import get_strategy
from fedrep.results import CLIENT_STATE, RunDir, client_state_file
from fedrep.results import read_head_versions as read_versions


def head_init_accuracies(run: RunDir, epochs: int) -> list[tuple[int, float, float]]:
    """(train size, accuracy after fine-tuning the final head, same from the initial head) per
    client."""
    cfg = run.saved_config()
    rule = get_strategy(cfg.strategy).client_rule(cfg)
    model = rule.prepare_model(build_model(cfg))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    head_keys = [f"head.{name}" for name in model.head.state_dict()]
    last = run.last_completed_round()
    shared = {k: torch.from_numpy(v) for k, v in run.load_checkpoint(last).items()}
    rows = []
    for client in range(cfg.num_clients):
        versions = read_versions(client_state_file(run.path / CLIENT_STATE, client))
        final = {**initial, **shared, **(versions[max(versions)] if versions else {})}
        data = load_client_data(cfg, client)
        accuracies = []
        for head in (final, initial):
            model.load_state_dict({**final, **{k: head[k] for k in head_keys}})
            result = rule.finetune_and_evaluate(model, data, epochs,
                                                round_generator(cfg.seed, last, client, FINETUNE))
            accuracies.append(float(result.accuracy))
        rows.append((data.num_train, *accuracies))
        if (client + 1) % 10 == 0:
            print(f"[head_init_check] {client + 1}/{cfg.num_clients} clients", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run folder (e.g. a comparison's fedavg or fedrep)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="head fine-tune epochs (default: the run's final-finetune-epochs)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one tiny head per step: more threads only contend
    run = RunDir.open(args.run_dir)
    epochs = args.epochs if args.epochs is not None else run.saved_config().final_finetune_epochs
    rows = np.array(head_init_accuracies(run, epochs))
    edges = np.quantile(rows[:, 0], [0.25, 0.5, 0.75])
    quartile = np.searchsorted(edges, rows[:, 0], side="right")
    print("| clients (train images) | final head, fine-tuned | initial head, fine-tuned | difference |")
    print("|---|---|---|---|")
    for q in range(4):
        part = rows[quartile == q]
        if not len(part):  # equal-sized clients all fall in one quartile
            continue
        print(f"| {int(part[:, 0].min())}-{int(part[:, 0].max())} ({len(part)}) | "
              f"{part[:, 1].mean():.4f} | {part[:, 2].mean():.4f} | "
              f"{part[:, 1].mean() - part[:, 2].mean():+.4f} |")
    print(f"| all ({len(rows)}) | {rows[:, 1].mean():.4f} | {rows[:, 2].mean():.4f} | "
          f"{rows[:, 1].mean() - rows[:, 2].mean():+.4f} |")


if __name__ == "__main__":
    main()
