"""The page: the preset and its status, then one tab per view."""

import gradio as gr

from core.diffusion.presets import PRESETS
from core.views.model_cache import ModelCache
from page import serving
from page.emergence import emergence_tab
from page.inspect import inspect_tab
from page.refusals import Page
from page.revelio import revelio_tab
from page.serving import LIGHT, PAGE, inputs_of
from page.status import on_controls, on_select_preset, on_status, on_status_tick
from page.steer import steer_tab
from page.texts import DEEP_LINK, INTRO


def build_demo(cache: ModelCache, preset: str) -> Page:
    """The page, opening on `preset`, its handlers serving the models of `cache`."""
    serving.CACHE = cache
    opening = PRESETS[preset]
    with Page(title="Concept emergence and steering") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            preset_box = gr.Dropdown(list(PRESETS), value=preset, label="preset", scale=1)
            status = gr.Markdown(label="status", elem_id="status")
            gr.DeepLinkButton(DEEP_LINK, "Link copied", size="sm", scale=0, min_width=200)
        with gr.Tab("emergence"):
            emergence = emergence_tab(preset_box, status, opening)
        with gr.Tab("steer"):
            steer = steer_tab(preset_box, opening)
        with gr.Tab("inspect"):
            inspect = inspect_tab(preset_box, opening)
        with gr.Tab("revelio"):
            revelio_tab()
        branches = {
            "emergence_branch": emergence.branch,
            "steer_branch": steer.branch,
            "steer_by": steer.by,
            "inspect_branch": inspect.branch,
        }
        inputs = inputs_of(on_controls, preset=preset_box, **branches)
        follow = (on_controls, inputs, [*branches.values(), steer.sae_choice])
        demo.load(on_status, preset_box, status, api_name="status", **LIGHT).then(
            *follow, api_name="controls", **PAGE
        )
        ticks = gr.Timer(1.0)  # while the preset loads in the background
        ticks.tick(
            on_status_tick, preset_box, [status, ticks], api_name="status_tick", **PAGE
        ).then(*follow, api_name="tick_controls", **PAGE)
        opened_with = [emergence.block, steer.block, inspect.block, emergence.steps]
        preset_box.change(
            on_select_preset,
            preset_box,
            [status, *opened_with, steer.word, inspect.cid],
            api_name="select_preset",
            **PAGE,
        ).then(*follow, api_name="preset_controls", **PAGE)
    return demo
