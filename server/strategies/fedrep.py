"""FedRep as a strategy plugin: the server averages representations, the client alternates."""

from fedrep.algorithms.fedrep import FedRepUpdate
from fedrep.registry import StrategyPlugin
from server.strategies.base import SharedAveraging

PLUGIN = StrategyPlugin(
    name="fedrep",
    description="FedRep (Collins et al., ICML 2021): shared body, personal head; "
    "tau_h head epochs then tau_b body epochs per round.",
    server=SharedAveraging,
    client=FedRepUpdate,
    config_keys=("head-epochs", "body-epochs", "lr", "momentum", "weight-decay", "batch-size",
                 "fraction-train"),
)
