"""Revelio's measurements on the shapes world: `python -m core.revelio.check --help`.

One-object scenes labelled by shape (or colour, or background style) are written as an
image folder (a train and a test split, balanced per class), their features cached with
`core.revelio.features` at several timesteps and layers, k-SAEs trained with
`core.revelio.ksae`, label purity measured with `core.revelio.purity` and Diff-C trained and
tested with `core.revelio.diffc`. The result is one table, per layer and timestep, of
sigma_label (with its chance value), majority fraction and Diff-C top-1, written as
`report.md` beside the CSV files.

The paper's findings to compare with: up_ft1 is best for fine-grained classes at small t,
and the bottleneck is competitive for coarse classes.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from simple_parsing import field

from core.revelio.cache_select import Selection
from core.revelio.diffc import AccuracyRow, DiffCConfig, DiffCRunConfig, Recipe, train_heads
from core.revelio.features import FeaturesConfig, cache_features
from core.revelio.ksae import KsaeConfig, train_ksaes
from core.revelio.latents import PAPER_MIN_FIRES
from core.revelio.purity import PurityConfig, PurityRow, measure_purity
from core.runtime import command
from core.shapes.world import LABELS, RADIUS_RANGE, write_image_folder

LAYERS = ("bottleneck", "up_ft0", "up_ft1", "up_ft2")
FINDING = (
    "Paper (SD 1.5/2.1, real images): up_ft1 is best for fine-grained classes at small t "
    "(t = 25); the bottleneck is competitive for coarse classes."
)


@dataclass
class CheckConfig:
    """Settings of `python -m core.revelio.check`."""

    out: Path
    """Folder for images, caches, SAEs and the report."""
    preset: str = "tiny"
    """Preset of the model."""
    model: str | None = None
    """Pipeline folder (overrides the preset's)."""
    label: str = field(default="shape", choices=sorted(LABELS))
    """What the class of a scene is."""
    train_per_class: int = 100
    """Training images per class."""
    test_per_class: int = 30
    """Test images per class."""
    resolution: int = 64
    """Scene side in pixels."""
    radius_range: tuple[float, float] = RADIUS_RANGE
    """Object radius as a fraction of the side (match the world the model was trained on)."""
    timesteps: tuple[int, ...] = (25, 100, 250, 500)
    """Integer timesteps of the features."""
    ksae_epochs: float = 50
    """k-SAE training: passes over the train images."""
    min_fires: int = PAPER_MIN_FIRES
    """Purity: a latent is measured only if it fires on more images than this (the paper's)."""
    diffc_epochs: int = Recipe.epochs
    """Diff-C training epochs (the paper's)."""
    diffc_width: int = DiffCConfig.width
    """Channels of every Diff-C conv (Table 10's)."""
    device: str = "cpu"
    """Torch device of every step."""


def run_check(config: CheckConfig) -> Path:
    """Run every step and write `report.md` under config.out; its path."""
    out = config.out
    for split, per_class, seed in (
        ("train", config.train_per_class, 1),
        ("test", config.test_per_class, 2),
    ):
        images = out / "images" / split
        if not images.is_dir():
            write_image_folder(
                images, per_class, seed, config.resolution, config.label, config.radius_range
            )
        features = FeaturesConfig(
            out=out / "cache" / split,
            images=images,
            preset=config.preset,
            model=config.model,
            layers=LAYERS,
            timesteps=config.timesteps,
            maps=True,
            resolution=config.resolution,
            device=config.device,
        )
        cache_features(features)
    train, test = out / "cache" / "train", out / "cache" / "test"
    select = Selection(device=config.device)
    train_ksaes(
        KsaeConfig(train, out / "ksae", epochs=config.ksae_epochs, overwrite=True, select=select)
    )
    purities = measure_purity(
        PurityConfig(
            train, out / "ksae", min_fires=config.min_fires, csv=out / "purity.csv", select=select
        )
    )
    accuracies = train_heads(
        DiffCRunConfig(
            train,
            out / "diffc",
            recipe=Recipe(epochs=config.diffc_epochs),
            width=config.diffc_width,
            test_cache=test,
            select=select,
        )
    )
    report = out / "report.md"
    report.write_text(table(purities, accuracies, config) + "\n")
    print(report.read_text())
    return report


def table(
    purities: Sequence[PurityRow], accuracies: Sequence[AccuracyRow], config: CheckConfig
) -> str:
    """One markdown row per (layer, timestep): purity with chance, and Diff-C top-1."""
    by_pair = {(r.layer, r.timestep): r for r in purities}
    top1 = {(r.layer, r.timestep): r.top1 for r in accuracies}
    lines = [
        f"Label: {config.label}; model: {config.model or config.preset}; "
        f"{config.train_per_class}/{config.test_per_class} train/test images per class; "
        f"Diff-C width {config.diffc_width}, {config.diffc_epochs} epochs.",
        "",
        "| layer | t | sigma_label (chance) | majority fraction (chance) | Diff-C top-1 |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(set(by_pair) | set(top1), key=lambda k: (k[1], k[0])):
        row = by_pair.get(key)
        sigma = _with_chance(row, "sigma_label")
        major = _with_chance(row, "majority_fraction")
        accuracy = f"{top1[key]:.3f}" if key in top1 else "-"
        lines.append(f"| `{key[0]}` | {key[1]} | {sigma} | {major} | {accuracy} |")
    return "\n".join([*lines, "", FINDING])


def _with_chance(row: PurityRow | None, measure: str) -> str:
    if row is None:
        return "-"
    return f"{getattr(row, measure):.3f} ({getattr(row, 'chance_' + measure):.3f})"


main = command(CheckConfig, run_check, "python -m core.revelio.check", __doc__)

if __name__ == "__main__":
    sys.exit(main())
