"""Pictures of maps: heat maps, mask overlays and difference maps as PIL images.

Maps live on a block's coarse grid (2x2 to 64x64); they are shown at a display size with
nearest-neighbour upsampling, so every grid cell stays a visible square and nothing is
suggested below the grid's resolution.
"""

import matplotlib
import numpy as np
import torch
from PIL import Image

from core.emergence.metrics import rgb_floats

DISPLAY = 256
"""Side in pixels of every panel the app shows."""
INVALID_GREY = (128, 128, 128)
MASK_COLOUR = (255, 40, 40)


def as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if torch.is_tensor(values):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def upscale(image: Image.Image, side: int = DISPLAY) -> Image.Image:
    """`image` resized so its longer side is `side`, with nearest neighbour."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.NEAREST)


def for_display(image: Image.Image, side: int = DISPLAY) -> Image.Image:
    """Small images (the offline presets' 32 or 64 px) enlarged to `side`; others as they are."""
    return upscale(image, side) if max(image.size) < side else image


def heat_map(
    values: np.ndarray | torch.Tensor,
    side: int = DISPLAY,
    *,
    low: float | None = None,
    high: float | None = None,
    cmap: str = "magma",
) -> Image.Image:
    """A 2-D map as a colour image; NaN cells are grey. Bounds default to the map's range."""
    array = as_numpy(values)
    finite = np.isfinite(array)
    if low is None:
        low = float(np.min(array[finite])) if finite.any() else 0.0
    if high is None:
        high = float(np.max(array[finite])) if finite.any() else 1.0
    scaled = np.clip((np.where(finite, array, low) - low) / max(high - low, 1e-12), 0, 1)
    rgb = (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
    rgb[~finite] = INVALID_GREY
    return upscale(Image.fromarray(rgb), side)


def overlay(
    image: Image.Image,
    mask: np.ndarray | torch.Tensor,
    side: int = DISPLAY,
    colour: tuple[int, int, int] = MASK_COLOUR,
    alpha: float = 0.5,
) -> Image.Image:
    """`image` with a coarse mask (or a [0, 1] map) tinted in `colour`."""
    base = upscale(image, side)
    weights = np.clip(np.nan_to_num(as_numpy(mask)), 0, 1)
    weights = Image.fromarray((weights * 255).astype(np.uint8)).resize(
        base.size, Image.Resampling.NEAREST
    )
    tint = Image.new("RGB", base.size, colour)
    blend = np.asarray(weights, dtype=np.float32)[..., None] / 255 * alpha
    mixed = np.asarray(base) * (1 - blend) + np.asarray(tint) * blend
    return Image.fromarray(mixed.astype(np.uint8))


def normalised(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """A non-negative map divided by its maximum (all zeros stays zeros)."""
    array = np.clip(np.nan_to_num(as_numpy(values)), 0, None)
    peak = array.max() if array.size else 0.0
    return array / peak if peak > 0 else array


def difference_map(before: Image.Image, after: Image.Image, side: int = DISPLAY) -> Image.Image:
    """Per-pixel absolute difference (mean over RGB), 0 black to the largest change bright."""
    a, b = rgb_floats(before, after)
    return heat_map(np.abs(a - b).mean(axis=-1), side, low=0.0, cmap="inferno")
