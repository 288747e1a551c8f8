"""Measures of images and masks shared by the evaluations and the app's views: label masks,
LPIPS and pixel differences (the models that label and score images are in
`core.annotate`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


def label_masks(annotations) -> dict[str, np.ndarray]:
    """Label -> union of its objects' masks."""
    masks: dict[str, np.ndarray] = {}
    for a in annotations:
        label = " ".join(a.label.casefold().split())
        masks[label] = masks[label] | a.mask if label in masks else a.mask.astype(bool)
    return masks


def rgb_floats(*images: Image.Image) -> list[np.ndarray]:
    """Each image as [H, W, 3] float32 RGB values in [0, 1]."""
    return [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]


def load_lpips(device: str | torch.device = "cpu") -> tuple[Callable | None, str | None]:
    """(LPIPS distance function, None) or (None, why it is unavailable).

    The `lpips` package fetches its backbone weights through torchvision on first use, so
    offline (or without the package) it cannot work; the caller then reports NaN.
    """
    try:
        import lpips

        net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as error:  # ImportError, download errors of any type, missing torchvision
        return None, f"LPIPS is unavailable ({type(error).__name__}: {error}); its column is NaN"

    @torch.no_grad()
    def distance(a: Image.Image, b: Image.Image) -> float:
        tensors = [torch.from_numpy(x).permute(2, 0, 1)[None].to(device) for x in rgb_floats(a, b)]
        return float(net(*(t * 2 - 1 for t in tensors)))

    return distance, None


NO_EFFECT = 1 / 255
"""An edit whose `pixel_difference` is below this (one grey level of 255) had no effect:
whether it "succeeded" says nothing about the edit."""


def pixel_difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two images, with pixel values in [0, 1]."""
    before, after = rgb_floats(a, b)
    return float(np.abs(before - after).mean())
