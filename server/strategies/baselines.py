"""The personalization baselines of the FedRep paper, each a plugin like any third party's.

All of them aggregate what their clients share with the same sample-weighted average; what
differs is the client half (what is shared, what is trained) and, for FedAvg+FT, evaluation.
"""

from fedrep.algorithms.ditto import DittoOptions, DittoUpdate
from fedrep.algorithms.fedavg import FedAvgFTOptions, FedAvgFTUpdate
from fedrep.algorithms.fedprox import FedProxOptions, FedProxUpdate
from fedrep.algorithms.local import LocalOnlyOptions, LocalOnlyUpdate, local_server_config
from fedrep.algorithms.split import FedPerUpdate, LGFedAvgOptions, LGFedAvgUpdate, SplitOptions, SplitUpdate
from fedrep.config import RunConfig
from fedrep.registry import StrategyPlugin
from server.strategies.base import SharedAveraging

JOINT = ("local-epochs", "lr", "momentum", "weight-decay", "batch-size", "fraction-train")

FEDAVG_FT = StrategyPlugin(
    name="fedavg-ft",
    description="FedAvg+FT: FedAvg, and each evaluation first fine-tunes the head locally.",
    server=SharedAveraging, client=FedAvgFTUpdate, config_keys=JOINT, options=FedAvgFTOptions,
)
FEDPER = StrategyPlugin(
    name="fedper",
    description="FedPer (Arivazhagan et al., 2019): body shared, head personal, trained jointly.",
    server=SharedAveraging, client=FedPerUpdate, config_keys=JOINT,
)
LG_FEDAVG = StrategyPlugin(
    name="lg-fedavg",
    description="LG-FedAvg (Liang et al., 2020): local lower layers, global top layers (as the "
    "official FedRep code: the top two fully connected layers).",
    server=SharedAveraging, client=LGFedAvgUpdate, config_keys=JOINT, options=LGFedAvgOptions,
)
SPLIT = StrategyPlugin(
    name="split",
    description="Any shared/personal split by layer ('{personal = [\"body.0\"]}'), or BN-only "
    "personalization as FedBN ('{personal = [], personal_batchnorm = true}', model cnn-bn).",
    server=SharedAveraging, client=SplitUpdate, config_keys=JOINT, options=SplitOptions,
)
def _local_server(cfg: RunConfig, options: object = None) -> SharedAveraging:
    return SharedAveraging(local_server_config(cfg, options), options)


LOCAL = StrategyPlugin(
    name="local",
    description="Local-only: each client trains its own model; nothing is communicated (official "
    "main_local.py schedule: every client, one epoch per round, no weight decay).",
    server=_local_server, client=LocalOnlyUpdate, config_keys=JOINT, options=LocalOnlyOptions,
)
FEDPROX = StrategyPlugin(
    name="fedprox",
    description="FedProx (Li et al., 2020): FedAvg with a proximal term mu/2 ||w - w_global||^2.",
    server=SharedAveraging, client=FedProxUpdate, config_keys=JOINT, options=FedProxOptions,
)
DITTO = StrategyPlugin(
    name="ditto",
    description="Ditto (Li et al., 2021): FedAvg global model + personal model pulled to it.",
    server=SharedAveraging, client=DittoUpdate, config_keys=JOINT, options=DittoOptions,
)
