"""FedAvg as a strategy plugin: everything shared, everything averaged."""

from fedrep.algorithms.fedavg import FedAvgUpdate
from fedrep.registry import StrategyPlugin
from server.strategies.base import SharedAveraging

PLUGIN = StrategyPlugin(
    name="fedavg",
    description="FedAvg (McMahan et al., 2017): one global model, local-epochs of joint SGD.",
    server=SharedAveraging,
    client=FedAvgUpdate,
    config_keys=("local-epochs", "lr", "momentum", "weight-decay", "batch-size", "fraction-train"),
)
