"""Feature maps as colour images: the first three principal components as RGB.

Every spatial position of a [C, H, W] map is a C-dimensional feature; PCA over the
positions (of one map, or of several maps jointly so that a colour means the same thing in
every image) gives three directions, and each position's coordinates along them, each
min-max scaled to [0, 1] over all positions, are its red, green and blue.

Sign convention: a principal direction is only defined up to sign, so each is flipped to
make its largest-magnitude channel loading positive. The same maps always give the same
colours.

    rgb = pca_rgb(maps)                      # [N, C, H, W] -> [N, H, W, 3] in [0, 1]
    images = pca_images(maps, size=256)      # PIL images, upsampled (nearest)
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from core.revelio.feature_cache import load_features

COMPONENTS = 3
RELATIVE_TOLERANCE = 1e-6
"""A direction whose singular value is below this fraction of the first one is noise."""


def principal_directions(rows: Tensor, count: int = COMPONENTS) -> Tensor:
    """[k, C] leading principal directions of [P, C] rows, signs fixed (see module).

    k <= count: directions along which the rows do not vary are left out.
    """
    centred = rows - rows.mean(dim=0)
    _, strengths, directions = torch.linalg.svd(centred, full_matrices=False)
    varies = strengths[:count] > strengths[0] * RELATIVE_TOLERANCE
    directions = directions[:count][varies]
    largest = directions.abs().argmax(dim=1, keepdim=True)
    return directions * directions.gather(1, largest).sign()


def _minmax(values: Tensor) -> Tensor:
    """Scale each column of [P, k] to [0, 1]."""
    low, high = values.min(dim=0).values, values.max(dim=0).values
    return (values - low) / (high - low)


def pca_rgb(maps: Tensor) -> Tensor:
    """[C, H, W] -> [H, W, 3], or [N, C, H, W] -> [N, H, W, 3] with one PCA over all N.

    Channels beyond the number of directions the features vary along are 0.
    """
    single = maps.ndim == 3
    maps = maps[None] if single else maps
    n, channels, height, width = maps.shape
    rows = maps.double().permute(0, 2, 3, 1).reshape(-1, channels)
    directions = principal_directions(rows)
    rgb = torch.zeros(rows.shape[0], COMPONENTS, dtype=torch.float64)
    rgb[:, : len(directions)] = _minmax((rows - rows.mean(dim=0)) @ directions.T)
    rgb = rgb.reshape(n, height, width, COMPONENTS).float()
    return rgb[0] if single else rgb


def to_image(rgb: Tensor, size: int | None = None) -> Image.Image:
    """An [H, W, 3] array in [0, 1] as a PIL image, upsampled (nearest) to size x size."""
    array = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(array))
    return image if size is None else image.resize((size, size), Image.Resampling.NEAREST)


def pca_images(maps: Tensor, size: int | None = None) -> list[Image.Image]:
    """One image per map of [N, C, H, W] (or [C, H, W]), colours from one joint PCA."""
    rgb = pca_rgb(maps)
    rgb = rgb[None] if rgb.ndim == 3 else rgb
    return [to_image(one, size) for one in rgb]


def cached_pca_images(
    cache: str | Path, layer: str, timestep: int, indices: Sequence[int], size: int | None = None
) -> list[Image.Image]:
    """PCA images of cached maps (extracted with `--maps`) of images `indices`, jointly."""
    maps = load_features(cache, layer, timestep, "maps")
    bad = [i for i in indices if not 0 <= i < len(maps)]
    if bad:
        raise ValueError(f"image indices {bad} are outside 0..{len(maps) - 1}")
    return pca_images(maps[list(indices)], size)
