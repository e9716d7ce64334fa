"""fedrep: personalized federated learning (FedRep, KD3A and baselines as plugins) on Flower.

The algorithm math lives here as plain PyTorch; the Flower wiring is in the sibling ``server`` and
``clients`` packages, so this package imports without Flower's runtime being started.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedrep")
except PackageNotFoundError:  # a source tree on sys.path without `pip install -e .`
    __version__ = "0+unknown"
