"""A steering strength's default and unit, decided once per kind and SAE source.

Where no strength is given, a step takes, in order: the preset's proposed one (for the kinds
that take it, `Kind.takes_preset_strength`), the strength calibrated for the SAE bank
(`strengths.json` beside its SAEs, written by `core.emergence.strengths`), or the paper's
for the kind and its stage. Where the SAEs ship mean activations, beta multiplies them
(`Kind.mean_unit`).
"""

import json
from collections.abc import Mapping
from pathlib import Path

from core.steer.kinds import get_kind
from core.steer.windows import Window

STRENGTHS_FILE = "strengths.json"
"""Strengths calibrated for an SAE bank (`core.emergence.strengths`), saved beside its SAEs."""
Calibrated = Mapping[str, Mapping[str, float]]
"""kind -> stage -> strength."""


def load_strengths(folder: str | Path | None) -> dict[str, dict[str, float]] | None:
    """kind -> stage -> strength from `folder`'s strengths.json; None if it has none."""
    path = Path(folder) / STRENGTHS_FILE if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["strengths"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a strengths file ({error}); rebuild it with the toy build's "
            "strengths step or delete it to use the paper's strengths"
        ) from error


def read_strengths(folder: str | Path | None) -> tuple[dict | None, str | None]:
    """(calibrated strengths or None, None), or, for a damaged file, (None, a note saying the
    paper's are used and why): a page must not fail on it."""
    try:
        return load_strengths(folder), None
    except ValueError as error:
        return None, f"The paper's steering strengths are proposed: {error.args[0]}."


def stage_strengths(kind: str, calibrated: Calibrated | None) -> dict[str, float]:
    """Stage -> strength for `kind`: calibrated for the bank where it has them, else the
    paper's."""
    return dict((calibrated or {}).get(kind) or get_kind(kind).default_strength)


def proposed_strength(
    kind: str, window: Window, preset_strength: float | None, calibrated: Calibrated | None
) -> float | None:
    """The strength an edit takes when none is given: the preset's (for kinds that take it),
    else its named stage's; None for a custom window, whose steps each take their stage's."""
    if preset_strength is not None and get_kind(kind).takes_preset_strength:
        return preset_strength
    return stage_strengths(kind, calibrated)[window] if isinstance(window, str) else None


def strength_unit(kind: str, has_means: bool) -> str:
    """What beta multiplies beyond the kind's formula: each CID's mean activation where the
    SAEs ship them and the kind uses them; empty otherwise."""
    return get_kind(kind).mean_unit if has_means else ""
