"""Pictures of maps: heat maps, mask outlines and overlays, and difference maps as PIL images.

Maps live on a block's coarse grid (2x2 to 64x64); they are shown at a display size with
nearest-neighbour upsampling, so every grid cell stays a visible square and nothing is
suggested below the grid's resolution. Every heat map is drawn on a fixed scale that the
caller names, with a labelled colour bar beside it: a map is never stretched to its own
range, so a faint map looks faint.
"""

import io

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from core.emergence.metrics import rgb_floats

DISPLAY = 256
"""Side in pixels of every panel the app shows."""
INVALID_GREY = (128, 128, 128)
MASK_COLOUR = (255, 40, 40)
REFERENCE_COLOUR = (40, 200, 255)
BAR_WIDTH = 76
"""Pixels added to the right of a heat map for its colour bar, tick values and label."""
GREY_LEVELS = 255
"""The largest difference of one 8-bit channel."""
_FONT = ImageFont.load_default(size=11)


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


def figure_image(figure: Figure) -> Image.Image:
    """A matplotlib figure drawn at its own size and dpi, as an RGB image (the page shows
    images with a download button, which a plot component lacks)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Image.open(buffer).convert("RGB")


def heat_map(
    values: np.ndarray | torch.Tensor,
    low: float,
    high: float,
    label: str,
    *,
    cmap: str = "magma",
    side: int = DISPLAY,
) -> Image.Image:
    """A 2-D map coloured on the fixed scale [`low`, `high`] (values outside are clipped),
    with a colour bar titled `label` on its right; NaN cells are grey."""
    return with_colour_bar(colour_map(values, low, high, cmap, side), low, high, label, cmap)


def colour_map(
    values: np.ndarray | torch.Tensor, low: float, high: float, cmap: str, side: int = DISPLAY
) -> Image.Image:
    """`heat_map` without its colour bar, for panels that share one bar."""
    array = as_numpy(values)
    finite = np.isfinite(array)
    scaled = np.clip((np.where(finite, array, low) - low) / max(high - low, 1e-12), 0, 1)
    rgb = (matplotlib.colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)
    rgb[~finite] = INVALID_GREY
    return upscale(Image.fromarray(rgb), side)


def with_colour_bar(
    image: Image.Image, low: float, high: float, label: str, cmap: str
) -> Image.Image:
    """`image` with a vertical colour bar (`high` at the top), three tick values and `label`
    written upwards along its right edge."""
    width, height = image.size
    canvas = Image.new("RGB", (width + BAR_WIDTH, height), "white")
    canvas.paste(image, (0, 0))
    top, bottom, left = 6, height - 6, width + 6
    ramp = np.linspace(1, 0, max(bottom - top, 2))[:, None].repeat(12, axis=1)
    colours = (matplotlib.colormaps[cmap](ramp)[..., :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(colours), (left, top))
    draw = ImageDraw.Draw(canvas)
    for fraction in (0.0, 0.5, 1.0):
        y = bottom - fraction * (bottom - top - 1)
        draw.line([(left + 12, y), (left + 15, y)], fill="black")
        value = f"{low + fraction * (high - low):.3g}"
        draw.text((left + 17, y), value, fill="black", font=_FONT, anchor="lm")
    title = Image.new("RGB", (height, 14), "white")
    ImageDraw.Draw(title).text((height / 2, 7), label, fill="black", font=_FONT, anchor="mm")
    canvas.paste(title.rotate(90, expand=True), (width + BAR_WIDTH - 14, 0))
    return canvas


def outline(
    image: Image.Image,
    mask: np.ndarray | torch.Tensor,
    side: int = DISPLAY,
    colour: tuple[int, int, int] = MASK_COLOUR,
    width: int = 3,
    shade: float = 0.0,
) -> Image.Image:
    """`image` with the border of a boolean mask (any resolution of the same aspect) drawn in
    `colour`, `width` pixels inside it (the image's own edge counts as a border), and the
    inside tinted with opacity `shade`; the image shows through."""
    base = overlay(image, mask, side, colour, shade)
    cells = Image.fromarray(as_numpy(mask).astype(bool))
    inside = np.asarray(cells.resize(base.size, Image.Resampling.NEAREST), dtype=bool)
    core = np.pad(inside, width)  # outside the image counts as outside the mask
    for axis in (0, 1):  # a square erosion, one axis at a time
        core = np.logical_and.reduce([np.roll(core, s, axis) for s in range(-width, width + 1)])
    edge = inside & ~core[width:-width, width:-width]
    pixels = np.asarray(base).copy()
    pixels[edge] = colour
    return Image.fromarray(pixels)


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


def grey_levels(before: Image.Image, after: Image.Image) -> np.ndarray:
    """Per-pixel absolute difference in 8-bit grey levels (0-255), mean over RGB."""
    a, b = rgb_floats(before, after)
    return np.abs(a - b).mean(axis=-1) * GREY_LEVELS


def difference_map(before: Image.Image, after: Image.Image, side: int = DISPLAY) -> Image.Image:
    """`grey_levels` on the fixed scale 0-255, whatever the edit: a change of a few grey
    levels stays near black instead of being stretched to look as large as any other."""
    label = "|after - before|, grey levels"
    return heat_map(grey_levels(before, after), 0, GREY_LEVELS, label, cmap="inferno", side=side)
