"""Where one client's FedRep local update spends its time, with the fast paths off and on.

One client of 600 Fashion-MNIST images (100 test), the paper's CNN, 1 thread, FedRep's 10 head
epochs and 1 body epoch, batches of 10. Each part is timed on its own (best of ``--repeat``),
slow and fast side by side in this one process, and so is the whole local update against FedRep
written the usual way (``bench/usual_clientapp.py``'s loop: every head epoch through the whole
network, default memory layout):

* body features for the head cache: one chunk of 1,024 in PyTorch's default layout (before) or
  chunks of 64 in channels-last (after);
* the 10 head epochs on those features: autograd + ``optimizer.step`` or the closed-form step
  (:mod:`fedrep.algorithms.linear_head`);
* one body epoch and one evaluation: default layout or channels-last;
* one message: the body as Flower's ``ArrayRecord`` and back (the same on both sides).

Prints a table and writes ``bench/out/local_update.json``.

    python -m bench.local_update
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from bench.usual_clientapp import _epochs as usual_epochs
from fedrep.algorithms.base import param_names
from fedrep.algorithms.training import (
    Phase,
    body_features,
    evaluate,
    memory_layout,
    round_generator,
    run_phases,
)
from fedrep.config import parse_run_config
from fedrep.data.federated import load_client_data
from fedrep.models import build_model
from fedrep.registry import get_strategy

SLOW = {"channels-last": False, "closed-form-head": False}


def best_of(repeat: int, work: Callable[[], object]) -> float:
    """Seconds of the fastest of ``repeat`` runs, after one warm-up run."""
    work()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    fast = parse_run_config({"num-clients": 100, "model": "cnn"})
    slow = fast.model_copy(update={k.replace("-", "_"): v for k, v in SLOW.items()})
    data = load_client_data(fast, 0)
    model = build_model(fast)
    body = Phase(param_names(model.body, "body"), fast.body_epochs)

    def generator() -> torch.Generator:
        return round_generator(fast.seed, 2, 0)

    def fast_features() -> torch.Tensor:
        with memory_layout(model, data.x_train, True) as x:
            return body_features(model, x)

    features = body_features(model, data.x_train)

    def head_epochs(cfg) -> Callable[[], object]:  # on precomputed features: a Linear "model"
        from fedrep.models.base import SplitModel

        linear = SplitModel(torch.nn.Identity(), model.head)
        return lambda: run_phases(linear, features, data.y_train,
                                  [Phase(param_names(linear.head, "head"), cfg.head_epochs)],
                                  cfg, generator())

    def usual_update() -> None:
        net = build_model(fast)
        usual_epochs(net, "head", fast.head_epochs, data.x_train, data.y_train, fast)
        usual_epochs(net, "body", fast.body_epochs, data.x_train, data.y_train, fast)

    def message() -> None:
        shared = {k: v for k, v in model.state_dict().items() if k.startswith("body.")}
        ArrayRecord(shared).to_torch_state_dict()

    rows = {
        "body features (600 images)": (best_of(args.repeat, lambda: body_features(model, data.x_train, 1024)),
                                       best_of(args.repeat, fast_features)),
        "10 head epochs on cached features": (best_of(args.repeat, head_epochs(slow)),
                                              best_of(args.repeat, head_epochs(fast))),
        "1 body epoch": (best_of(args.repeat, lambda: run_phases(model, data.x_train, data.y_train,
                                                                 [body], slow, generator())),
                         best_of(args.repeat, lambda: run_phases(model, data.x_train, data.y_train,
                                                                 [body], fast, generator()))),
        "evaluation (100 images)": (best_of(args.repeat, lambda: evaluate(model, data.x_test, data.y_test)),
                                    best_of(args.repeat, lambda: evaluate(model, data.x_test, data.y_test,
                                                                          channels_last=True))),
        "one message (body to ArrayRecord and back)": (best_of(args.repeat, message),) * 2,
    }
    rule_slow, rule_fast = (get_strategy("fedrep").client_rule(c) for c in (slow, fast))
    whole = (best_of(args.repeat, lambda: rule_slow.fit(model, data, generator())),
             best_of(args.repeat, lambda: rule_fast.fit(model, data, generator())))
    usual = best_of(args.repeat, usual_update)
    print(f"one FedRep local update: 600 images, paper CNN, {fast.head_epochs} head + "
          f"{fast.body_epochs} body epochs, batch {fast.batch_size}, 1 thread (best of {args.repeat})")
    print(f"  {'part':44s} {'before s':>9s} {'after s':>9s} {'speed-up':>9s}")
    for name, (before, after) in rows.items():
        print(f"  {name:44s} {before:9.4f} {after:9.4f} {before / after:8.2f}x")
    print(f"  {'whole local update':44s} {whole[0]:9.4f} {whole[1]:9.4f} {whole[0] / whole[1]:8.2f}x")
    print(f"  FedRep written the usual way: {usual:.4f} s = {usual / whole[1]:.2f}x fedrep's local update")
    result = {name: {"before-s": b, "after-s": a, "speedup": b / a} for name, (b, a) in rows.items()}
    result.update({"whole-before-s": whole[0], "whole-after-s": whole[1],
                   "whole-speedup": whole[0] / whole[1], "usual-s": usual,
                   "usual-over-fedrep": usual / whole[1]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "local_update.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
