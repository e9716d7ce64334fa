"""fedrep: personalized federated learning (FedRep, KD3A and baselines as plugins) on Flower.

The algorithm math lives here as plain PyTorch; the Flower wiring is in the sibling ``server`` and
``clients`` packages, so this package imports without Flower's runtime being started.

From Python (notebooks, scripts): ``fedrep.run(...)``, ``fedrep.resume(...)``, ``fedrep.run_comparison(...)``,
``fedrep.open_run(...)`` and ``fedrep.load_model(...)`` (:mod:`fedrep.api`, which the CLI is a
thin layer over).

A strategy plugin needs only this package: ``from fedrep import StrategyPlugin, ClientUpdateRule,
Phase, SharedAveraging`` (the server classes are imported on first use, so a SuperNode that only
builds client halves never imports them).
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("fedrep")
except PackageNotFoundError:  # a source tree on sys.path without `pip install -e .`
    __version__ = "0+unknown"

# The public API: name -> (module, attribute), imported when first asked for.
_API = {
    # running experiments and using their models
    "run": ("fedrep.api", "run"),
    "resume": ("fedrep.api", "resume"),
    "run_comparison": ("fedrep.api", "run_comparison"),
    "open_run": ("fedrep.api", "open_run"),
    "load_model": ("fedrep.api", "load_model"),
    "Run": ("fedrep.api", "Run"),
    # the plugin API
    "StrategyPlugin": ("fedrep.registry", "StrategyPlugin"),
    "ClientUpdateRule": ("fedrep.algorithms.base", "ClientUpdateRule"),
    "param_names": ("fedrep.algorithms.base", "param_names"),
    "proximal_term": ("fedrep.algorithms.base", "proximal_term"),
    "Phase": ("fedrep.algorithms.training", "Phase"),
    "EvalResult": ("fedrep.algorithms.training", "EvalResult"),
    "LocalResult": ("fedrep.algorithms.training", "LocalResult"),
    "ClientData": ("fedrep.data.federated", "ClientData"),
    "SplitModel": ("fedrep.models.base", "SplitModel"),
    "RunConfig": ("fedrep.config", "RunConfig"),
    "ActionResult": ("fedrep.protocol", "ActionResult"),
    "RoundProgram": ("fedrep.round_program", "RoundProgram"),
    "TrainOutcome": ("fedrep.round_program", "TrainOutcome"),
    "EvalOutcome": ("fedrep.round_program", "EvalOutcome"),
    # server halves (Flower's server API; imported only where a server is built)
    "Federation": ("server.strategies.base", "Federation"),
    "SharedAveraging": ("server.strategies.base", "SharedAveraging"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'fedrep' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
