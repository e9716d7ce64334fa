"""Draw the Fashion-MNIST multi-domain benchmark: one row per domain (the five adaptation domains,
then the irrelevant one), one column per class, so the same class can be compared across domains.

Each row shows the first test image of classes 0..7 of that domain (domains hold disjoint images, so
columns show the same *class*, not the same picture).

    python bench/plot_domains.py                       # writes docs/figures/fmnist-domains.png
    python bench/plot_domains.py --seed 3 --out /tmp/domains.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedrep.data import domains

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
COLUMNS = 8
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "figures" / "fmnist-domains.png"


def first_of_each_class(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """[classes, 3, 32, 32]: the first image of each class 0..classes-1."""
    return torch.stack([x[int(torch.nonzero(y == c)[0])] for c in range(classes)])


def plot(out: Path, seed: int, data_dir: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = domains.ALL_DOMAINS
    fig, axes = plt.subplots(len(rows), COLUMNS, figsize=(COLUMNS * 1.05, len(rows) * 1.15))
    for r, name in enumerate(rows):
        x, y = domains.load_domain(name, "test", 256, seed=seed, data_dir=data_dir)
        for c, image in enumerate(first_of_each_class(x, y, COLUMNS)):
            ax = axes[r, c]
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(CLASS_NAMES[c], fontsize=8)
        label = f"{name}\n(not a source)" if name == domains.IRRELEVANT else name
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"Fashion-MNIST domains (fedrep.data.domains, seed {seed})", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: fedrep's search)")
    args = parser.parse_args()
    plot(args.out, args.seed, args.data_dir)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
