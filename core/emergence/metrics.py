"""Measures of images and masks shared by the evaluations and the app's views: label masks,
CLIP similarity, LPIPS, pixel differences, and the segmenter that finds where an edited
object went."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from core.annotate.clipseg import CLIPSEG_ID
from core.annotate.loading import (
    Source,
    load_model,
    load_processor,
    model_inputs,
    resolve_device_dtype,
)
from core.annotate.tags import CLIP_ID

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

    from core.annotate.clipseg import ClipSegSegmenter
    from core.shapes.annotate import ToySegmenter


def label_masks(annotations) -> dict[str, np.ndarray]:
    """Label -> union of its objects' masks."""
    masks: dict[str, np.ndarray] = {}
    for a in annotations:
        label = " ".join(a.label.casefold().split())
        masks[label] = masks[label] | a.mask if label in masks else a.mask.astype(bool)
    return masks


class ClipScorer:
    """Cosine similarity between images and a text, with CLIP."""

    def __init__(
        self,
        model: Source | PreTrainedModel = CLIP_ID,
        processor: Source | ProcessorMixin | None = None,
        *,
        device: str | torch.device | None = None,
    ):
        self.device, self.dtype = resolve_device_dtype(device, torch.float32)
        self.model = load_model("CLIPModel", model, "CLIP scorer", self.device, self.dtype)
        self.processor = load_processor(processor, model, "CLIP scorer")

    @torch.no_grad()
    def similarity(self, images: Sequence[Image.Image], text: str) -> list[float]:
        inputs = self.processor(
            text=[text],
            images=[im.convert("RGB") for im in images],
            padding=True,
            return_tensors="pt",
        )
        out = self.model(**model_inputs(inputs, self.device, self.dtype))
        image_embeds = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image_embeds @ text_embeds.T)[:, 0].tolist()


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


def make_segmenter(
    annotator: str, clipseg_model: str = CLIPSEG_ID, device: str | torch.device | None = None
) -> ClipSegSegmenter | ToySegmenter:
    """The spatial-edit evaluator's segmenter: shapes-world pixels for the toy annotator, else
    CLIPSeg."""
    from core.annotate.clipseg import ClipSegSegmenter
    from core.shapes.annotate import ToySegmenter  # imports scipy: only for this world

    if annotator == "toy":
        return ToySegmenter()
    return ClipSegSegmenter(clipseg_model, device=device)
