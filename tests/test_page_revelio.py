"""The revelio tab's page: its dropdowns follow the folders, its events stay out of the
model slot."""

from core.views.model_cache import ModelCache
from page.assembly import build_demo
from page.revelio import on_revelio_choices

CACHE, SAES = (f"assets/revelio-demo/{name}" for name in ("cache", "ksaes"))


def test_load_offers_the_layers_and_timesteps_found_on_the_page():
    k_layer, k_time, p_layer, p_time = on_revelio_choices(CACHE, SAES)  # page-only event
    assert k_layer.value == p_layer.value == "up_blocks.1"
    assert ("up_ft2 (up_blocks.2)", "up_blocks.2") in k_layer.choices
    assert ("up_ft2 (up_blocks.2)", "up_blocks.2") not in p_layer.choices
    assert k_time.value == p_time.value == 25


def test_the_revelio_events_are_named_and_stay_out_of_the_model_slot():
    demo = build_demo(ModelCache(), "tiny")
    events = {fn.api_name: fn for fn in demo.fns.values()}
    for name in ("revelio_load", "revelio_inspect", "revelio_pca"):
        assert events[name].concurrency_id != "model" and events[name].concurrency_limit is None
