"""CLIPSeg, the emergence paper's evaluator of spatially targeted edits, and a lighter
labeller of images than Grounded SAM.

An edit that moves object o to quadrant q succeeds when the centre of mass of CLIPSeg's
probability map for o lies in q (10 objects x 4 quadrants; chance is 0.25). As a labeller
(`ClipSegAnnotator`), a tagger names the image's objects and CLIPSeg's map of each name,
thresholded, is its mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from core.annotate.annotation import ObjectAnnotation
from core.annotate.loading import HubModel, model_inputs

if TYPE_CHECKING:
    from core.annotate.tags import Tagger

CLIPSEG_ID = "CIDAS/clipseg-rd64-refined"


class ClipSegSegmenter(HubModel):
    """Text-prompted soft segmentation: one probability map per word, at image resolution."""

    model_class = "CLIPSegForImageSegmentation"
    source = CLIPSEG_ID
    what = "CLIPSeg segmenter"

    @torch.no_grad()
    def segment(self, image: Image.Image, words: Iterable[str]) -> dict[str, np.ndarray]:
        """word -> float32 [H, W] probabilities in [0, 1].

        CLIPSeg sees a square resize of the image; its logits are resized back to the
        image's own height and width before the sigmoid.
        """
        words = list(dict.fromkeys(words))
        if not words:
            return {}
        image = image.convert("RGB")
        inputs = self.processor(
            text=words, images=[image] * len(words), padding=True, return_tensors="pt"
        )
        logits = self.model(**model_inputs(inputs, self.device, self.dtype)).logits
        logits = logits.float().reshape(len(words), 1, *logits.shape[-2:])
        size = (image.height, image.width)
        maps = torch.nn.functional.interpolate(logits, size=size, mode="bilinear").sigmoid()
        return dict(zip(words, maps[:, 0].cpu().numpy(), strict=True))


class ClipSegAnnotator:
    """Tags -> CLIPSeg maps -> masks: each tag's object is where its probability is at least
    `threshold` (a tag with no such pixel is dropped); its score is the map's peak."""

    def __init__(self, tagger: Tagger, segmenter: ClipSegSegmenter, threshold: float = 0.5):
        self.tagger, self.segmenter, self.threshold = tagger, segmenter, threshold

    def annotate(self, image: Image.Image, prompt: str | None = None) -> list[ObjectAnnotation]:
        maps = self.segmenter.segment(image, self.tagger.tag(image, prompt))
        return [
            ObjectAnnotation(label, probabilities >= self.threshold, float(probabilities.max()))
            for label, probabilities in maps.items()
            if (probabilities >= self.threshold).any()
        ]


def centre_of_mass(prob_map: np.ndarray, threshold: float = 0.5) -> tuple[float, float] | None:
    """(x, y) in pixels: the probability-weighted mean of the pixels at or above `threshold`.

    None when no pixel reaches it (the object was not found).
    """
    weights = np.where(prob_map >= threshold, prob_map, 0.0).astype(np.float64)
    total = weights.sum()
    if total <= 0:
        return None
    ys, xs = np.indices(prob_map.shape)
    return float((xs * weights).sum() / total), float((ys * weights).sum() / total)
