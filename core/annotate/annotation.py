"""What every annotator returns: labelled object masks, and the protocol of an annotator.

The concept dictionary needs only this protocol; `GroundedSamAnnotator` (the paper's
vision-only labeller) and the shapes world's exact annotator implement it.
"""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
"""(x0, y0, x1, y1) in pixels of the image."""


@dataclass(frozen=True, eq=False)
class ObjectAnnotation:
    """One labelled object of an image (arrays make equality ambiguous, so there is none)."""

    label: str
    mask: np.ndarray
    """bool [H, W] at the image's resolution."""
    score: float
    """Confidence in [0, 1]; for `GroundedSamAnnotator`, Grounding DINO's box score."""
    box: Box | None = None


@runtime_checkable
class Annotator(Protocol):
    def annotate(self, image: Image.Image, prompt: str | None = None) -> list[ObjectAnnotation]: ...
