"""Steer one generation with a concept and compare it with the unsteered one (same seed).

The concept is a word (its CIDs in the dictionary of every t, `concept_cids`) or one CID
of one SAE. The region of a spatial edit is a drawn mask at any resolution (`canvas_mask`
reads it from an image editor's value) or a quadrant.
What changed is measured by the mean absolute pixel difference (always), LPIPS and the
change in CLIP similarity with the concept's word (when those models can be loaded), and
shown as a difference map in grey levels on the fixed scale 0-255. Each result carries the
edit's record: which steps each SAE edited with which CIDs, which steps were skipped and
why; its summary adds how much the image changed, in words.

The concepts of a word can be listed (`concept_choices`) and narrowed to some of them
(`SteerRequest.keep`). A spatial edit is checked where a segmenter can find the concept's
object (the shapes world's pixels, else CLIPSeg, the paper's evaluator): is the object's
centre of mass in the target region before and after (`Placement`)?
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from core.annotate.clipseg import centre_of_mass
from core.diffusion.hooks import BRANCHES
from core.diffusion.presets import AppDefaults, Preset
from core.emergence.concepts import normalize_label
from core.emergence.metrics import pixel_difference
from core.quadrants import QUADRANTS
from core.sae.bank import SAEKey
from core.steer.intervene import Intervention, intervene, validate
from core.steer.kinds import MAX_STRENGTH, get_kind
from core.steer.record import EditRecord, list_cids
from core.steer.regions import quadrant_mask
from core.steer.strength import (
    proposed_strength,
    read_strengths,
    stage_strengths,
    strength_unit,
)
from core.steer.windows import Window, stage_window, stages_in
from core.training.activations import schedule_of, steps_in_range
from core.views.inputs import check_cid, check_number, check_prompt, check_seed
from core.views.inspection import describe_labels
from core.views.model_cache import Loaded
from core.views.render import GREY_LEVELS, difference_map, grey_levels

BRANCH_CHOICES = {"cond": ("cond",), "uncond": ("uncond",), "both": BRANCHES}
STAGE_CHOICES = ("early", "middle", "final", "custom")


@dataclass(frozen=True)
class Controls:
    """What a preset can use, so that the page offers nothing else."""

    branches: tuple[str, ...]
    """The `BRANCH_CHOICES` names it has SAEs (and guidance) for."""
    by_word: bool
    """Whether concepts can be chosen by word: it has concept dictionaries."""
    per_stage: bool
    """Whether a stage's SAE and the nearest one can differ: its SAEs are at several t."""


def usable_controls(preset: Preset, loaded: Loaded | None) -> Controls:
    """A preset's usable controls; before it is loaded, what its settings allow."""
    have = set(BRANCHES) if loaded is None else {key.branch for key in loaded.bank}
    if preset.guidance_scale <= 1:
        have.discard("uncond")
    branches = tuple(name for name, needs in BRANCH_CHOICES.items() if set(needs) <= have)
    if loaded is None:
        return Controls(branches, by_word=True, per_stage=True)
    times = {key.t for key in loaded.bank}
    return Controls(branches, bool(loaded.dictionaries), per_stage=len(times) > 1)


@dataclass
class SteerRequest:
    prompt: object
    seed: object
    block: str
    kind: str = "spatial"
    stage: str = "early"
    t_range: tuple[object, object] = (0.6, 1.0)
    """Used when `stage` is "custom"."""
    strength: object = None
    """None: the paper's strength for the kind and stage."""
    branch: str = "cond"
    """"cond", "uncond" or "both"."""
    word: str = ""
    """The concept as a word; empty to use `cid`."""
    cid: object = None
    cid_t: object = 1.0
    """A CID belongs to one SAE: the one of `block` trained nearest to this t."""
    quadrant: str | None = "top_left"
    mask: np.ndarray | None = None
    """A drawn region (any resolution, > 0 inside); overrides `quadrant`."""
    sae_choice: str = "stage"
    """"stage": every edited step uses the SAE at its stage's t (the paper's way); "nearest":
    each uses the SAE trained nearest to its own t."""
    keep: Sequence[str] = ()
    """Of the word's concepts, only these (`concept_choices` values); empty: all of them."""


@dataclass
class Placement:
    """Where a spatial edit's object is before and after it: its centre of mass (x, y) in
    pixels, or None where it was not found, and whether that lies inside the region."""

    word: str
    before: tuple[float, float] | None
    after: tuple[float, float] | None
    inside_before: bool
    inside_after: bool
    evaluator: str

    def summary(self) -> str:
        def where(point: tuple[float, float] | None, inside: bool) -> str:
            if point is None:
                return "not found"
            return f"({point[0]:.0f}, {point[1]:.0f}), {'inside' if inside else 'outside'}"

        return (
            f"Centre of mass of the {self.word} ({self.evaluator}) relative to the target "
            f"region: before {where(self.before, self.inside_before)}; "
            f"after {where(self.after, self.inside_after)}."
        )

    def as_metrics(self) -> dict[str, object]:
        return {
            "object": self.word,
            "found_by": self.evaluator,
            "centre_before": self.before,
            "centre_after": self.after,
            "in_region_before": self.inside_before,
            "in_region_after": self.inside_after,
        }


def place(segmenter, image: Image.Image, word: str, region: np.ndarray) -> tuple:
    """(centre of mass of `word` in `image` or None, whether it lies in `region`)."""
    point = centre_of_mass(segmenter.segment(image, [word])[word])
    if point is None:
        return None, False
    x, y = (round(v) for v in point)
    return point, bool(region[min(y, region.shape[0] - 1), min(x, region.shape[1] - 1)])


@dataclass
class SteerResult:
    before: Image.Image
    after: Image.Image
    difference: Image.Image
    metrics: dict[str, object]
    record: EditRecord
    """Which steps were edited with which SAE and CIDs, which were skipped and why."""
    placement: Placement | None = None
    """Where the concept's object is before and after a spatial edit; None: not checked."""

    def summary(self) -> str:
        """The edit record's line, how much the image changed, and whether a spatial edit
        put the object in the region."""
        lines = [self.record.summary(), change_in_words(self.before, self.after)]
        return "\n".join(lines + ([self.placement.summary()] if self.placement else []))


def change_in_words(before: Image.Image, after: Image.Image) -> str:
    """The change per pixel in grey levels (of 255): its mean, saying so when that is below
    one level, and its largest."""
    levels = grey_levels(before, after)
    mean, largest = float(levels.mean()), float(levels.max())
    if largest == 0:
        return "The image did not change."
    most = f"at most {largest:.3g} at one pixel"
    if mean < 1:
        return (
            "The image changed by less than one grey level per pixel on average "
            f"({mean:.3g} of {GREY_LEVELS}), {most}."
        )
    per_pixel = f"{mean:.3g} grey levels per pixel on average (of {GREY_LEVELS})"
    return f"The image changed by {per_pixel}, {most}."


def window_of(stage: str, t_range: tuple[object, object]) -> Window:
    """The window of a stage choice: the named stage, or for "custom" the t range checked."""
    if stage not in STAGE_CHOICES:
        raise ValueError(f"Unknown stage {stage!r}; choose {', '.join(STAGE_CHOICES)}.")
    if stage != "custom":
        return stage
    low, high = (check_number(v, "A bound of the t range", 0.0, 1.0) for v in t_range)
    return stage_window((low, high))


def default_strength(
    preset: Preset, kind: str, stage: str, t_range: tuple[object, object] = (0.6, 1.0)
) -> float | None:
    """The strength proposed for an edit before its preset loads, read as a loaded preset
    reads it (a damaged strengths file gives the paper's); None for a custom stage."""
    calibrated, _ = read_strengths(preset.sae_source)
    window = window_of(stage, t_range)
    return proposed_strength(get_kind(kind).name, window, preset.app.strength, calibrated)


def strength_of(
    request: SteerRequest, defaults: AppDefaults, strengths: Mapping | None = None
) -> float | None:
    """The request's strength, else the one proposed for its kind and stage
    (`core.steer.strength.proposed_strength`); None for a custom stage: each step takes its
    own stage's."""
    kind = get_kind(request.kind)
    if request.strength is not None and request.strength != "":
        return check_number(request.strength, "The strength", 0.0, MAX_STRENGTH)
    window = window_of(request.stage, request.t_range)
    return proposed_strength(kind.name, window, defaults.strength, strengths)


def choice_value(key: SAEKey, cid: int) -> str:
    return f"{key.branch}:{key.t}:{cid}"


def concept_choices(loaded: Loaded, block: str, branch: str, word: object) -> list[tuple]:
    """(label, value) of each concept labelled `word`, per SAE, for narrowing an edit to
    some of them (`SteerRequest.keep` takes the values)."""
    if branch not in BRANCH_CHOICES:
        raise ValueError(f"Unknown branch {branch!r}; choose {', '.join(BRANCH_CHOICES)}.")
    word = str(word or "").strip()
    if not word:
        raise ValueError("Type a word to list the concepts labelled with it.")
    found = loaded.dictionaries.word_cids(word, block, BRANCH_CHOICES[branch])
    label = normalize_label(word)
    return [
        (
            f"t={key.t} {key.branch}: CID {cid} ({describe_labels(loaded, key, cid, label)})",
            choice_value(key, cid),
        )
        for key, ids in sorted(found.items(), key=lambda item: (-item[0].t, item[0].branch))
        for cid in ids
    ]


def narrowed(found: dict[SAEKey, list[int]], keep: Sequence[str], word: str) -> dict:
    """`found` with only the concepts in `keep` (all when `keep` is empty)."""
    if not keep:
        return found
    kept = {key: [c for c in ids if choice_value(key, c) in keep] for key, ids in found.items()}
    if not any(kept.values()):
        raise ValueError(
            f"None of the chosen concepts is labelled {word!r} in this block and branch; list "
            "the word's concepts again and choose among them."
        )
    return kept


def concept_of(loaded: Loaded, request: SteerRequest, branches: Sequence[str]) -> tuple:
    """(CIDs per SAE key, description): by word through each t's dictionary (narrowed to
    `request.keep`), or one CID."""
    if request.word.strip():
        word = request.word.strip()
        found = loaded.dictionaries.word_cids(word, request.block, branches)
        return narrowed(found, request.keep, word), f"{word!r}"
    if request.cid is None or request.cid == "":
        raise ValueError("Choose a concept: type a word, or give a CID.")
    t = check_number(request.cid_t, "The t of the CID's SAE", 0.0, 1.0)
    cids = {}
    for branch in branches:
        key, sae = loaded.sae(request.block, t, branch)
        cids[key] = [check_cid(request.cid, sae.cfg.num_latents)]
    return cids, f"CID {int(float(request.cid))} of the SAE at t={key.t}"


def canvas_mask(value: dict | None) -> np.ndarray | None:
    """The drawn region of an image editor's value (background, layers, composite): where any
    layer is painted, else where the composite differs from the background; None if neither."""
    if not value:
        return None
    layers = [np.asarray(layer) for layer in value.get("layers") or [] if layer is not None]
    painted = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[2] == 4]
    if painted:
        return np.logical_or.reduce(painted)
    background, composite = value.get("background"), value.get("composite")
    if background is None or composite is None:
        return None
    difference = np.abs(np.asarray(composite, float) - np.asarray(background, float))
    return difference[..., :3].sum(axis=-1) > 0


def region_of(request: SteerRequest, size: tuple[int, int]) -> np.ndarray | None:
    """The spatial edit's region at image size: the drawn mask if any, else the quadrant."""
    if not get_kind(request.kind).needs_region:
        return None
    if request.mask is not None:
        drawn = np.asarray(request.mask, dtype=np.float32)
        image = Image.fromarray((np.clip(drawn, 0, 1) * 255).astype(np.uint8))
        resized = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.asarray(resized) > 127
    if request.quadrant not in QUADRANTS:
        raise ValueError(f"Unknown quadrant {request.quadrant!r}; choose {', '.join(QUADRANTS)}.")
    return quadrant_mask(request.quadrant, size)


def before_image(
    loaded: Loaded,
    prompt: object,
    seed: object,
    on_step: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """The unsteered image of a steer request: the canvas shows it to draw the region on."""
    return loaded.generate(
        [check_prompt(prompt)], [check_seed(seed)], steer_steps(loaded.preset), on_step=on_step
    )[0]


def steer_steps(preset: Preset) -> int:
    """How many steps the steer tab's images take: the preset's, or its own for steering."""
    return preset.app.steer_steps or preset.steps


def check_window_has_steps(loaded: Loaded, edit: Intervention, steps: int) -> None:
    """Refuse a stage or t range that holds none of the run's steps: it would edit nothing."""
    ts = schedule_of(loaded.pipe, steps)
    if not steps_in_range(ts, stage_window(edit.window, edit.stages)):
        listed = ", ".join(f"{t:.2f}" for t in ts)
        raise ValueError(
            f"The {_describe_stage(edit)} holds none of the {steps} steps (t = {listed}); "
            "choose another stage or a t range that includes one."
        )


def run_steer(
    loaded: Loaded, request: SteerRequest, on_step: Callable[[int, int], None] | None = None
) -> SteerResult:
    """Generate without and with the intervention from the same seed, and compare."""
    prompt, seed = check_prompt(request.prompt), check_seed(request.seed)
    if request.branch not in BRANCH_CHOICES:
        raise ValueError(f"Unknown branch {request.branch!r}; choose {', '.join(BRANCH_CHOICES)}.")
    branches = BRANCH_CHOICES[request.branch]
    for branch in branches:
        loaded.check_recorded(request.block, branch)
    stage = window_of(request.stage, request.t_range)
    strength = strength_of(request, loaded.preset.app, loaded.strengths)
    cids, concept = concept_of(loaded, request, branches)
    size = loaded.image_size()
    region = region_of(request, size)
    per_stage = stage_strengths(request.kind, loaded.strengths)
    edit = Intervention(
        kind=request.kind,
        cids=cids,
        strength=per_stage if strength is None else strength,
        window=stage,
        branches=branches,
        region=region,
        sae_choice=request.sae_choice,
        concept=concept,
        stages=loaded.preset.stages,
    )
    validate(edit, size)
    steps = steer_steps(loaded.preset)
    check_window_has_steps(loaded, edit, steps)
    total = 2 * steps

    def progress(offset: int) -> Callable[[int, int], None] | None:
        return None if on_step is None else lambda done, _: on_step(offset + done, total)

    before = before_image(loaded, prompt, seed, progress(0))
    with intervene(loaded.pipe, loaded.bank, request.block, edit, size) as record:
        after = loaded.generate([prompt], [seed], steps, on_step=progress(steps))[0]
    word = request.word.strip() or _top_label(loaded, cids)
    placement, unchecked = placement_of(loaded, before, after, word, edit.region)
    metrics = {
        **compare(loaded, before, after, word),
        "concept": concept,
        "edit": f"{request.kind}, {_describe_stage(edit)}, {_describe_strength(loaded, edit)}, "
        f"SAE per step: {request.sae_choice}",
        "region": _describe_region(request, edit.region),
        "edited_steps": f"{len({step.index for step in record.edited()})} of {steps}",
        "cids": {f"t={key.t}": list_cids(ids) for key, ids in sorted(cids.items())},
    }
    if placement or unchecked:
        metrics["placement"] = placement.as_metrics() if placement else unchecked
    difference = difference_map(before, after)
    return SteerResult(before, after, difference, metrics, record, placement)


def placement_of(
    loaded: Loaded,
    before: Image.Image,
    after: Image.Image,
    word: str | None,
    region: np.ndarray | None,
) -> tuple[Placement | None, str | None]:
    """(where the concept's object is before and after a spatial edit, None), or (None, why
    it is not checked) when no segmenter loads; (None, None) for other edits and unlabelled
    concepts."""
    if region is None or word is None:
        return None, None
    segmenter, evaluator = loaded.labelling.segmenter
    if segmenter is None:
        return None, f"not checked: {evaluator}"
    (point_before, in_before), (point_after, in_after) = (
        place(segmenter, image, word, region) for image in (before, after)
    )
    return Placement(word, point_before, point_after, in_before, in_after, evaluator), None


def _describe_strength(loaded: Loaded, edit: Intervention) -> str:
    """ "strength 400" (for a custom stage without one, each stage's), or, where the SAEs carry
    mean activations (SDLens), what it multiplies."""
    if isinstance(edit.strength, Mapping):
        whose = "calibrated" if loaded.strengths else "the paper's"
        each = ", ".join(
            f"{stage} {edit.strength[stage]:g}" for stage in stages_in(edit.window, edit.stages)
        )
        text = f"{whose} strength of each step's stage ({each})"
    else:
        text = f"strength {edit.strength:g}"
    has_means = any(loaded.bank[key].mean_acts is not None for key in edit.cids)
    unit = strength_unit(edit.kind, has_means)
    return f"{text} {unit}" if unit else text


def _describe_region(request: SteerRequest, region: np.ndarray | None) -> str:
    if region is None:
        return "everywhere"
    where = "drawn" if request.mask is not None else str(request.quadrant)
    return f"{where}, {region.mean():.0%} of the image"


def _describe_stage(edit: Intervention) -> str:
    low, high = stage_window(edit.window, edit.stages)
    name = edit.window if isinstance(edit.window, str) else "custom"
    return f"{name} stage (t in [{low:g}, {high:g}])"


def _top_label(loaded: Loaded, cids: Mapping[SAEKey, list[int]]) -> str | None:
    for key, ids in cids.items():
        dictionary = loaded.dictionaries.get(key)
        for cid in ids:
            labels = dictionary.labels(cid) if dictionary else None
            if labels:
                return labels.most_common(1)[0][0]
    return None


def compare(
    loaded: Loaded, before: Image.Image, after: Image.Image, word: str | None
) -> dict[str, object]:
    """Pixel difference, LPIPS and CLIP-similarity change, or why a metric is missing."""
    metrics: dict[str, object] = {
        "mean_abs_pixel_difference": round(pixel_difference(before, after), 5)
    }
    lpips, why = loaded.labelling.lpips
    metrics["lpips"] = round(lpips(before, after), 5) if lpips else why.split(";")[0]
    if word is None:
        metrics["clip_delta"] = "no word to compare with (the concept has no label)"
        return metrics
    scorer, why = loaded.labelling.clip
    if scorer is None:
        metrics["clip_delta"] = why
    else:
        before_score, after_score = scorer.similarity([before, after], f"a photo of a {word}")
        metrics["clip_delta"] = round(after_score - before_score, 5)
    return metrics
