"""Steering strengths calibrated on a model's own activations."""

import json
from contextlib import nullcontext

import pytest

from core.diffusion.presets import get_preset
from core.diffusion.sampling import generate_image
from core.emergence.evaluate_edits import object_cids
from core.emergence.metrics import pixel_difference
from core.emergence.strengths import LADDER, CalibrationEdits, calibrate
from core.steer.intervene import Intervention, intervene
from core.steer.regions import quadrant_mask
from core.steer.strength import STRENGTHS_FILE, load_strengths, read_strengths
from core.views.model_cache import ModelCache
from core.views.steer import default_strength

UP = "up_blocks.1.attentions.0"


EDITS = CalibrationEdits(
    objects=["star"],
    template="a red {} on a gray plain background",
    concepts=["checkered"],
    prompts=["a blue star"],
    quadrants=("top_left",),
)


@pytest.fixture(scope="module")
def calibration(one_thread):
    with ModelCache().using("tiny") as loaded:
        return calibrate(
            loaded.pipe,
            loaded.bank,
            loaded.dictionaries,
            EDITS,
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


def test_a_stage_the_smallest_strength_already_moves_is_named(one_thread):
    """With a target of 0 every strength reaches it: the ladder's smallest is kept, and the
    note says a weaker one may be needed."""
    with ModelCache().using("tiny") as loaded:
        pipe, bank, dictionaries = loaded.pipe, loaded.bank, loaded.dictionaries
        found = calibrate(
            pipe, bank, dictionaries, EDITS, block=UP, stages=("early",), target=0.0, steps=4
        )
    assert found.strengths == {kind: {"early": LADDER[0]} for kind in ("spatial", "global")}
    assert [note.split(" edits")[0] for note in found.notes] == ["spatial", "global"]
    for note in found.notes:
        assert note.endswith(
            "already at strength 0.0625, the ladder's smallest: a weaker one may be the right one"
        )


def test_a_spatial_edit_is_measured_from_the_removal_it_tends_to(calibration, one_thread):
    """At strength 0+ a spatial edit still sets the concept to 0 everywhere: its change is
    measured from that ablation, whose own change is kept; a global edit tends to no edit."""
    assert set(calibration.at_zero) == {"spatial"}
    assert set(calibration.at_zero["spatial"]) == {"early", "final"}
    chosen = calibration.strengths["spatial"]["early"]
    with ModelCache().using("tiny") as loaded:
        cids = object_cids(loaded.dictionaries, ["star"], UP, "cond")[0]["star"]
        prompt = EDITS.template.format("star")
        region = quadrant_mask("top_left", (32, 32))
        images = {}
        for kind, strength in (("ablate", 1.0), ("spatial", chosen), (None, 0.0)):
            edit = kind and Intervention(kind, cids, strength, "early", ("cond",), region)
            with intervene(loaded.pipe, loaded.bank, UP, edit, (32, 32)) if edit else nullcontext():
                images[kind] = generate_image(loaded.pipe, prompt, 0, 4, 7.5, 32)
    assert pixel_difference(images["ablate"], images["spatial"]) == pytest.approx(
        calibration.tried["spatial"]["early"][f"{chosen:g}"]
    )
    assert pixel_difference(images[None], images["ablate"]) == pytest.approx(
        calibration.at_zero["spatial"]["early"]
    )


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
