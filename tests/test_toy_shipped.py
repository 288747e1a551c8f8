"""The shipped toy model: it draws what it is asked, and a fixed part of its check, recorded
when it was shipped, comes out the same here. The paper's claims are findings of the check
(docs/toy.md), not asserted."""

import pytest

from core.diffusion.presets import TOY_ASSETS
from core.toy.check import caption_rows, caption_summary, heldout_scenes
from core.toy.reproduce import SUBSET_FILE, differences, recorded, subset_rows
from core.views.model_cache import ModelCache

HELD_OUT_CAPTIONS = 100


@pytest.fixture(scope="module")
def shipped(one_thread):
    rows, settings = recorded(TOY_ASSETS / "check" / SUBSET_FILE)
    with ModelCache().using("toy") as loaded:
        yield loaded, rows, settings


def test_the_shipped_model_draws_the_named_colours_and_objects(shipped):
    """On 100 held-out captions: 85% of the named colours, 80% of the named objects (colour
    and shape) in one-object scenes and 50% in two-object scenes."""
    loaded, _, settings = shipped
    scenes = heldout_scenes(HELD_OUT_CAPTIONS, settings)
    summary = caption_summary(caption_rows(loaded.pipe, scenes, settings))
    by_count = summary["object_rate_by_count"]
    assert summary["colour_rate"] >= 0.85
    assert by_count[1] >= 0.80
    assert by_count[2] >= 0.50


def test_a_fixed_part_of_the_check_reproduces_what_was_recorded_at_ship_time(shipped):
    loaded, rows, settings = shipped
    found = subset_rows(loaded.pipe, loaded.bank, loaded.dictionaries, loaded.strengths, settings)
    assert differences(rows, found) == []
