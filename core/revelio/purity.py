"""Label purity of k-SAE latents, with a chance reference; optional grids of top images.

    python -m core.revelio.purity --cache CACHE --saes SAES [--csv purity.csv]

Per (layer, timestep) with a k-SAE: sigma_label, majority fraction and label entropy of the
top images of the most activating latents, beside the same measures on random image sets
(`core.revelio.latents` says how each is read from the paper and the authors' released code).
With `--images` and `--grids`, the top images of the 8 most activating latents (or
`--latents`) are drawn as grids.
"""

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from simple_parsing import field
from torch import Tensor

from core.files import write_csv
from core.revelio.cache_select import Selection, select_pairs
from core.revelio.feature_cache import FeatureMeta, load_features, load_meta
from core.revelio.ksae_folders import load_ksaes
from core.revelio.latents import (
    DEFAULT_ACTIVATIONS,
    PAPER_IMAGES,
    PAPER_LATENTS,
    PAPER_MIN_FIRES,
    Activations,
    LatentSummary,
    Purity,
    chance_purity,
    image_loader,
    latent_grid,
    latent_purity,
    summarize_latents,
)
from core.runtime import command
from core.sae.model import TopKSAE


@dataclass
class PurityConfig:
    """Settings of `python -m core.revelio.purity`."""

    cache: Path
    """Feature cache folder."""
    saes: Path
    """Folder written by python -m core.revelio.ksae."""
    top_latents: int = PAPER_LATENTS
    """Latents measured: the most activating ones."""
    top_images: int = PAPER_IMAGES
    """Images per latent."""
    min_fires: int = PAPER_MIN_FIRES
    """A latent is measured only if it fires on more images than this."""
    activations: Activations = DEFAULT_ACTIVATIONS
    """A latent's score on an image, which decides where it fires, its mean and its top
    images: dense (the encoder output before TopK, after ReLU, as Revelio's released code)
    or code (its entry in the k-sparse code)."""
    images: Path | None = None
    """Image folder (meta.images are relative to it); goes with --grids."""
    grids: Path | None = None
    """Folder to write top-image grids to; goes with --images."""
    latents: tuple[int, ...] | None = None
    """Latents to draw (default: the 8 most activating)."""
    csv: Path | None = None
    """Also write the table to this CSV file."""
    seed: int = 0
    """Seed of the chance reference."""
    select: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        if bool(self.images) != bool(self.grids):
            raise ValueError("--images and --grids go together")


@dataclass
class PurityRow:
    layer: str
    timestep: int
    latents: int
    sigma_label: float
    majority_fraction: float
    entropy: float
    chance_sigma_label: float
    chance_majority_fraction: float
    chance_entropy: float


def purity_row(layer: str, timestep: int, measured: Purity, chance: Purity) -> PurityRow:
    return PurityRow(
        layer,
        timestep,
        measured.num_latents,
        measured.sigma_label,
        measured.majority_fraction,
        measured.entropy,
        chance.sigma_label,
        chance.majority_fraction,
        chance.entropy,
    )


def format_table(rows: Sequence[PurityRow]) -> str:
    header = (
        f"{'layer':<22} {'t':>5} {'latents':>7}  {'sigma_label':>11} {'majority':>8} "
        f"{'entropy':>7}   chance: {'sigma':>6} {'major.':>6} {'entr.':>6}"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.layer:<22} {r.timestep:>5} {r.latents:>7}  {r.sigma_label:>11.3f} "
            f"{r.majority_fraction:>8.3f} {r.entropy:>7.3f}           {r.chance_sigma_label:>6.3f} "
            f"{r.chance_majority_fraction:>6.3f} {r.chance_entropy:>6.3f}"
        )
    return "\n".join(lines)


def inspect_pair(
    config: PurityConfig, meta: FeatureMeta, sae: TopKSAE, layer: str, timestep: int
) -> PurityRow:
    features = load_features(config.cache, layer, timestep, "pooled")
    summary = summarize_latents(sae, features, config.top_images, activations=config.activations)
    measured, chosen = latent_purity(
        summary,
        meta.labels,
        len(meta.classes),
        latents=config.top_latents,
        images=config.top_images,
        min_fires=config.min_fires,
    )
    chance = chance_purity(
        meta.labels, config.top_images, len(chosen), len(meta.classes), seed=config.seed
    )
    if config.grids:
        write_grids(config, meta, summary, chosen, layer, timestep)
    return purity_row(layer, timestep, measured, chance)


def write_grids(
    config: PurityConfig,
    meta: FeatureMeta,
    summary: LatentSummary,
    chosen: Tensor,
    layer: str,
    timestep: int,
) -> None:
    load = image_loader(config.images, meta)
    folder = config.grids / layer / f"t{timestep:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    latents = config.latents or chosen[:8].tolist()
    for latent in latents:
        if not 0 <= latent < len(summary.fire_count):
            raise ValueError(
                f"latent {latent} is out of range; the SAE has {len(summary.fire_count)}"
            )
        grid = latent_grid(summary, latent, load, meta, images=config.top_images)
        grid.save(folder / f"latent{latent:06d}.png")


def measure_purity(config: PurityConfig) -> list[PurityRow]:
    """One row per (layer, timestep) asked for (by default: every one with a k-SAE)."""
    meta = load_meta(config.cache)
    saes = load_ksaes(config.saes, device=config.select.device)
    selection = config.select
    pairs = select_pairs(meta, selection.layers, selection.timesteps)
    if not (selection.layers or selection.timesteps):
        pairs = [pair for pair in pairs if pair in saes] or pairs
    rows = []
    for layer, timestep in pairs:
        if (layer, timestep) not in saes:
            held = ", ".join(f"{block} t={t}" for block, t in sorted(saes))
            raise ValueError(f"no k-SAE for {layer} t={timestep} in {config.saes}; it holds {held}")
        rows.append(inspect_pair(config, meta, saes[(layer, timestep)], layer, timestep))
    print(format_table(rows))
    if config.csv:
        write_csv(config.csv, [asdict(row) for row in rows])
    return rows


main = command(PurityConfig, measure_purity, "python -m core.revelio.purity", __doc__)

if __name__ == "__main__":
    sys.exit(main())
