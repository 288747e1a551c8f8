"""The page: the preset and its status, then one tab per view."""

import gradio as gr
from gradio.events import Dependency

from core.diffusion.presets import PRESETS
from core.views.model_cache import ModelCache
from page import serving
from page.dictionaries import on_dictionary_plan
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
        panel = emergence.dictionaries

        def follow(event: Dependency, prefix: str) -> None:
            """After `event`, the controls and the dictionary panel follow the preset."""
            outputs = [*branches.values(), steer.sae_choice]
            event.then(on_controls, inputs, outputs, api_name=f"{prefix}controls", **PAGE).then(
                on_dictionary_plan,
                preset_box,
                [panel.panel, panel.about],
                api_name=f"{prefix}dictionary_plan",
                **PAGE,
            )

        loaded = demo.load(on_status, preset_box, status, api_name="status", **LIGHT)
        follow(loaded, "")
        ticks = gr.Timer(1.0)  # while the preset loads in the background
        ticked = ticks.tick(
            on_status_tick, preset_box, [status, ticks], api_name="status_tick", **PAGE
        )
        follow(ticked, "tick_")
        opened_with = [emergence.block, steer.block, inspect.block, emergence.steps]
        prompts = [emergence.prompt, steer.prompt, inspect.prompt]
        selected = preset_box.change(
            on_select_preset,
            preset_box,
            [status, *opened_with, steer.word, inspect.cid, *prompts, emergence.examples],
            api_name="select_preset",
            **PAGE,
        )
        follow(selected, "preset_")
        built = panel.built.then(
            on_status, preset_box, status, api_name="status_after_build", **PAGE
        )
        follow(built, "build_")
    return demo
