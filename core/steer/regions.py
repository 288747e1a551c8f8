"""The region of an edit that needs one: a mask at image resolution, on a block's grid."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.quadrants import QUADRANTS


def quadrant_mask(name: str, size: tuple[int, int]) -> np.ndarray:
    """A bool mask of one image quadrant, e.g. "top_left", at image size (H, W)."""
    if name not in QUADRANTS:
        raise ValueError(f"unknown quadrant {name!r}; choose one of {', '.join(QUADRANTS)}")
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    rows = slice(0, height // 2) if name.startswith("top") else slice(height // 2, height)
    cols = slice(0, width // 2) if name.endswith("left") else slice(width // 2, width)
    mask[rows, cols] = True
    return mask


def region_on_grid(region: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """Resize an image-resolution mask to a block's grid: area average, then > 0.5."""
    mask = torch.as_tensor(np.asarray(region, dtype=np.float32))[None, None]
    return F.interpolate(mask, size=grid, mode="area")[0, 0] > 0.5


def check_region(region: np.ndarray | None, image_size: tuple[int, int], kind: str) -> None:
    """Refuse a missing, mis-sized, empty or whole-image region of a `kind` edit, with one
    sentence."""
    if region is None:
        raise ValueError(f"a {kind} edit needs a region: a mask or a quadrant name")
    region = np.asarray(region)
    if region.shape != tuple(image_size):
        raise ValueError(
            f"the mask has shape {region.shape} but the image is {tuple(image_size)}; "
            "draw it at image resolution"
        )
    inside = region > 0.5
    if not inside.any():
        raise ValueError("the mask is empty; mark the region where the object should go")
    if inside.all():
        raise ValueError("the mask covers the whole image; use a global edit instead")


def region_missed(region: np.ndarray, grid: tuple[int, int]) -> str:
    """Why a region too small for the block's grid edits nothing, and what to draw instead."""
    cell = f"{region.shape[0] // grid[0]}x{region.shape[1] // grid[1]}"
    return (
        f"the region covers no position of the block's {grid[0]}x{grid[1]} grid (each "
        f"{cell} pixels of the image): cover at least half of one"
    )
