"""Steering strengths calibrated on a model's own activations."""

import json

import pytest

from core.diffusion.presets import get_preset
from core.emergence.strengths import LADDER, CalibrationEdits, calibrate
from core.steer.strength import STRENGTHS_FILE, load_strengths, read_strengths
from core.views.model_cache import ModelCache
from core.views.steer import default_strength

UP = "up_blocks.1.attentions.0"


@pytest.fixture(scope="module")
def calibration(one_thread):
    edits = CalibrationEdits(
        objects=["star"],
        template="a red {} on a gray plain background",
        concepts=["checkered"],
        prompts=["a blue star"],
        quadrants=("top_left",),
    )
    with ModelCache().using("tiny") as loaded:
        return calibrate(
            loaded.pipe,
            loaded.bank,
            loaded.dictionaries,
            edits,
            block=UP,
            stages=("early", "final"),
            steps=4,
            resolution=32,
        )


def test_the_smallest_strength_that_changes_the_image_is_chosen(calibration):
    for kind in ("spatial", "global"):
        chosen, tried = calibration.strengths[kind]["early"], calibration.tried[kind]["early"]
        assert chosen in LADDER and tried[f"{chosen:g}"] >= calibration.target
        weaker = [float(s) for s in tried if float(s) < chosen]
        assert weaker and all(tried[f"{s:g}"] < calibration.target for s in weaker)
        assert len(tried) <= 6  # bisection over 21 rungs


def test_a_stage_no_strength_can_move_is_named(calibration):
    """With 4 steps the final stage is the last step alone: no strength changes the image
    by 2/255; the largest rung is kept and the note says so."""
    for kind in ("spatial", "global"):
        assert calibration.strengths[kind]["final"] == LADDER[-1]
        assert max(calibration.tried[kind]["final"].values()) < calibration.target
    assert calibration.notes == [
        f"{kind} edits in the final stage change the image by less than 0.00784 even at "
        "strength 65536"
        for kind in ("spatial", "global")
    ]


def test_strengths_are_saved_beside_the_saes_and_read_back(calibration, tmp_path):
    calibration.save(tmp_path)
    assert load_strengths(tmp_path) == calibration.strengths
    assert load_strengths(tmp_path / "elsewhere") is None
    (tmp_path / STRENGTHS_FILE).write_text(json.dumps({"early": 1}))
    with pytest.raises(ValueError, match="is not a strengths file"):
        load_strengths(tmp_path)


def test_the_page_and_the_loaded_preset_read_a_damaged_file_alike(tmp_path):
    """Before its preset loads, the page proposes a strength from the same reader the model
    cache uses: a damaged file gives the paper's strengths and a note, never an error."""
    (tmp_path / STRENGTHS_FILE).write_text("{not json")
    strengths, note = read_strengths(tmp_path)
    assert strengths is None and note.startswith("The paper's steering strengths are proposed")
    preset = get_preset("tiny", sae_source=str(tmp_path))
    assert default_strength(preset, "spatial", "early") == 4000.0
    assert default_strength(preset, "global", "custom", (0.0, 1.0)) is None
