"""Neuron inspection of k-SAEs: top-activating images per latent, label purity, image grids.

Revelio measures how class-specific a k-SAE's latents are by sigma_label: "the average
standard deviation in the class labels of the top-10 most highly activating images among the
top 1000 most highly activating features". The text does not say which activations; read
here as in the authors' released code (SD-kSAE/training/save_feature.py):

- a latent's score on an image is its dense encoder output before TopK, after a ReLU:
  relu(W_enc (x - b_pre) + b_enc) (`activations="dense"`, the default); `"code"` scores by
  the latent's entry in the k-sparse code instead, so a latent fires only where it is among
  the image's top k;
- the "most highly activating" latents are those with the largest mean score over the
  images they fire on (score > 0), among latents that fire on more than 10 images (fewer
  than 1000 when fewer qualify, where the released code fills up with latents that do not);
- each latent's top images are its 10 highest-scoring ones, and the std is the sample
  standard deviation (n - 1 in the denominator) of their 10 class indices, averaged over
  the latents.

sigma_label depends on how the classes happen to be numbered (a latent firing on classes 0
and 1 scores far better than one firing on classes 0 and 36), so two measures that do not are
reported beside it: the majority fraction (share of the images in the most common class) and
the label entropy normalised to [0, 1] by log(min(images, classes)). A chance reference
computes all three on random image sets of the same size.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from core.revelio.feature_cache import FeatureMeta
from core.sae.model import TopKSAE

Activations = Literal["code", "dense"]
DEFAULT_ACTIVATIONS: Activations = "dense"
"""The paper does not say which activations rank images; Revelio's released code uses these."""
PAPER_LATENTS, PAPER_IMAGES, PAPER_MIN_FIRES = 1000, 10, 10


@dataclass
class LatentSummary:
    """What every latent of an SAE does on a set of images."""

    top_images: Tensor
    """[n, m] int64: indices of each latent's m most activating images, most activating first."""
    top_values: Tensor
    """[n, m]: their activations (0 where the latent fires on fewer than m images)."""
    fire_count: Tensor
    """[n] int64: number of images each latent fires (is > 0) on."""
    act_sum: Tensor
    """[n] float64: sum of each latent's activations."""

    @property
    def mean_activation(self) -> Tensor:
        """[n]: mean activation of each latent over the images it fires on."""
        return self.act_sum / self.fire_count.clamp_min(1)


@dataclass
class Purity:
    sigma_label: float
    """Mean over latents of the sample std of their top images' class indices (lower = purer)."""
    majority_fraction: float
    """Mean share of a latent's top images in their most common class (higher = purer)."""
    entropy: float
    """Mean label entropy of the top images / log(min(images, classes)) (lower = purer)."""
    num_latents: int
    """Number of latents (or random image sets) averaged over."""


@torch.no_grad()
def latent_activations(
    sae: TopKSAE, x: Tensor, activations: Activations = DEFAULT_ACTIVATIONS
) -> Tensor:
    """[N, n] scores of every latent on rows x [N, d]: the dense ReLU encoder output, or the
    k-sparse code."""
    if activations == "code":
        return sae.encode_dense(x)
    if activations == "dense":
        return sae.encode(x).pre_acts
    raise ValueError(f'activations must be "code" or "dense", got {activations!r}')


@torch.no_grad()
def summarize_latents(
    sae: TopKSAE,
    features: Tensor,
    top_m: int = PAPER_IMAGES,
    *,
    activations: Activations = DEFAULT_ACTIVATIONS,
    chunk: int = 256,
) -> LatentSummary:
    """Top images, firing counts and activation sums of every latent on pooled features [N, d].

    Images are encoded `chunk` at a time, so no [N, n] matrix is held at once.
    """
    n, device = sae.cfg.num_latents, sae.b_dec.device
    m = min(top_m, len(features))
    values = torch.full((n, m), -math.inf, device=device)
    images = torch.zeros((n, m), dtype=torch.int64, device=device)
    fire_count = torch.zeros(n, dtype=torch.int64, device=device)
    act_sum = torch.zeros(n, dtype=torch.float64, device=device)
    for start in range(0, len(features), chunk):
        acts = latent_activations(sae, features[start : start + chunk].to(device), activations).T
        fire_count += (acts > 0).sum(dim=1)
        act_sum += acts.double().sum(dim=1)
        rows = torch.arange(start, start + acts.shape[1], device=device).expand(n, -1)
        values, order = torch.cat([values, acts], dim=1).topk(m, dim=1)
        images = torch.cat([images, rows], dim=1).gather(1, order)
    return LatentSummary(images.cpu(), values.clamp_min(0).cpu(), fire_count.cpu(), act_sum.cpu())


def most_activating_latents(
    summary: LatentSummary, count: int = PAPER_LATENTS, min_fires: int = PAPER_MIN_FIRES
) -> Tensor:
    """Up to `count` latents with the largest mean activation, among those firing on more
    than `min_fires` images; most activating first."""
    eligible = (summary.fire_count > min_fires).nonzero().squeeze(1)
    order = summary.mean_activation[eligible].argsort(descending=True, stable=True)
    return eligible[order[:count]]


def sigma_label(label_sets: Tensor) -> float:
    """Mean over rows of the sample std of each row's class indices. label_sets: [L, m]."""
    _check_sets(label_sets)
    return label_sets.double().std(dim=1).mean().item()


def majority_fraction(label_sets: Tensor) -> float:
    """Mean over rows of the share of the row's most common label."""
    _check_sets(label_sets)
    return (_label_counts(label_sets).max(dim=1).values / label_sets.shape[1]).mean().item()


def label_entropy(label_sets: Tensor, num_classes: int) -> float:
    """Mean over rows of the labels' entropy / log(min(m, num_classes)), in [0, 1]."""
    _check_sets(label_sets)
    ceiling = math.log(min(label_sets.shape[1], num_classes))
    if ceiling == 0:
        return 0.0
    p = _label_counts(label_sets) / label_sets.shape[1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1)
    return (entropy / ceiling).mean().item()


def purity(label_sets: Tensor, num_classes: int) -> Purity:
    """All three measures on label sets [L, m] (one row of m class indices per latent)."""
    return Purity(
        sigma_label(label_sets),
        majority_fraction(label_sets),
        label_entropy(label_sets, num_classes),
        len(label_sets),
    )


def chance_purity(
    labels: Sequence[int], images: int, sets: int, num_classes: int, seed: int = 0
) -> Purity:
    """The measures on `sets` random sets of `images` distinct images: what no structure gives."""
    generator = torch.Generator().manual_seed(seed)
    label_tensor = torch.as_tensor(labels)
    picks = torch.stack(
        [torch.randperm(len(label_tensor), generator=generator)[:images] for _ in range(sets)]
    )
    return purity(label_tensor[picks], num_classes)


def latent_purity(
    summary: LatentSummary,
    labels: Sequence[int],
    num_classes: int,
    *,
    latents: int = PAPER_LATENTS,
    images: int = PAPER_IMAGES,
    min_fires: int = PAPER_MIN_FIRES,
) -> tuple[Purity, Tensor]:
    """Purity of the top `images` images of the `latents` most activating latents, and those
    latents' ids. Raises ValueError when no latent fires on more than `min_fires` images."""
    if images > summary.top_images.shape[1]:
        raise ValueError(
            f"the summary keeps {summary.top_images.shape[1]} images per latent; "
            f"summarize with top_m >= {images}"
        )
    chosen = most_activating_latents(summary, latents, min_fires)
    if len(chosen) == 0:
        raise ValueError(
            f"no latent fires on more than {min_fires} images; use more images or a lower "
            "--min-fires"
        )
    label_sets = torch.as_tensor(labels)[summary.top_images[chosen, :images]]
    return purity(label_sets, num_classes), chosen


def image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    *,
    columns: int = 5,
    tile: int = 128,
) -> Image.Image:
    """Images resized to tile x tile, `columns` per row, each with its caption below it."""
    if not images:
        raise ValueError("no images to put in a grid")
    caption_height = 14 if captions else 0
    rows = math.ceil(len(images) / columns)
    width, height = columns * tile, rows * (tile + caption_height)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * tile, (i // columns) * (tile + caption_height)
        grid.paste(image.convert("RGB").resize((tile, tile)), (x, y))
        if captions:
            draw.text((x + 2, y + tile + 1), captions[i][: tile // 6], fill="black")
    return grid


def latent_grid(
    summary: LatentSummary,
    latent: int,
    load_image: Callable[[int], Image.Image],
    meta: FeatureMeta,
    *,
    images: int = PAPER_IMAGES,
    columns: int = 5,
    tile: int = 128,
) -> Image.Image:
    """A grid of the latent's most activating images, captioned "class (activation)".

    Images the latent does not fire on are left out.
    """
    top = zip(
        summary.top_images[latent, :images].tolist(),
        summary.top_values[latent, :images].tolist(),
        strict=True,
    )
    pairs = [(i, v) for i, v in top if v > 0]
    if not pairs:
        raise ValueError(f"latent {latent} fires on none of the images")
    captions = [f"{meta.classes[meta.labels[i]]} ({v:.2f})" for i, v in pairs]
    return image_grid([load_image(i) for i, _ in pairs], captions, columns=columns, tile=tile)


def image_loader(folder: str | Path, meta: FeatureMeta) -> Callable[[int], Image.Image]:
    """load(i): image i of the cache, read from `folder` / meta.images[i]."""

    def load(i: int) -> Image.Image:
        path = Path(folder) / meta.images[i]
        if not path.is_file():
            raise FileNotFoundError(f"image {i} ({meta.images[i]}) is not in {folder}")
        with Image.open(path) as image:
            return image.convert("RGB")

    return load


def _check_sets(label_sets: Tensor) -> None:
    if label_sets.ndim != 2 or label_sets.shape[1] < 2 or len(label_sets) == 0:
        raise ValueError(
            f"label sets must have shape [latents >= 1, images >= 2], got {tuple(label_sets.shape)}"
        )


def _label_counts(label_sets: Tensor) -> Tensor:
    """[L, max label + 1] count of each label in each row."""
    width = int(label_sets.max()) + 1
    counts = torch.zeros(len(label_sets), width, dtype=torch.float64)
    return counts.scatter_add_(
        1, label_sets.long(), torch.ones_like(label_sets, dtype=torch.float64)
    )
