"""Does FedAvg+FT beat FedRep on small clients because its head starts from the global head?

FedRep's heads never leave their clients: each starts from the initial (random) head and learns
from local data only. FedAvg+FT fine-tunes the *global* head, which has seen every client's data.
With few local images that starting point may be worth more than a personal head. This script
tests that on a finished FedAvg run, client by client, with the run's own fine-tune settings:

* ``global head``: fine-tune the final global model's head (what FedAvg+FT reports);
* ``initial head``: the same, but the head first reset to the run's initial head, as a FedRep
  client's head starts.

If the explanation holds, resetting the head costs small clients much more than large ones.

    python experiments/head_init_check.py RUN_DIR [--epochs N]

prints mean local accuracy of both variants by quartile of clients' training-set size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fedrep.algorithms.training import FINETUNE, round_generator
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.registry import get_strategy
from fedrep.results import RunDir


def head_init_accuracies(run: RunDir, epochs: int) -> list[tuple[int, float, float]]:
    """(train size, accuracy after fine-tuning the global head, same from the initial head)
    per client."""
    cfg = run.saved_config()
    rule = get_strategy(cfg.strategy).client_rule(cfg)
    model = rule.prepare_model(build_model(cfg))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    head_keys = [f"head.{name}" for name in model.head.state_dict()]
    last = run.last_completed_round()
    final = {k: torch.from_numpy(v) for k, v in run.load_checkpoint(last).items()}
    rows = []
    for client in range(cfg.num_clients):
        data = load_client_data(cfg, client)
        accuracies = []
        for head in (final, initial):
            model.load_state_dict({**final, **{k: head[k] for k in head_keys}})
            result = rule.finetune_and_evaluate(model, data, epochs,
                                                round_generator(cfg.seed, last, client, FINETUNE))
            accuracies.append(float(result.accuracy))
        rows.append((data.num_train, *accuracies))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run whose strategy shares the whole model (fedavg)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="head fine-tune epochs (default: the run's final-finetune-epochs)")
    args = parser.parse_args()
    run = RunDir.open(args.run_dir)
    epochs = args.epochs if args.epochs is not None else run.saved_config().final_finetune_epochs
    rows = np.array(head_init_accuracies(run, epochs))
    edges = np.quantile(rows[:, 0], [0.25, 0.5, 0.75])
    quartile = np.searchsorted(edges, rows[:, 0], side="right")
    print("| clients (train images) | global head, fine-tuned | initial head, fine-tuned | difference |")
    print("|---|---|---|---|")
    for q in range(4):
        part = rows[quartile == q]
        print(f"| {int(part[:, 0].min())}-{int(part[:, 0].max())} ({len(part)}) | "
              f"{part[:, 1].mean():.4f} | {part[:, 2].mean():.4f} | "
              f"{part[:, 1].mean() - part[:, 2].mean():+.4f} |")
    print(f"| all ({len(rows)}) | {rows[:, 1].mean():.4f} | {rows[:, 2].mean():.4f} | "
          f"{rows[:, 1].mean() - rows[:, 2].mean():+.4f} |")


if __name__ == "__main__":
    main()
