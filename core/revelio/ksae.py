"""Revelio's k-SAEs: one TopK SAE per (layer, timestep) on a feature cache's pooled features.

`python -m core.revelio.ksae --cache CACHE --out FOLDER` trains them with the core's `SAETrainer`
and writes each with `TopKSAE.save_pretrained` to `FOLDER/<layer>/t<timestep:04d>/`
(`core.revelio.ksae_folders`). The defaults are the paper's (`KsaeRecipe`: expansion 64,
k = 32, Adam lr 4e-4, 500 warm-up steps, decoder rows renormalised after every step, loss =
normalised MSE, i.e. no AuxK). The integer timestep and the training recipe are kept in
`cfg.metrics`.

One difference from the paper: the core's TopKSAE applies ReLU before TopK,
z = TopK(ReLU(W_enc (x - b_pre) + b_enc)), where Revelio has z = TopK(W_enc (x - b_pre) + b_enc).
They agree whenever the k largest pre-activations are positive; a negative value among them
is zero here instead of negative.
"""

import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from simple_parsing import field
from torch import Tensor
from tqdm.auto import tqdm

from core.revelio.cache_select import Selection, select_pairs
from core.revelio.feature_cache import load_features, load_meta
from core.revelio.ksae_folders import ksae_folder, sae_t
from core.runtime import command
from core.sae.config import CFG_FILE
from core.sae.model import TopKSAE
from core.training.trainer import SAETrainer, TrainConfig

PAPER_SAMPLES = 10_000_000
"""The paper trains for "10M steps"; read here as 10M training rows (samples)."""


@dataclass
class KsaeRecipe:
    """Revelio's k-SAE recipe: the paper's values by default."""

    expansion_factor: int = 64
    """Latents per feature channel."""
    k: int = field(default=32, alias="-k")
    """Active latents per image."""
    lr: float = 4e-4
    """Adam learning rate."""
    warmup_steps: int = 500
    """Steps of linear learning-rate warm-up."""
    batch_size: int = 8192
    """Rows (images) per step, at most the number of images (the paper does not give it; the
    authors' released code uses 8,192)."""
    auxk_alpha: float = 0.0
    """Weight of the AuxK loss; 0 is the paper's loss, the normalised MSE alone."""
    seed: int = 0
    """Seed of the initialisation and of the shuffling."""


def paper_config(**overrides: object) -> TrainConfig:
    """TrainConfig with Revelio's k-SAE recipe; keyword arguments override single fields."""
    return TrainConfig(**{**asdict(KsaeRecipe()), **overrides})


def num_steps(rows: int, batch_size: int, epochs: float | None, samples: int | None) -> int:
    """Optimisation steps for `epochs` passes over `rows` rows, else for `samples` rows."""
    total = epochs * rows if epochs is not None else (samples or PAPER_SAMPLES)
    return max(1, math.ceil(total / min(batch_size, rows)))


def batch_indices(rows: int, batch_size: int, steps: int, seed: int) -> Iterator[Tensor]:
    """`steps` batches of row indices from seeded shuffles of range(rows), epoch after epoch.

    A batch that reaches the end of one shuffle continues into the next, so every batch has
    min(batch_size, rows) rows and every row is seen equally often.
    """
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, rows)
    pending = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(rows, generator=generator)])
        yield pending[:size]
        pending = pending[size:]


def train_ksae(
    features: Tensor,
    cfg: TrainConfig,
    steps: int,
    *,
    layer: str,
    timestep: int,
    model: str = "",
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> TopKSAE:
    """Train one k-SAE on pooled features [N, d] for `steps` steps; the SAE in raw units."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(
            f"a k-SAE needs pooled features of shape [N >= 2, d], got {tuple(features.shape)}"
        )
    trainer = SAETrainer(
        features.shape[1], cfg, model=model, block=layer, t=sae_t(timestep), device=device
    )
    x = features.to(device, torch.float32)
    trainer.calibrate(x)
    batches = batch_indices(len(x), cfg.batch_size, steps, cfg.seed)
    for index in tqdm(batches, total=steps, desc=f"{layer} t={timestep}", disable=not progress):
        trainer.step(x[index.to(x.device)])
    sae = trainer.export()
    sae.cfg.metrics.update(
        final_explained_variance=explained_variance(sae, x),
        timestep=int(timestep),
        recipe=asdict(cfg),
    )
    return sae.to("cpu")


@torch.no_grad()
def explained_variance(sae: TopKSAE, x: Tensor, chunk: int = 1024) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all rows, in chunks."""
    residual = sum((rows - sae(rows).x_hat).pow(2).sum().item() for rows in x.split(chunk))
    total = (x - x.mean(dim=0)).pow(2).sum().item()
    return 1.0 - residual / total if total > 0 else 0.0


def train_cache(
    cache: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    layers: Sequence[str] | None = None,
    timesteps: Sequence[int] | None = None,
    epochs: float | None = None,
    samples: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = False,
) -> dict[Path, dict]:
    """Train and save a k-SAE for each chosen (layer, timestep); each folder's metrics."""
    meta = load_meta(cache)
    pairs = select_pairs(meta, layers, timesteps)
    for layer, timestep in pairs:
        if (ksae_folder(out, layer, timestep) / CFG_FILE).exists() and not overwrite:
            raise ValueError(
                f"{ksae_folder(out, layer, timestep)} already holds a k-SAE; "
                "pass --overwrite to replace it"
            )
    folders = {}
    for layer, timestep in pairs:
        features = load_features(cache, layer, timestep, "pooled")
        steps = num_steps(len(features), cfg.batch_size, epochs, samples)
        sae = train_ksae(
            features,
            cfg,
            steps,
            layer=layer,
            timestep=timestep,
            model=meta.model,
            device=device,
            progress=progress,
        )
        folders[sae.save_pretrained(ksae_folder(out, layer, timestep))] = sae.cfg.metrics
    return folders


@dataclass
class KsaeConfig:
    """Settings of `python -m core.revelio.ksae`."""

    cache: Path
    """Feature cache folder."""
    out: Path
    """Folder to write the SAEs to."""
    recipe: KsaeRecipe = field(default_factory=KsaeRecipe)
    epochs: float | None = None
    """Passes over the images (or give --samples)."""
    samples: int | None = None
    """Training rows in all (default: 10,000,000, the paper's "10M steps")."""
    overwrite: bool = False
    """Replace existing SAEs."""
    select: Selection = field(default_factory=Selection)

    def __post_init__(self) -> None:
        if self.epochs is not None and self.samples is not None:
            raise ValueError("give the training length as --epochs or --samples, not both")


def train_ksaes(config: KsaeConfig) -> dict[Path, dict]:
    """Train and save the k-SAEs the config asks for; each folder's metrics."""
    folders = train_cache(
        config.cache,
        config.out,
        paper_config(**asdict(config.recipe)),
        layers=config.select.layers,
        timesteps=config.select.timesteps,
        epochs=config.epochs,
        samples=config.samples,
        device=config.select.device,
        overwrite=config.overwrite,
        progress=True,
    )
    for folder, metrics in folders.items():
        print(
            f"{folder}: {metrics['num_steps']} steps, explained variance "
            f"{metrics['final_explained_variance']:.3f} (all images, after training)"
        )
    return folders


main = command(KsaeConfig, train_ksaes, "python -m core.revelio.ksae", __doc__)

if __name__ == "__main__":
    sys.exit(main())
