"""A synthetic "shapes world" with known ground truth, for training a small diffusion model.

A scene is 1 to `max_objects` flat-coloured shapes on a patterned background, with a
caption and the visible mask of every object, so that concept emergence and steering can
be checked against the truth:

    scene = sample_scene(np.random.default_rng(0))      # or: for scene in dataset(1000, 0)
    scene.caption   # "a red circle and a blue star on a gray striped background"
    scene.objects[0].mask                               # bool [H, W], visible pixels
    render(scene.spec, size=128)                        # the same scene at another size

Design rules (the annotator in `core.annotate.shapes` relies on them):
- Rendering is hard-edged, no anti-aliasing: each pixel belongs to exactly one object or
  to the background, so masks are exact. Shapes are tested at pixel centres, which sit at
  integer coordinates (as in `core.quadrants.quadrant_of`).
- Object colours are vivid (CIELAB chroma >= 50) or white (L* >= 90); background colours,
  pattern tones included, are muted (chroma <= 25, L* <= 60). Objects therefore always
  stand out, whatever the background, and a pixel's Lab value tells object from background.
- The objects of one scene have distinct colours, so "the red one" is unambiguous in a
  caption and two touching objects never merge into one colour region.
- Later objects are drawn on top. Sampled scenes keep at least `min_visible` of every
  object's area visible (nothing is fully occluded); `render` draws any spec as given.
- Object centres stay off the image's middle lines, so each has a clear quadrant.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from core.quadrants import QUADRANTS, quadrant_of

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (105, 105, 105),
    "black": (35, 35, 38),
    "brown": (100, 78, 60),
    "navy": (45, 52, 80),
    "teal": (55, 90, 88),
}
PATTERN_LIFT = 30
"""RGB offset of a background's second tone (stripes, dots, checks, gradient end)."""
STYLES = ("plain", "striped", "dotted", "checkered", "gradient")
POSITION_WORDS = {q: q.replace("_", " ") for q in QUADRANTS}

RADIUS_RANGE = (0.1, 0.2)
"""Object radius (centre to farthest point) as a fraction of the image side."""
PERIOD_RANGE = (0.12, 0.22)
"""Pattern period as a fraction of the image side."""
MIDLINE_GAP = 0.04
"""Object centres keep this fraction of the image side away from the middle lines."""
EDGE_MARGIN = 0.02
"""Objects keep this fraction of the image side away from the border."""

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "an", "and", "on", "at", "the", "background"}
        | set(SHAPES)
        | set(OBJECT_COLOURS)
        | set(BACKGROUND_COLOURS)
        | set(STYLES)
        | {word for phrase in POSITION_WORDS.values() for word in phrase.split()}
    )
)
"""Every word any caption can use."""


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], -1)


def _cross(arm: float = 0.33) -> np.ndarray:
    """A plus sign: one arm's three vertices, turned a quarter four times."""
    quarter = np.array([(-arm, -1.0), (arm, -1.0), (arm, -arm)])
    turns = [quarter]
    for _ in range(3):
        turns.append(np.stack([-turns[-1][:, 1], turns[-1][:, 0]], -1))
    return np.concatenate(turns)


POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "diamond": np.array([(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]),
    "triangle": np.array([(0.0, -0.9), (1.0, 0.8), (-1.0, 0.8)]),
    "star": _star(),
    "cross": _cross(),
}
"""Vertices (x, y), y down, in units of the object's radius around its centre."""


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    x: float
    """Centre, as a fraction of the image width (0 = left edge, 1 = right edge)."""
    y: float
    """Centre, as a fraction of the image height (0 = top edge)."""
    radius: float
    """Centre to farthest point, as a fraction of the image side."""


@dataclass(frozen=True)
class BackgroundSpec:
    style: str
    colour: str
    period: float = 0.16
    """Pattern period as a fraction of the image side (stripe pair, dot spacing, two checks)."""
    angle: float = 0.0
    """Degrees: direction across the stripes, or of the gradient (0 = left to right, 90 = down)."""
    phase: float = 0.0
    """Pattern offset, in periods."""


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render a scene, independent of its pixel size."""

    objects: tuple[ObjectSpec, ...]
    background: BackgroundSpec


@dataclass(frozen=True, eq=False)
class ToyObject:
    shape: str
    colour: str
    mask: np.ndarray
    """bool [H, W]: the visible pixels."""
    full_mask: np.ndarray
    """bool [H, W]: all pixels of the shape, occluded ones included."""
    bbox: tuple[int, int, int, int]
    """(x0, y0, x1, y1) of the visible pixels, x1 and y1 exclusive; zeros if none is visible."""
    centre: tuple[float, float]
    """(x, y) in pixels of the shape's centre."""
    quadrant: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True, eq=False)
class Scene:
    image: np.ndarray
    """uint8 [H, W, 3]."""
    objects: list[ToyObject]
    """In drawing order (later ones on top)."""
    background: BackgroundSpec
    caption: str
    spec: SceneSpec = field(repr=False)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in [0, 255], any leading shape; float [..., 3]."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        -1,
    )


def background_tones(colour: str) -> tuple[np.ndarray, np.ndarray]:
    """(base, second tone) RGB float of a background colour."""
    base = np.array(BACKGROUND_COLOURS[colour], dtype=float)
    return base, base + PATTERN_LIFT


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float [size, size] of pixel centres."""
    ys, xs = np.mgrid[0:size, 0:size].astype(float)
    return xs, ys


def _to_pixels(fraction: float, size: int) -> float:
    """A position given as a fraction of the side (0 = outer edge of pixel 0) in pixels."""
    return fraction * size - 0.5


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: a ray from an inside point crosses the boundary an odd number of times."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        spans = (y0 > v) != (y1 > v)
        crossing = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
        inside ^= spans & (u < crossing)
    return inside


def shape_mask(obj: ObjectSpec, size: int) -> np.ndarray:
    """bool [size, size]: pixels whose centre lies inside the shape."""
    xs, ys = _grid(size)
    radius = obj.radius * size
    u = (xs - _to_pixels(obj.x, size)) / radius
    v = (ys - _to_pixels(obj.y, size)) / radius
    if obj.shape == "circle":
        return u**2 + v**2 <= 1.0
    if obj.shape not in POLYGONS:
        raise ValueError(f"unknown shape {obj.shape!r}; choose one of {', '.join(SHAPES)}")
    return _inside_polygon(u, v, POLYGONS[obj.shape])


def _pattern(bg: BackgroundSpec, size: int) -> np.ndarray:
    """float [size, size] in [0, 1]: how much of the second tone each pixel takes."""
    xs, ys = _grid(size)
    period = bg.period * size
    theta = np.deg2rad(bg.angle)
    along = (xs * np.cos(theta) + ys * np.sin(theta)) / period + bg.phase
    if bg.style == "plain":
        return np.zeros((size, size))
    if bg.style == "striped":
        return (along % 1.0 < 0.5).astype(float)
    if bg.style == "dotted":
        du = (xs / period + bg.phase) % 1.0 - 0.5
        dv = (ys / period + bg.phase) % 1.0 - 0.5
        return (du**2 + dv**2 <= 0.25**2).astype(float)
    if bg.style == "checkered":
        cells = np.floor(2 * (xs / period + bg.phase)) + np.floor(2 * (ys / period + bg.phase))
        return (cells % 2).astype(float)
    if bg.style == "gradient":
        projection = xs * np.cos(theta) + ys * np.sin(theta)
        span = projection.max() - projection.min()
        return (projection - projection.min()) / span
    raise ValueError(f"unknown background style {bg.style!r}; choose one of {', '.join(STYLES)}")


def render_background(bg: BackgroundSpec, size: int) -> np.ndarray:
    """float [size, size, 3] RGB in [0, 255]."""
    base, tone = background_tones(bg.colour)
    weight = _pattern(bg, size)[..., None]
    return base * (1 - weight) + tone * weight


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    if not mask.any():
        return (0, 0, 0, 0)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(
    objects: Sequence[ToyObject], background: BackgroundSpec, position_phrases: bool = False
) -> str:
    """ "a red circle, a blue star and a white cross on a gray striped background".

    Objects with no visible pixel are left out. Positions ("at the top left") follow each
    object when `position_phrases` is set. A plain background is "a gray plain background".
    """
    phrases = []
    for obj in objects:
        if not obj.mask.any():
            continue
        phrase = f"{_article(obj.colour)} {obj.name}"
        if position_phrases:
            phrase += f" at the {POSITION_WORDS[obj.quadrant]}"
        phrases.append(phrase)
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    scene_text = f"{_article(background.colour)} {background.colour} {background.style} background"
    return f"{listed} on {scene_text}" if phrases else scene_text


def render(spec: SceneSpec, size: int = 64, position_phrases: bool = False) -> Scene:
    """Draw a scene exactly as specified, objects in order (later ones on top)."""
    image = render_background(spec.background, size)
    owner = np.full((size, size), -1)
    full_masks = []
    for index, obj in enumerate(spec.objects):
        full = shape_mask(obj, size)
        image[full] = OBJECT_COLOURS[obj.colour]
        owner[full] = index
        full_masks.append(full)
    objects = []
    for index, (obj, full) in enumerate(zip(spec.objects, full_masks, strict=True)):
        visible = owner == index
        centre = (_to_pixels(obj.x, size), _to_pixels(obj.y, size))
        quadrant = quadrant_of(centre, (size, size))
        objects.append(
            ToyObject(obj.shape, obj.colour, visible, full, _bbox(visible), centre, quadrant)
        )
    text = caption(objects, spec.background, position_phrases)
    return Scene(np.round(image).astype(np.uint8), objects, spec.background, text, spec)


def _sample_background(rng: np.random.Generator) -> BackgroundSpec:
    style = str(rng.choice(STYLES))
    colour = str(rng.choice(list(BACKGROUND_COLOURS)))
    period = float(rng.uniform(*PERIOD_RANGE))
    phase = float(rng.uniform(0, 1))
    if style == "striped":
        angle = float(rng.choice([0.0, 45.0, 90.0, 135.0]))
    else:
        angle = float(rng.uniform(0, 360))
    return BackgroundSpec(style, colour, period, angle, phase)


def _sample_position(rng: np.random.Generator, radius: float) -> float:
    """A centre coordinate keeping the shape inside the image and off the middle line."""
    while True:
        value = float(rng.uniform(radius + EDGE_MARGIN, 1 - radius - EDGE_MARGIN))
        if abs(value - 0.5) >= MIDLINE_GAP:
            return value


def _visible_enough(masks: list[np.ndarray], min_visible: float) -> bool:
    """Whether every mask keeps `min_visible` of its area once later masks cover it."""
    covered = np.zeros_like(masks[0])
    for mask in reversed(masks):
        if (mask & ~covered).sum() < min_visible * mask.sum():
            return False
        covered |= mask
    return True


def sample_spec(
    rng: np.random.Generator,
    size: int = 64,
    max_objects: int = 3,
    min_visible: float = 0.5,
    attempts: int = 100,
    radius_range: tuple[float, float] = RADIUS_RANGE,
) -> SceneSpec:
    """A random scene: 1 to `max_objects` objects of distinct colours, shapes may repeat,
    each of a radius drawn from `radius_range` (fractions of the image side).

    An object that cannot be placed in `attempts` tries without hiding more than
    `1 - min_visible` of itself or of an earlier object is left out. Occlusion is checked
    at `size`, the size the scene is meant to be rendered at.
    """
    if not 1 <= max_objects <= len(OBJECT_COLOURS):
        raise ValueError(f"max_objects must be in 1..{len(OBJECT_COLOURS)}, got {max_objects}")
    background = _sample_background(rng)
    count = int(rng.integers(1, max_objects + 1))
    colours = rng.choice(list(OBJECT_COLOURS), size=count, replace=False)
    objects: list[ObjectSpec] = []
    masks: list[np.ndarray] = []
    for colour in colours:
        shape = str(rng.choice(SHAPES))
        for _ in range(attempts):
            radius = float(rng.uniform(*radius_range))
            obj = ObjectSpec(
                shape,
                str(colour),
                _sample_position(rng, radius),
                _sample_position(rng, radius),
                radius,
            )
            mask = shape_mask(obj, size)
            if _visible_enough([*masks, mask], min_visible):
                objects.append(obj)
                masks.append(mask)
                break
    return SceneSpec(tuple(objects), background)


def sample_scene(
    rng: np.random.Generator,
    size: int = 64,
    max_objects: int = 3,
    position_phrases: bool = False,
    min_visible: float = 0.5,
    radius_range: tuple[float, float] = RADIUS_RANGE,
) -> Scene:
    """A random scene rendered at `size` (see `sample_spec`)."""
    spec = sample_spec(rng, size, max_objects, min_visible, radius_range=radius_range)
    return render(spec, size, position_phrases)


SCENES_PER_CHUNK = 1000
"""Scenes drawn from one generator; each chunk has its own, so chunks render in parallel."""


def dataset(
    n: int,
    seed: int,
    size: int = 64,
    max_objects: int = 3,
    position_phrases: bool = False,
    min_visible: float = 0.5,
    workers: int = 1,
    radius_range: tuple[float, float] = RADIUS_RANGE,
) -> Iterator[Scene]:
    """`n` scenes, the same for the same seed whatever `workers` (processes that render).

    Scene i comes from the generator of chunk i // SCENES_PER_CHUNK, seeded by (seed, chunk).
    """
    chunks = [
        (
            seed,
            chunk,
            min(SCENES_PER_CHUNK, n - start),
            size,
            max_objects,
            position_phrases,
            min_visible,
            tuple(radius_range),
        )
        for chunk, start in enumerate(range(0, n, SCENES_PER_CHUNK))
    ]
    workers = min(workers, len(chunks))
    if workers <= 1:
        for args in chunks:
            yield from _chunk(args)
        return
    # fork: a spawned worker would first import the caller's main module (torch and all)
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers) as pool:
        for scenes in pool.imap(_chunk, chunks):
            yield from scenes


def _chunk(args: tuple) -> list[Scene]:
    seed, chunk, count, size, max_objects, position_phrases, min_visible, radius_range = args
    rng = np.random.default_rng([seed, chunk])
    return [
        sample_scene(rng, size, max_objects, position_phrases, min_visible, radius_range)
        for _ in range(count)
    ]


LABELS = {
    "shape": lambda scene: scene.objects[0].shape,
    "colour": lambda scene: scene.objects[0].colour,
    "style": lambda scene: scene.background.style,
}
"""What a one-object scene can be labelled by, for classification (Revelio's setting)."""


def write_image_folder(
    root: str | Path,
    per_class: int,
    seed: int,
    size: int = 64,
    label: str = "shape",
    radius_range: tuple[float, float] = RADIUS_RANGE,
) -> Path:
    """One-object scenes as PNGs in `root/<class>/`, `per_class` of each class.

    The imagefolder layout that `core.revelio.features.image_folder` and Hugging Face `datasets`
    read; scenes come from one seeded generator, so the same seed writes the same folder.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; choose one of {', '.join(LABELS)}")
    root = Path(root)
    counts: dict[str, int] = {}
    rng = np.random.default_rng(seed)
    while len(counts) < _num_classes(label) or min(counts.values()) < per_class:
        scene = sample_scene(rng, size, max_objects=1, radius_range=radius_range)
        name = LABELS[label](scene)
        if counts.get(name, 0) >= per_class:
            continue
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"{counts.get(name, 0):05d}.png")
        counts[name] = counts.get(name, 0) + 1
    return root


def _num_classes(label: str) -> int:
    return {"shape": len(SHAPES), "colour": len(OBJECT_COLOURS), "style": len(STYLES)}[label]
