"""LEAF's FEMNIST and Sent140 (the paper's Table 1): what configuration knows about them, and their
keys (``femnist-classes``, ``lstm-input``). The loaders are in ``leaf.py``; this module imports
no torch, so :mod:`fedrep.config` can read it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedrep.keys import DatasetSpec, KeySection

FEMNIST_CLASS_COUNTS = {"digits": 10, "letters-a-j": 10, "all": 62}

# Writers / Twitter users are the clients; official settings from scripts/FedRep_femnist.sh
# (--model mlp, n=150, --local_ep 15 --local_rep_ep 5) and FedRep_sent140.sh (RNNSent, n=183,
# batch 4).
FEMNIST = DatasetSpec("femnist", 10, ("mlp", "femnist-cnn", "cnn", "fedavg-cnn"), natural_clients=True,
                      defaults={"num-clients": 150, "head-epochs": 10, "body-epochs": 5},
                      default_partition="natural")
SENT140 = DatasetSpec("sent140", 2, ("lstm",), natural_clients=True, default_partition="natural",
                      defaults={"num-clients": 183, "head-epochs": 10, "body-epochs": 5, "batch-size": 4})

SPECS = (FEMNIST, SENT140)


class LeafKeys(KeySection):
    """Keys of the LEAF sets."""

    femnist_classes: Literal["digits", "letters-a-j", "all"] = Field(
        "digits", description="femnist: which LEAF classes to keep, relabelled from 0. The official "
        "script trains a 10-class model (scripts/FedRep_femnist.sh --num_classes 10) on a selection "
        "it does not publish (main_fedrep.py reads data/mytrain); 'digits' are the only ten LEAF "
        "labels such a model takes unchanged (0-9); 'letters-a-j', or 'all' 62 classes.")
    lstm_input: Literal["words", "official-view"] = Field(
        "words", description="sent140 'lstm': 'words' feeds 25 steps of 300-d word vectors; "
        "'official-view' reproduces the official forward's emb.view(300, batch, 25) (models/Nets.py "
        "RNNSent), which reinterprets that memory as 300 steps of 25 numbers.")

    def femnist_num_classes(self) -> int:
        return FEMNIST_CLASS_COUNTS[self.femnist_classes]
