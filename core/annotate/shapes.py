"""Ground-truth-style annotation of shapes-world images (`core.shapes.world`), real or generated.

`ToyAnnotator` is an `Annotator`: it stands in for tag -> detect -> segment when the images
come from a model trained on the shapes world. It is deterministic and needs no weights:

1. Segmentation by colour. The world's objects are vivid or white and its backgrounds muted
   (see `core.shapes.world`), so a pixel is an object pixel when its CIELAB chroma or
   lightness is high; it takes the nearest object colour of the palette. A pixel that
   fewer than two of its 4 neighbours agree with takes its 3x3 window's majority, which
   removes noise. Each connected region of one colour that has a core (survives a 3x3
   erosion, so blurred fringes between two colours are dropped) and is large enough is one
   object.
2. Shape by k-nearest neighbours on the region's mask, cropped to its box, padded square and
   resampled to 16x16 (plus the box's aspect ratio). The references are visible masks of
   scenes rendered with a fixed seed at the image's size, occluded ones included, sharp
   and softened as by blur. A nearest-neighbour vote was
   chosen over hand-written geometric rules because partial occlusion and blur break
   rules based on fill ratio or corner counts, while the references contain such cases.
3. Background style from the background pixels' lightness: a fitted plane (gradient), the
   residual's contrast (plain vs patterned), the minority tone's share (dots) and whether
   some direction has no tone changes (stripes) or none has (checks).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from core.annotate.annotation import ObjectAnnotation
from core.shapes.world import OBJECT_COLOURS, SHAPES, dataset, rgb_to_lab

CHROMA_MIN = 35.0
"""Object pixels have chroma above this (backgrounds stay <= 25, colours >= 70) ..."""
LIGHTNESS_MIN = 72.0
"""... or lightness above this (backgrounds stay <= 60, white is 97)."""
MIN_AREA = 0.003
"""Smallest object, as a fraction of the image's pixels."""
KEEP_NEIGHBOURS = 2
"""A pixel keeps its colour when this many of its 4 neighbours share it (a square's corner
has 2); fewer means noise or a blurred fringe, and it takes its 3x3 window's majority."""
CROP = 16
NEIGHBOURS = 7
REFERENCE_BLURS = (0.0, 0.8)
"""Reference masks are kept sharp and as seen through a blur of this many pixels."""

PATTERN_CONTRAST = 2.5
"""Std of background lightness (L*, plane removed, lightly smoothed) above which it has a
pattern; the two tones differ by about 10, noise of 8/255 leaves about 1."""
GRADIENT_CHANGE = 5.0
"""L* change across the image above which an unpatterned background is a gradient (~10)."""
DOTS_SHARE = 0.33
"""Dots cover about 0.2 of the background, stripes and checks 0.5."""
STRIPE_RATE_RATIO = 0.3
"""Along stripes the tone never changes; checks change in every direction (min/max ~0.5)."""

_PALETTE_NAMES = tuple(OBJECT_COLOURS)
_PALETTE_LAB = rgb_to_lab(np.array([OBJECT_COLOURS[name] for name in _PALETTE_NAMES]))


@dataclass(frozen=True, eq=False)
class ToyDetection:
    colour: str
    shape: str
    mask: np.ndarray
    """bool [H, W]."""
    score: float
    """Share of the nearest reference masks that voted for `shape`."""
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1), x1 and y1 exclusive."""


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    return np.asarray(image)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """int [H, W]: index into the object palette, or -1 for background, after a majority vote."""
    lab = rgb_to_lab(image)
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    is_object = (chroma > CHROMA_MIN) | (lab[..., 0] > LIGHTNESS_MIN)
    distances = np.linalg.norm(lab[..., None, :] - _PALETTE_LAB, axis=-1)
    labels = np.where(is_object, distances.argmin(-1), -1)
    classes = np.arange(-1, len(_PALETTE_NAMES))
    votes = np.stack([ndimage.uniform_filter((labels == c).astype(float), 3) for c in classes])
    cross = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    agreeing = sum(
        ndimage.convolve((labels == c).astype(int), cross, mode="nearest") * (labels == c)
        for c in classes
    )
    return np.where(agreeing >= KEEP_NEIGHBOURS, labels, classes[votes.argmax(0)])


def object_regions(image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(colour, bool mask) of every connected one-colour region that has a core."""
    labels = colour_labels(image)
    min_area = MIN_AREA * labels.size
    regions = []
    for index, colour in enumerate(_PALETTE_NAMES):
        components, count = ndimage.label(labels == index, structure=np.ones((3, 3)))
        for component in range(1, count + 1):
            mask = components == component
            if mask.sum() >= min_area and ndimage.binary_erosion(mask).any():
                regions.append((colour, mask))
    return regions


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def mask_features(mask: np.ndarray) -> np.ndarray:
    """float [CROP * CROP + 1]: the mask in its box, padded square and resampled, and log aspect."""
    x0, y0, x1, y1 = _box(mask)
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    height, width = crop.shape
    side = max(height, width)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = crop
    resampled = Image.fromarray(square, mode="F").resize((CROP, CROP), Image.Resampling.BOX)
    return np.append(np.asarray(resampled).ravel(), np.log(width / height))


def soften(mask: np.ndarray, sigma: float) -> np.ndarray:
    """The mask as segmentation finds it in an image blurred by `sigma`: corners round off."""
    if sigma == 0:
        return mask
    return ndimage.gaussian_filter(mask.astype(float), sigma) > 0.5


@functools.cache
def reference_masks(
    size: int = 64, count: int = 1500, seed: int = 1234, blurs: tuple[float, ...] = REFERENCE_BLURS
) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], shape index [N]): visible masks of `count` scenes rendered at `size`.

    Each mask is also softened, as segmentation sees it through blur. Built once per size.
    """
    features, shapes = [], []
    for scene in dataset(count, seed, size=size):
        for obj in scene.objects:
            for sigma in blurs:
                mask = soften(obj.mask, sigma)
                if mask.any():
                    features.append(mask_features(mask))
                    shapes.append(SHAPES.index(obj.shape))
    return np.stack(features), np.array(shapes)


def classify_shape(mask: np.ndarray, k: int = NEIGHBOURS) -> tuple[str, float]:
    """(shape, share of the k nearest reference masks voting for it)."""
    features, shapes = reference_masks(max(mask.shape))
    distances = np.linalg.norm(features - mask_features(mask), axis=1)
    votes = np.bincount(shapes[np.argsort(distances)[:k]], minlength=len(SHAPES))
    best = int(votes.argmax())
    return SHAPES[best], float(votes[best] / k)


def _two_means(values: np.ndarray, iterations: int = 10) -> float:
    """A threshold splitting 1-D values into two clusters (k-means with k = 2)."""
    threshold = float(values.mean())
    for _ in range(iterations):
        low, high = values[values <= threshold], values[values > threshold]
        if not len(low) or not len(high):
            break
        threshold = float((low.mean() + high.mean()) / 2)
    return threshold


def _transition_rates(tones: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Share of neighbouring valid pixel pairs whose tones differ, along 0, 45, 90 and 135 deg."""
    rates = []
    for dy, dx in ((0, 1), (1, 1), (1, 0), (1, -1)):
        height, width = tones.shape
        a = (slice(0, height - dy), slice(max(0, -dx), width - max(0, dx)))
        b = (slice(dy, height), slice(max(0, dx), width - max(0, -dx)))
        pairs = valid[a] & valid[b]
        rates.append((tones[a] != tones[b])[pairs].mean() if pairs.any() else 0.0)
    return np.array(rates)


def background_style(image: Image.Image | np.ndarray) -> str:
    """One of `core.shapes.world.STYLES`, from the lightness of pixels away from objects."""
    array = _as_array(image)
    objects = colour_labels(array) >= 0
    valid = ~ndimage.binary_dilation(objects, iterations=2)
    if valid.sum() < 0.1 * valid.size:
        valid = ~objects
    lightness = ndimage.gaussian_filter(rgb_to_lab(array)[..., 0], 0.7)
    ys, xs = np.indices(lightness.shape)
    design = np.stack([np.ones(lightness.shape), xs, ys], -1).astype(float)
    coefficients, *_ = np.linalg.lstsq(design[valid], lightness[valid], rcond=None)
    residual = lightness - design @ coefficients
    if residual[valid].std() < PATTERN_CONTRAST:
        change = np.hypot(*coefficients[1:]) * max(lightness.shape)
        return "gradient" if change > GRADIENT_CHANGE else "plain"
    tones = residual > _two_means(residual[valid])
    minority = min(tones[valid].mean(), 1 - tones[valid].mean())
    if minority < DOTS_SHARE:
        return "dotted"
    rates = _transition_rates(tones, valid)
    return "striped" if rates.min() < STRIPE_RATE_RATIO * rates.max() else "checkered"


def _union(masks: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    return np.logical_or.reduce(masks) if masks else np.zeros(shape, dtype=bool)


class ToyAnnotator:
    """`Annotator` for shapes-world images; `label` is the shape, or "colour shape" if asked.

    With `with_background`, the pixels of no object are one more annotation labelled with
    the background's style ("striped"), so style concepts get dictionary entries too.
    The prompt is ignored: the annotation comes from the pixels alone, so it can check
    whether a generated image shows what its caption asked for.
    """

    def __init__(self, with_colour: bool = False, with_background: bool = False) -> None:
        self.with_colour = with_colour
        self.with_background = with_background

    def detect(self, image: Image.Image | np.ndarray) -> list[ToyDetection]:
        detections = []
        for colour, mask in object_regions(_as_array(image)):
            shape, score = classify_shape(mask)
            box = tuple(float(v) for v in _box(mask))
            detections.append(ToyDetection(colour, shape, mask, score, box))
        return detections

    def annotate(
        self, image: Image.Image | np.ndarray, prompt: str | None = None
    ) -> list[ObjectAnnotation]:
        array = _as_array(image)
        detections = self.detect(array)
        annotations = [
            ObjectAnnotation(
                f"{d.colour} {d.shape}" if self.with_colour else d.shape, d.mask, d.score, d.box
            )
            for d in detections
        ]
        if self.with_background:
            background = ~_union([d.mask for d in detections], array.shape[:2])
            if background.any():
                box = tuple(float(v) for v in _box(background))
                annotations.append(ObjectAnnotation(background_style(array), background, 1.0, box))
        return annotations

    def colour_shapes(self, image: Image.Image | np.ndarray) -> list[tuple[str, str]]:
        """(colour, shape) of every object found."""
        return [(d.colour, d.shape) for d in self.detect(image)]

    def background_style(self, image: Image.Image | np.ndarray) -> str:
        return background_style(image)


class ToySegmenter:
    """The spatial-edit evaluator's segmenter for shapes-world images (CLIPSeg's role).

    `segment(image, ["star"])["star"]` is 1.0 on the pixels of every object found with
    that shape and 0.0 elsewhere, so its centre of mass is where the stars are.
    """

    def __init__(self, annotator: ToyAnnotator | None = None) -> None:
        self.annotator = annotator or ToyAnnotator()

    def segment(
        self, image: Image.Image | np.ndarray, words: Iterable[str]
    ) -> dict[str, np.ndarray]:
        array = _as_array(image)
        detections = self.annotator.detect(array)
        return {
            word: _union([d.mask for d in detections if d.shape == word], array.shape[:2]).astype(
                np.float32
            )
            for word in words
        }


class StyleScorer:
    """The global-edit evaluator's scorer for shapes-world images (CLIP's role).

    `similarity(images, "striped")` is 1.0 for an image whose background is striped and 0.0
    otherwise, so "the score rose" means "the edit made the background that style".
    """

    def similarity(self, images: Iterable[Image.Image | np.ndarray], text: str) -> list[float]:
        return [float(background_style(image) == text) for image in images]
