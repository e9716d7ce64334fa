"""The built-in strategies, declared exactly as a third-party plugin declares its own.

Each :class:`~fedrep.registry.StrategyPlugin` names its server half by reference
(``"module:attr"``), resolved only when a server builds it, and its client half by class. So a
SuperNode that loads these declarations imports the client halves (plain PyTorch in
``fedrep.algorithms``) and never a server module or ``flwr.serverapp``. This project's
``pyproject.toml`` registers them under the entry-point group ``fedrep.strategies``.
"""

from __future__ import annotations

from fedrep.algorithms.ditto import DittoOptions, DittoUpdate
from fedrep.algorithms.fedavg import FedAvgFTOptions, FedAvgFTUpdate, FedAvgUpdate
from fedrep.algorithms.fedprox import FedProxOptions, FedProxUpdate
from fedrep.algorithms.fedrep import FedRepUpdate
from fedrep.algorithms.kd3a.rule import SOURCE_ACTION, TARGET_ACTION, KD3AOptions, KD3ARule
from fedrep.algorithms.local import LocalOnlyOptions, LocalOnlyUpdate
from fedrep.algorithms.split import FedPerUpdate, LGFedAvgOptions, LGFedAvgUpdate, SplitOptions, SplitUpdate
from fedrep.registry import StrategyPlugin

AVERAGING = "server.strategies.base:SharedAveraging"  # sample-weighted average of what is shared
JOINT = ("local-epochs", "lr", "momentum", "weight-decay", "batch-size", "fraction-train")

FEDREP = StrategyPlugin(
    name="fedrep",
    description="FedRep (Collins et al., ICML 2021): shared body, personal head; "
    "tau_h head epochs then tau_b body epochs per round.",
    server=AVERAGING, client=FedRepUpdate,
    config_keys=("head-epochs", "body-epochs", "lr", "momentum", "weight-decay", "batch-size",
                 "fraction-train"),
)
FEDAVG = StrategyPlugin(
    name="fedavg",
    description="FedAvg (McMahan et al., 2017): one global model, local-epochs of joint SGD.",
    server=AVERAGING, client=FedAvgUpdate, config_keys=JOINT,
)
FEDAVG_FT = StrategyPlugin(
    name="fedavg-ft",
    description="FedAvg+FT: FedAvg, and each evaluation first fine-tunes the head locally.",
    server=AVERAGING, client=FedAvgFTUpdate, config_keys=JOINT, options=FedAvgFTOptions,
)
FEDPER = StrategyPlugin(
    name="fedper",
    description="FedPer (Arivazhagan et al., 2019): body shared, head personal, trained jointly.",
    server=AVERAGING, client=FedPerUpdate, config_keys=JOINT,
)
LG_FEDAVG = StrategyPlugin(
    name="lg-fedavg",
    description="LG-FedAvg (Liang et al., 2020): local lower layers, global top layers (as the "
    "official FedRep code: the top two fully connected layers).",
    server=AVERAGING, client=LGFedAvgUpdate, config_keys=JOINT, options=LGFedAvgOptions,
)
SPLIT = StrategyPlugin(
    name="split",
    description="Any shared/personal split by layer ('{personal = [\"body.0\"]}'), or BN-only "
    "personalization as FedBN ('{personal = [], personal_batchnorm = true}', model cnn-bn).",
    server=AVERAGING, client=SplitUpdate, config_keys=JOINT, options=SplitOptions,
)
LOCAL = StrategyPlugin(
    name="local",
    description="Local-only: each client trains its own model; nothing is communicated (official "
    "main_local.py schedule: every client, one epoch per round, no weight decay).",
    server="server.strategies.base:LocalOnlyAveraging", client=LocalOnlyUpdate, config_keys=JOINT,
    options=LocalOnlyOptions,
)
FEDPROX = StrategyPlugin(
    name="fedprox",
    description="FedProx (Li et al., 2020): FedAvg with a proximal term mu/2 ||w - w_global||^2.",
    server=AVERAGING, client=FedProxUpdate, config_keys=JOINT, options=FedProxOptions,
)
DITTO = StrategyPlugin(
    name="ditto",
    description="Ditto (Li et al., 2021): FedAvg global model + personal model pulled to it.",
    server=AVERAGING, client=DittoUpdate, config_keys=JOINT, options=DittoOptions,
)
KD3A = StrategyPlugin(
    name="kd3a",
    description="KD3A (Feng et al., ICML 2021): unsupervised multi-source decentralized domain "
    "adaptation; knowledge vote, consensus focus, BatchNorm MMD. Partition 0 is the target.",
    server="server.strategies.kd3a:KD3AStrategy", client=KD3ARule, options=KD3AOptions,
    client_actions=(SOURCE_ACTION, TARGET_ACTION),
    config_keys=("dataset", "target-domain", "source-domains", "irrelevant-source", "malicious-domain",
                 "poison-fraction", "lr", "momentum", "weight-decay", "batch-size"),
)
