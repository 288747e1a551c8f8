"""A fixed, small part of the check, recorded when the toy model is shipped and rerun by the
tests: the same captions and edits on the shipped weights must give the same verdicts, and
numbers within `TOLERANCE`.

    recorded = subset_rows(pipe, bank, dictionaries, strengths, settings)   # at ship time
    differences(recorded, subset_rows(...))                                 # [] if reproduced
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

from core.annotate.labellers import TOY_WORLD
from core.annotate.shapes import StyleScorer, ToySegmenter
from core.emergence.concepts import ConceptDictionary
from core.emergence.evaluate_edits import global_edit_rows, spatial_edit_rows
from core.emergence.results import MID, Rows
from core.files import write_json
from core.sae.bank import SAEBank, SAEKey
from core.shapes.world import SHAPES, STYLES
from core.toy.check import CheckSettings, caption_rows, heldout_scenes, labelled

SUBSET_FILE = "subset.json"
"""Written into the shipped `check/` folder."""
CAPTIONS = 6
QUADRANTS = ("top_left", "bottom_right")
VERDICTS = ("object_found", "colour_found", "style_right", "found_quadrant", "success", "no_effect")
NUMBERS = ("pixel_diff",)
TOLERANCE = 0.01
"""Largest difference of a number (a mean pixel change, of 1) between two machines."""


def subset_rows(
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    strengths: Mapping[str, Mapping[str, float]] | None,
    settings: CheckSettings,
    block: str = MID,
) -> dict[str, Rows]:
    """Caption following on the first `CAPTIONS` held-out captions, one labelled shape moved
    to two quadrants and one labelled style added to one caption, in every stage (edits of
    `block`)."""
    strengths = strengths or {}
    scenes = heldout_scenes(CAPTIONS + 1, settings)
    common = dict(
        seed=settings.seed,
        steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        resolution=settings.resolution,
    )
    rows = {"captions": caption_rows(pipe, scenes[:CAPTIONS], settings)}
    shapes, styles = labelled(dictionaries, SHAPES, block), labelled(dictionaries, STYLES, block)
    if shapes:
        rows["spatial"] = spatial_edit_rows(
            pipe,
            bank,
            dictionaries,
            shapes[:1],
            ToySegmenter(),
            block=block,
            quadrants=QUADRANTS,
            strengths=strengths.get("spatial"),
            template=TOY_WORLD.template,
            **common,
        )
    if styles:
        rows["global"] = global_edit_rows(
            pipe,
            bank,
            dictionaries,
            styles[:1],
            [scenes[CAPTIONS].caption],
            StyleScorer(),
            block=block,
            strengths=strengths.get("global"),
            **common,
        )
    return rows


def record(path: Path, rows: dict[str, Rows], settings: CheckSettings) -> None:
    write_json(path, {"settings": asdict(settings), "rows": rows})


def recorded(path: Path) -> tuple[dict[str, Rows], CheckSettings]:
    """The rows and the settings `record` wrote."""
    saved = json.loads(path.read_text())
    settings = saved["settings"]
    settings["radius_range"] = tuple(settings["radius_range"])
    return saved["rows"], replace(CheckSettings(), **settings)


def differences(expected: dict[str, Rows], found: dict[str, Rows]) -> list[str]:
    """One line per verdict that differs and per number off by more than `TOLERANCE`."""
    lines = []
    if expected.keys() != found.keys():
        return [f"parts differ: {sorted(expected)} recorded, {sorted(found)} now"]
    for part, rows in expected.items():
        if len(rows) != len(found[part]):
            lines.append(f"{part}: {len(rows)} rows recorded, {len(found[part])} now")
            continue
        for i, (was, now) in enumerate(zip(rows, found[part], strict=True)):
            for name in VERDICTS:
                if name in was and was[name] != now[name]:
                    lines.append(f"{part} row {i}: {name} was {was[name]!r}, now {now[name]!r}")
            for name in NUMBERS:
                if name in was and abs(was[name] - now[name]) > TOLERANCE:
                    lines.append(f"{part} row {i}: {name} was {was[name]:.4f}, now {now[name]:.4f}")
    return lines
