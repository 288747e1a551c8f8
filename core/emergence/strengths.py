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

An edit whose mean change is below `NO_EFFECT` (one grey level of 255) had no effect: a
success rate over such edits says nothing about the edit, and the check reports a claim
resting on them as untested.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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
    """kind -> stage -> {strength: median pixel change of the edits}."""
    notes: list[str] = field(default_factory=list)
    """Stages where no strength of the ladder reached the target (its largest is kept)."""

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
    before: dict[tuple[str, int], object] = {}

    def change(kind: str, stage: str, strength: float) -> float:
        """Median pixel change of the kind's calibration edits at `strength` in `stage`."""
        changes = []
        for i, (prompt, cids, region) in enumerate(jobs[kind]):
            args = (pipe, prompt, seed + i, steps, guidance_scale, resolution)
            if (prompt, seed + i) not in before:
                before[prompt, seed + i] = generate_image(*args)
            edit = Intervention(kind, cids, strength, stage, (branch,), region)
            with intervene(pipe, bank, block, edit, size):
                changes.append(pixel_difference(before[prompt, seed + i], generate_image(*args)))
        return float(np.median(changes))

    calibration = Calibration({}, target)
    for kind, kind_jobs in jobs.items():
        if not kind_jobs:
            calibration.notes.append(f"no {kind} edit to calibrate: none of its words is labelled")
            continue
        for stage in stages:
            tried = calibration.tried.setdefault(kind, {}).setdefault(stage, {})
            strength = first_reaching(partial(change, kind, stage), target, tried)
            if tried[f"{strength:g}"] < target:
                calibration.notes.append(
                    f"{kind} edits in the {stage} stage change the image by less than "
                    f"{target:.3g} even at strength {strength:g}"
                )
            calibration.strengths.setdefault(kind, {})[stage] = strength
    return calibration


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
