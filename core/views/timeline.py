"""A concept's timeline: how strongly one concept fires at every step of one generation.

The block's residual updates are recorded at every denoising step. The concept is a word
(at each step, the summed activation of the CIDs labelled with it in the dictionary of the
SAE trained nearest to the step's t) or one CID. A CID is a latent of one SAE and means
nothing in another, so a CID's timeline reads every step with its own SAE, the one trained
nearest to `cid_t`.

Shown as a filmstrip (one activation map per step, t = 1 to 0, all on one fixed scale
with one colour bar), a plot of the mean and max activation against t, and a note saying
which SAE read which steps.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from core.diffusion.hooks import DeltaRecord, StepInfo, record
from core.emergence.composition import latent_grid
from core.emergence.concepts import normalize_label
from core.sae.bank import SAEKey
from core.steer.record import indices_by, step_ranges
from core.views.emergence import finished, t_axis
from core.views.inputs import check_cid, check_number, check_prompt, check_seed
from core.views.inspection import activation_scale, fixed_scale
from core.views.model_cache import Loaded
from core.views.render import colour_map, with_colour_bar

FRAME = 96
"""Side in pixels of one step's map in the filmstrip."""
FRAMES_PER_ROW = 10
"""Longer runs wrap onto further rows, read left to right, top to bottom."""
TITLE_HEIGHT = 30
"""Pixels above each frame for its two title lines."""
HEADER_HEIGHT = 40
"""Pixels of the header line: as tall as the page's image buttons, which sit over its right
end, where it is blank."""
CMAP = "magma"
STRIP_LABEL = "activation"
_FONT = ImageFont.load_default(size=11)


@dataclass
class TimelineStep:
    step: StepInfo
    sae: SAEKey
    """The SAE that read this step."""
    cids: tuple[int, ...]
    """The CIDs summed at this step; empty when the SAE has none for the word (skipped)."""
    activation: Tensor
    """[h, w] the concept's activation at each position; NaN where the step was skipped."""

    @property
    def index(self) -> int:
        return self.step.index

    @property
    def mean(self) -> float:
        return float(self.activation.mean())

    @property
    def max(self) -> float:
        return float(self.activation.max())


@dataclass
class Timeline:
    block: str
    branch: str
    word: str
    """The concept's word, its CIDs summed at each step; empty when it is one CID."""
    concept: str
    """What was followed, as messages name it: "'star'" or "CID 12 of the SAE at t=1"."""
    steps: list[TimelineStep]
    """In generation order: the first, noisiest step first."""
    scale: float
    """The top of every map's colour scale."""
    scale_name: str
    notes: list[str] = field(default_factory=list)

    @property
    def ts(self) -> list[float]:
        return [s.step.t for s in self.steps]

    @property
    def skips(self) -> bool:
        """Whether any step was skipped (its SAE has no CID for the word)."""
        return any(not s.cids for s in self.steps)

    def summary(self) -> str:
        """One line: the steps each SAE read, those skipped and why, and the scale."""
        t_of = {s.index: f"{s.step.t:.2f}" for s in self.steps}
        used = [
            f"{step_ranges(indices)} (t {_span(t_of[indices[0]], t_of[indices[-1]])}) read with "
            f"the SAE at {_at(key)}"
            for key, indices in indices_by([s for s in self.steps if s.cids], lambda s: s.sae)
        ]
        skipped = [
            f"skipped {step_ranges(indices)}: the SAE at {_at(key)} has no CID labelled "
            f"{self.concept}"
            for key, indices in indices_by([s for s in self.steps if not s.cids], lambda s: s.sae)
        ]
        scale = f"maps on one scale, 0 to {self.scale_name}"
        return f"{self.concept}: " + "; ".join([*used, *skipped, *self.notes, scale])


def _at(key: SAEKey) -> str:
    """The time an SAE was trained at, as the views name it: "t=0.5" or "every t"."""
    return "every t" if key.t is None else f"t={key.t:g}"


def _span(first: str, last: str) -> str:
    return first if first == last else f"{first} to {last}"


def concept_timeline(
    loaded: Loaded,
    block: str,
    branch: str,
    prompt: object,
    seed: object,
    word: object = "",
    cid: object = None,
    cid_t: object = 1.0,
    on_step: Callable[[int, int], None] | None = None,
) -> Timeline:
    """Generate once with the preset's steps and follow the concept (`word`, else `cid` of
    the SAE nearest `cid_t`) through every step."""
    prompt, seed = check_prompt(prompt), check_seed(seed)
    loaded.check_recorded(block, branch)
    word = normalize_label(str(word or ""))
    cids_of, concept = _concept(loaded, block, branch, word, cid, cid_t)
    with record(loaded.pipe, [block], device=None, site=loaded.bank.site(block)) as recording:
        loaded.generate([prompt], [seed], loaded.preset.steps, on_step=on_step)
    records = sorted(recording.of(block, branch), key=lambda r: r.step)
    steps = [_read(loaded, r, cids_of(r.step.t)) for r in records]
    maps = torch.stack([s.activation for s in steps])
    if word:
        scale, scale_name = fixed_scale(0.0, maps, "its summed CIDs'")
        note = "its CIDs summed, which have no largest activation in training together"
    else:
        scale, scale_name = activation_scale(loaded.bank[steps[0].sae], steps[0].cids[0], maps)
        note = "a CID belongs to one SAE, so that SAE read every step"
    timeline = Timeline(block, branch, word, concept, steps, scale, scale_name, [note])
    peak = float(torch.nan_to_num(maps, nan=0.0).max())
    if peak > scale:
        timeline.notes.append(f"exceeded here (up to {peak:.3g}), shown at the top of the scale")
    return timeline


CIDsAt = Callable[[float], tuple[SAEKey, tuple[int, ...]]]
"""A step's t -> the SAE that reads that step and the concept's CIDs in it."""


def _concept(
    loaded: Loaded, block: str, branch: str, word: str, cid: object, cid_t: object
) -> tuple[CIDsAt, str]:
    """The SAE and CIDs per step, and the concept's name; a ValueError for bad input."""
    if word:
        found = loaded.dictionaries.word_cids(word, block, (branch,))

        def by_word(t: float) -> tuple[SAEKey, tuple[int, ...]]:
            key = loaded.bank.nearest_key(block, t, branch)
            return key, tuple(found.get(key, ()))

        return by_word, repr(word)
    if cid is None or cid == "":
        raise ValueError("Choose a concept: type a word, or give a CID.")
    key, sae = loaded.sae(block, check_number(cid_t, "The t of the CID's SAE", 0.0, 1.0), branch)
    chosen = (check_cid(cid, sae.cfg.num_latents),)
    return lambda t: (key, chosen), f"CID {chosen[0]} of the SAE at {_at(key)}"


def _read(loaded: Loaded, recorded: DeltaRecord, chosen: tuple) -> TimelineStep:
    """One step's activation map, read by the SAE `chosen` names (NaN if it has no CIDs)."""
    key, cids = chosen
    grid = latent_grid(loaded.bank[key], recorded.delta, recorded.site)
    activation = grid.activation(cids)[0].float().cpu()
    if not cids:
        activation = torch.full_like(activation, float("nan"))
    return TimelineStep(recorded.step, key, cids, activation)


def filmstrip(timeline: Timeline) -> Image.Image:
    """Every step's map, left to right from t = 1 to 0 (wrapping every FRAMES_PER_ROW), each
    titled with its t and its SAE's, on the timeline's one scale with one colour bar, under a
    header saying what it shows (the page's buttons, top right, cover none of it)."""
    count = len(timeline.steps)
    columns = min(count, FRAMES_PER_ROW)
    rows = -(-count // FRAMES_PER_ROW)
    cell = (FRAME + 4, FRAME + TITLE_HEIGHT)
    grid = Image.new("RGB", (columns * cell[0], rows * cell[1]), "white")
    draw = ImageDraw.Draw(grid)
    for i, step in enumerate(timeline.steps):
        left, top = (i % FRAMES_PER_ROW) * cell[0], (i // FRAMES_PER_ROW) * cell[1]
        centre = left + cell[0] / 2
        draw.text((centre, top + 8), f"t={step.step.t:.2f}", fill="black", font=_FONT, anchor="mm")
        used = f"SAE {_at(step.sae)}" if step.cids else "no CID"
        draw.text((centre, top + 21), used, fill="dimgrey", font=_FONT, anchor="mm")
        frame = colour_map(step.activation, 0.0, timeline.scale, CMAP, FRAME)
        grid.paste(frame, (left + 2, top + TITLE_HEIGHT))
    return _with_header(with_colour_bar(grid, 0.0, timeline.scale, STRIP_LABEL, CMAP), timeline)


def _with_header(strip: Image.Image, timeline: Timeline) -> Image.Image:
    skipped = " (grey: skipped)" if timeline.skips else ""
    header = f"{timeline.concept} at each step, t from 1 (noise) to 0{skipped}"
    width = max(strip.width, round(_FONT.getlength(header)) + 4)
    image = Image.new("RGB", (width, HEADER_HEIGHT + strip.height), "white")
    ImageDraw.Draw(image).text(
        (2, HEADER_HEIGHT / 2), header, fill="black", font=_FONT, anchor="lm"
    )
    image.paste(strip, (0, HEADER_HEIGHT))
    return image


def strength_figure(timeline: Timeline) -> Figure:
    """Mean and max activation per step against t, each SAE's range of steps shaded."""
    ax = Figure(figsize=(6, 4), dpi=100).subplots()
    ts, maxes = np.array(timeline.ts), np.array([s.max for s in timeline.steps])
    _shade_saes(ax, timeline, ts)
    ax.plot(ts, maxes, "o-", color="tab:red", label="max over positions")
    ax.plot(ts, [s.mean for s in timeline.steps], "s-", color="tab:blue", label="mean")
    t_axis(ax)
    top = np.nanmax(maxes, initial=0.0)
    ax.set_ylim(0, (top if top > 0 else 1.0) * 1.2)  # headroom for the SAE names
    ax.set_ylabel("activation" + (" (its CIDs summed)" if timeline.word else ""))
    return finished(
        ax,
        f"How strongly {timeline.concept} fires at each step\n{timeline.block} "
        f"({timeline.branch}); shaded: the SAE that read each step"
        + ("\ngaps: steps skipped" if timeline.skips else ""),
    )


def _shade_saes(ax: Axes, timeline: Timeline, ts: np.ndarray) -> None:
    """Alternate shading over each run of steps read by one SAE, named at the top; the
    boundaries sit halfway between the steps where the SAE changes."""
    runs = indices_by(timeline.steps, lambda s: s.sae)
    positions = {s.step.index: i for i, s in enumerate(timeline.steps)}
    for n, (key, indices) in enumerate(runs):
        first, last = positions[indices[0]], positions[indices[-1]]
        high = 1.02 if first == 0 else (ts[first - 1] + ts[first]) / 2
        low = -0.02 if last == len(ts) - 1 else (ts[last] + ts[last + 1]) / 2
        ax.axvspan(low, high, color="grey", alpha=0.12 if n % 2 == 0 else 0.04, lw=0)
        ax.text(
            (low + high) / 2,
            0.98,
            f"SAE {_at(key)}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
        )
