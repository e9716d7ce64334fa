"""The image-classification data sets (Fashion-MNIST, the paper's CIFAR-10/100, a PFLlib folder):
what configuration knows about them, and their one key of their own (``augment``).

Kept apart from the loaders (``fashion_mnist.py``, ``cifar.py``, ``partition_file.py``) so that
:mod:`fedrep.config` can read it without importing torch.
"""

from __future__ import annotations

from pydantic import Field

from fedrep.keys import DatasetSpec, KeySection

FASHION_MNIST = DatasetSpec("fashion-mnist", 10, ("cnn", "mlp", "cnn-bn", "fedavg-cnn"), indexable=True)
# official get_model: CNNCifar (scripts/FedRep_cifar10_*)
CIFAR10 = DatasetSpec("cifar10", 10, ("cnn", "fedavg-cnn", "mlp"), indexable=True)
# official CNNCifar100; scripts/FedRep_cifar100_20shards.sh: s=20, --local_ep 15 --local_rep_ep 5
CIFAR100 = DatasetSpec("cifar100", 100, ("cnn-cifar100", "cnn", "fedavg-cnn", "mlp"), indexable=True,
                       defaults={"classes-per-client": 20, "head-epochs": 10, "body-epochs": 5})
# A PFLlib folder: its config.json gives the classes; PFLlib's own CNN first.
PFLLIB = DatasetSpec("pfllib", 0, ("fedavg-cnn", "cnn", "mlp"), default_partition="file")

SPECS = (FASHION_MNIST, CIFAR10, CIFAR100, PFLLIB)


class ImageKeys(KeySection):
    """Keys of the image sets."""

    augment: bool = Field(
        True, description="CIFAR-10/100: random crop (padding 4) and horizontal flip of train "
        "images, as the official train transform (utils/train_utils.py trans_cifar*_train); no "
        "effect on other data sets. Turns off head-feature caching (features change every epoch).")
