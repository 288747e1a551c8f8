"""The steer tab's page: what it refuses before any model runs, and its list of concepts."""

import gradio as gr
import pytest

from page.steer import on_concept_list, on_steer


def test_an_empty_word_is_refused_rather_than_steering_concept_0():
    settings = dict(preset="tiny", prompt="a red circle", seed=0, block="b", branch="cond")
    concept = dict(concepts=[], cid=0, cid_t=1.0)
    edit = dict(kind="spatial", stage="early", t_min=0.6, t_max=1, strength=None)
    edit |= dict(sae_choice="stage", region_by="quadrant", quadrant="top_left", canvas=None)
    with pytest.raises(gr.Error) as refused:
        on_steer(**settings, concept_by="word", word="  ", **concept, **edit)
    assert refused.value.message == "Type the word to steer with, or choose the concept by CID."


def test_the_concept_list_counts_its_concepts():
    found = [
        {"label": f"t={t} cond: CID {cid} (star x1)", "value": f"cond:{t}:{cid}"}
        for t in (1.0, 0.5)
        for cid in range(70)
    ]
    listed = on_concept_list(found)
    assert listed.label.startswith("the word's 140 concepts in 2 SAEs")
    assert len(listed.choices) == len(listed.value) == 140
