"""Steering strengths calibrated on a model's own activations.

The paper's strengths (`core.steer.kinds`, `Kind.default_strength`: spatial 4000 / 400 / 1000,
global 8 / 10 / 10) are in units of SD v1.4's residual updates. On another model the same
numbers can change nothing: on a small shapes-world model, global edits at the paper's
strengths moved pixels by about 6e-5 on average. `calibrate` finds, for each kind of edit
and stage, the smallest strength of `LADDER` whose edits change the image measurably: the
median of their mean absolute pixel changes (in [0, 1] units) reaches `target`, so that most
edits have an effect. It searches the ladder by bisection (a stronger edit is assumed to
change the image at least as much). The result is saved as `strengths.json` beside the
SAEs, where the app and the toy model's check read it.

A spatial edit's change is measured from what it tends to as its strength goes to 0 (its
kind's `zero_limit`: the concept removed everywhere), not from the unedited image: on the
toy's DiT twin that removal alone moved pixels by 0.025-0.069 (on the toy U-Net by 1.3e-5
at most), so measuring from the unedited image calibrated a removal, not a move. What the
removal changes is kept in `Calibration.at_zero`.

An edit whose mean change is below `NO_EFFECT` (one grey level of 255) had no effect: a
success rate over such edits says nothing about the edit, and the check reports a claim
resting on them as untested.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from core.diffusion.presets import STAGES
from core.diffusion.sampling import generate_image, image_size
from core.emergence.concepts import ConceptDictionary
from core.emergence.evaluate_edits import object_cids
from core.emergence.metrics import NO_EFFECT, pixel_difference
from core.files import write_json
from core.quadrants import QUADRANTS
from core.sae.bank import SAEBank, SAEKey
from core.steer.intervene import Intervention, intervene
from core.steer.kinds import get_kind
from core.steer.regions import quadrant_mask
from core.steer.strength import STRENGTHS_FILE

LADDER = tuple(float(2**i) for i in range(-4, 17))
"""Strengths tried, 1/16 to 65,536 (doubling)."""


@dataclass
class Calibration:
    """The strengths found, and what each tried strength changed."""

    strengths: dict[str, dict[str, float]]
    """kind -> stage -> strength."""
    target: float
    """The median pixel change a strength had to reach."""
    tried: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """kind -> stage -> {strength: median pixel change of the edits from the unedited images, or
    for a kind with a `zero_limit` from that edit}."""
    at_zero: dict[str, dict[str, float]] = field(default_factory=dict)
    """kind (with a `zero_limit`) -> stage -> median pixel change of that edit from the
    unedited images."""
    notes: list[str] = field(default_factory=list)
    """Stages where no strength of the ladder reached the target (its largest is kept), or its
    smallest already passed it."""

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / STRENGTHS_FILE
        write_json(path, asdict(self))
        return path


@dataclass(frozen=True)
class CalibrationEdits:
    """The edits a strength is tried on: spatial edits move each object of `objects` (in the
    prompt `template`) to one of `quadrants`, taken in turn; global edits add each of
    `concepts` to each of `prompts`."""

    objects: Sequence[str]
    template: str
    concepts: Sequence[str]
    prompts: Sequence[str]
    quadrants: Sequence[str] = QUADRANTS


def calibrate(
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    edits: CalibrationEdits,
    *,
    block: str,
    branch: str = "cond",
    stages: Sequence[str] = tuple(STAGES),
    target: float = 2 * NO_EFFECT,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> Calibration:
    """The smallest strength of `LADDER` per kind and stage whose edits change the image by a
    median of at least `target` per pixel (see the module docstring)."""
    size = image_size(pipe, resolution)
    words = [*edits.objects, *edits.concepts]
    found = object_cids(dictionaries, words, block, branch)[0] if words else {}
    jobs = {
        "spatial": [
            (
                edits.template.format(obj),
                found[obj],
                quadrant_mask(edits.quadrants[i % len(edits.quadrants)], size),
            )
            for i, obj in enumerate(o for o in edits.objects if o in found)
        ],
        "global": [
            (prompt, found[concept], None)
            for prompt in edits.prompts
            for concept in edits.concepts
            if concept in found
        ],
    }

    def images(kind: str, edit_kind: str | None, stage: str = "", strength: float = 0.0) -> list:
        """The kind's calibration images, edited as `edit_kind` at `strength` in `stage` (None:
        unedited)."""
        out = []
        for i, (prompt, cids, region) in enumerate(jobs[kind]):
            args = (pipe, prompt, seed + i, steps, guidance_scale, resolution)
            edit = edit_kind and Intervention(edit_kind, cids, strength, stage, (branch,), region)
            with intervene(pipe, bank, block, edit, size) if edit else nullcontext():
                out.append(generate_image(*args))
        return out

    def change(reference: list, kind: str, stage: str, strength: float) -> float:
        return median_change(reference, images(kind, kind, stage, strength))

    calibration = Calibration({}, target)
    for kind, kind_jobs in jobs.items():
        if not kind_jobs:
            calibration.notes.append(f"no {kind} edit to calibrate: none of its words is labelled")
            continue
        unedited = images(kind, None)
        for stage in stages:
            reference, limit = unedited, get_kind(kind).zero_limit
            if limit:
                limit_kind, limit_strength = limit
                reference = images(kind, limit_kind, stage, limit_strength)
                calibration.at_zero.setdefault(kind, {})[stage] = median_change(unedited, reference)
            tried = calibration.tried.setdefault(kind, {}).setdefault(stage, {})
            strength = first_reaching(partial(change, reference, kind, stage), target, tried)
            if tried[f"{strength:g}"] < target:
                calibration.notes.append(
                    f"{kind} edits in the {stage} stage change the image by less than "
                    f"{target:.3g} even at strength {strength:g}"
                )
            elif strength == LADDER[0]:
                calibration.notes.append(
                    f"{kind} edits in the {stage} stage change the image by "
                    f"{tried[f'{strength:g}']:.3g} already at strength {strength:g}, the "
                    "ladder's smallest: a weaker one may be the right one"
                )
            calibration.strengths.setdefault(kind, {})[stage] = strength
    return calibration


def median_change(before: Sequence, after: Sequence) -> float:
    """The median over image pairs of their mean absolute pixel change."""
    return float(np.median([pixel_difference(a, b) for a, b in zip(before, after, strict=True)]))


def first_reaching(
    measure: Callable[[float], float], target: float, tried: dict[str, float]
) -> float:
    """The first strength of `LADDER` whose `measure` reaches `target`, found by bisection (a
    stronger edit is assumed to measure at least as much); the largest if none does. Each
    strength measured goes into `tried` (keyed as `f"{strength:g}"`), and none twice."""

    def at(rung: int) -> float:
        key = f"{LADDER[rung]:g}"
        if key not in tried:
            tried[key] = measure(LADDER[rung])
        return tried[key]

    low, high = 0, len(LADDER) - 1
    while low < high:
        middle = (low + high) // 2
        if at(middle) >= target:
            high = middle
        else:
            low = middle + 1
    at(low)
    return LADDER[low]
