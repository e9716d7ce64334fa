"""The keys of the built-in client rules' local update (FedRep's tau_h head and tau_b body epochs,
the baselines' joint epochs, the optimiser, the final fine-tune). Declared here, beside the rules
that read them; :class:`fedrep.config.RunConfig` mixes them into the flat key space. Imports no
torch. Defaults from the official code (github.com/lgcollins/FedRep, ``utils/options.py`` and
``scripts/FedRep_cifar10_2shards.sh``)."""

from __future__ import annotations

from pydantic import Field

from fedrep.keys import KeySection


class LocalUpdateKeys(KeySection):
    """How a client trains in one round, and how heads are fine-tuned at the end."""

    head_epochs: int = Field(
        10, ge=0, description="tau_h: head epochs with the body frozen (official local_ep 11 - 1)."
    )
    body_epochs: int = Field(
        1, ge=0, description="tau_b: body epochs with the head frozen (official local_rep_ep=1)."
    )
    local_epochs: int = Field(
        1, ge=0, description="Epochs of joint training for strategies that train all layers together "
        "(official FedAvg scripts: local_ep=1)."
    )
    lr: float = Field(0.01, gt=0, description="SGD learning rate (official lr=0.01).")
    momentum: float = Field(0.5, ge=0, lt=1, description="SGD momentum (official 0.5).")
    weight_decay: float = Field(
        1e-4, ge=0, description="Weight decay on non-bias parameters (official 1e-4)."
    )
    batch_size: int = Field(10, ge=1, description="Local batch size B (official local_bs=10).")
    cache_head_features: bool = Field(
        True,
        description="Compute body features once per local update for head-only epochs when the "
        "body is deterministic (same result, far fewer FLOPs).",
    )
    closed_form_head: bool = Field(
        True,
        description="With cached features, train a linear classification head by its hand-written "
        "gradient and PyTorch's SGD update instead of autograd (same arithmetic up to float "
        "reassociation, about 2.5x faster head epochs); false = the autograd loop.",
    )
    channels_last: bool = Field(
        True,
        description="Train and evaluate conv models on images in channels-last memory format on "
        "the CPU (oneDNN's fast layout: 1.38x a training epoch, 3.7x the head-cache forward pass "
        "of the paper's CNN here; same arithmetic up to float reassociation; GPUs keep their "
        "layout); false = PyTorch's default.",
    )
    final_finetune_epochs: int = Field(
        10,
        ge=0,
        description="At the last evaluation every client also reports accuracy after this many "
        "head-only epochs on the final body (official code's last round: max(10, tau_h) epochs); "
        "the tuned head is not kept.",
    )
    new_client_epochs: int = Field(
        10, ge=1, description="Epochs each new (held-out) client trains after the run (new-clients).")
