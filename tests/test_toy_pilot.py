"""Pilots of the toy model's recipe: a changed recipe trained for a budget, then scored."""

import json
from dataclasses import replace

import numpy as np
import pytest

from core.shapes.world import dataset
from core.toy.pilot import PilotConfig, main, recipe
from core.toy.training import TRAIN_SCALES, held_out


def test_changes_apply_to_the_recipe_and_its_model():
    config = PilotConfig(
        out="unused",
        scale="smoke",
        minutes=2,
        change=("max_objects=2", "radius_range=(0.18, 0.3)", "model.text_layers=3"),
    )
    training = recipe(config)
    assert (training.max_objects, training.radius_range) == (2, (0.18, 0.3))
    assert training.model.text_layers == 3
    assert training.model.unet_widths == TRAIN_SCALES["smoke"].model.unet_widths
    assert training.denoiser_budget_s == 120
    with pytest.raises(ValueError, match="cannot apply --change 'colours=3': give name=value"):
        recipe(PilotConfig(out="unused", change=("colours=3",)))


def test_a_pilot_trains_scores_held_out_captions_by_object_count_and_writes_a_row(
    tmp_path, capsys, one_thread
):
    out = tmp_path / "pilot"
    argv = ["--out", str(out), "--scale", "smoke", "--minutes", "0.05", "--captions", "4"]
    argv += ["--steps", "2", "--guidance", "1", "4", "--raw", "--change", "max_objects=2"]
    assert main(argv) == 0
    result = json.loads((out / "pilot.json").read_text())
    assert list(result["scores"]) == [
        "EMA, guidance 1",
        "EMA, guidance 4",
        "raw, guidance 1",
        "raw, guidance 4",
    ]
    score = result["scores"]["EMA, guidance 1"]
    assert score["images"] == 4 and set(score["images_by_count"]) <= {"1", "2"}
    assert sum(score["images_by_count"].values()) == 4
    assert result["samples_seen"] == result["denoiser_steps"] * 16 > 0
    assert result["samples_per_s"] > 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 4 and printed[0].startswith("| pilot | max_objects=2 | ")


def test_a_tenth_of_captions_is_held_out_of_training_one_object_ones_included():
    scenes = list(dataset(3000, seed=5, size=32, max_objects=2))
    share = np.mean([held_out(scene.caption) for scene in scenes])
    assert 0.08 < share < 0.12
    one_object = {s.caption for s in scenes if len(s.objects) == 1 and held_out(s.caption)}
    assert len(one_object) > 20
    training = replace(TRAIN_SCALES["smoke"], scenes=200, max_objects=2)
    captions = [scene.caption for scene in training.training_scenes()]  # an iterator
    assert len(captions) == 200 and not any(held_out(c) for c in captions)
