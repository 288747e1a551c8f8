"""Revelio's k-SAEs: one TopK SAE per (layer, timestep) on a feature cache's pooled features.

`python -m core.revelio.ksae --cache CACHE --out FOLDER` trains them with the core's `SAETrainer`
and writes each with `TopKSAE.save_pretrained` to `FOLDER/<layer>/t<timestep:04d>/`, so
`SAEBank.from_pretrained(FOLDER)` loads them all. The defaults are the paper's (expansion 64,
k = 32, Adam lr 4e-4, 500 warm-up steps, decoder rows renormalised after every step, loss =
normalised MSE, i.e. no AuxK). Each SAE's key is (layer, t = timestep / 1000, "cond"); the
integer timestep and the training recipe are kept in `cfg.metrics`.

One difference from the paper: the core's TopKSAE applies ReLU before TopK,
z = TopK(ReLU(W_enc (x - b_pre) + b_enc)), where Revelio has z = TopK(W_enc (x - b_pre) + b_enc).
They agree whenever the k largest pre-activations are positive; a negative value among them
is zero here instead of negative.
"""

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from core.revelio.cache_select import add_selection_args, select_pairs
from core.revelio.feature_cache import load_features, load_meta
from core.runtime import default_device, one_line_errors
from core.sae.model import CFG_FILE, SAEBank, TopKSAE
from core.training.trainer import SAETrainer, TrainConfig

PAPER_SAMPLES = 10_000_000
"""The paper trains for "10M steps"; read here as 10M training rows (samples)."""


def paper_config(**overrides: object) -> TrainConfig:
    """TrainConfig with Revelio's k-SAE recipe; keyword arguments override single fields."""
    recipe = dict(
        expansion_factor=64, k=32, lr=4e-4, warmup_steps=500, auxk_alpha=0.0, batch_size=1024
    )
    return TrainConfig(**{**recipe, **overrides})


def sae_t(timestep: int) -> float:
    """The SAEKey time of an integer DDPM timestep (t in [0, 1], 1 = noise)."""
    return timestep / 1000


def ksae_folder(out: str | Path, layer: str, timestep: int) -> Path:
    return Path(out) / layer / f"t{int(timestep):04d}"


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


def sae_timestep(sae: TopKSAE) -> int:
    """The integer timestep a k-SAE was trained at (from its metrics, else from t)."""
    if "timestep" in sae.cfg.metrics:
        return int(sae.cfg.metrics["timestep"])
    if sae.cfg.t is None:
        raise ValueError(f"the SAE for {sae.cfg.block} has no timestep; is it a k-SAE?")
    return round(sae.cfg.t * 1000)


def load_ksaes(folder: str | Path, device: str = "cpu") -> dict[tuple[str, int], TopKSAE]:
    """Every k-SAE under `folder`, keyed by (layer, integer timestep)."""
    bank = SAEBank.from_pretrained(Path(folder), device=device)
    return {(key.block, sae_timestep(sae)): sae for key, sae in bank.items()}


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m core.revelio.ksae",
        description="Train Revelio's k-SAEs on a feature cache's pooled features.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cache", required=True, help="feature cache folder")
    p.add_argument("--out", required=True, help="folder to write the SAEs to")
    add_selection_args(p)
    paper = paper_config()
    p.add_argument("--expansion-factor", type=int, default=paper.expansion_factor)
    p.add_argument("-k", "--k", type=int, default=paper.k, help="active latents per image")
    p.add_argument("--lr", type=float, default=paper.lr, help="Adam learning rate")
    p.add_argument("--warmup-steps", type=int, default=paper.warmup_steps)
    p.add_argument("--batch-size", type=int, default=paper.batch_size, help="rows per step")
    p.add_argument("--auxk-alpha", type=float, default=paper.auxk_alpha, help="0: paper's loss")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="passes over the images")
    length.add_argument(
        "--samples", type=int, help=f"training rows in all (default {PAPER_SAMPLES:,})"
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling")
    p.add_argument("--device", default=default_device())
    p.add_argument("--overwrite", action="store_true", help="replace existing SAEs")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    cfg = paper_config(
        expansion_factor=args.expansion_factor,
        k=args.k,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        auxk_alpha=args.auxk_alpha,
        seed=args.seed,
    )
    folders = train_cache(
        args.cache,
        args.out,
        cfg,
        layers=args.layers,
        timesteps=args.timesteps,
        epochs=args.epochs,
        samples=args.samples,
        device=args.device,
        overwrite=args.overwrite,
        progress=True,
    )
    for folder, metrics in folders.items():
        print(
            f"{folder}: {metrics['num_steps']} steps, explained variance "
            f"{metrics['final_explained_variance']:.3f} (all images, after training)"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return one_line_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
