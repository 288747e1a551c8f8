"""Watch concepts emerge inside a text-to-image diffusion model, and steer with them.

    python app.py                       # the offline default preset, on 127.0.0.1:7860
    python app.py --preset sd14 --sd14-saes user/sd14-saes

The user interface only: every computation is in `core` (emergence, steer_compare, revelio_view,
inspection), and errors a person can act on become `gr.Error` messages.
"""

import argparse
import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from core.diffusion.presets import PRESETS, check_preset, default_preset_name
from core.emergence.steer import DEFAULT_STRENGTH, QUADRANTS
from core.runtime import USER_ERRORS
from core.views import inspection, revelio
from core.views.emergence import EmergenceResult, iou_figure, run_emergence, step_panels
from core.views.inputs import MAX_STEPS
from core.views.model_cache import SD14_SAES_ENV, ModelCache
from core.views.render import for_display
from core.views.steer import BRANCH_CHOICES, STAGE_CHOICES, SteerRequest, run_steer, strength_of

try:  # ZeroGPU on Hugging Face Spaces: a GPU is attached while a decorated call runs
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:

    def gpu(fn: Callable) -> Callable:
        return fn


PRESET_ENV = "APP_PRESET"
MODEL = {"concurrency_id": "model", "concurrency_limit": 1}
"""Every event that runs a model shares one queue slot: one generation at a time."""
LIGHT = {"concurrency_limit": None}
PROGRESS = gr.Progress()
"""The handlers' progress argument; gradio reports through it per request."""
CACHE = ModelCache()
"""The models every handler uses; `build_demo` sets it. A module-level object (not a handler
argument), so that ZeroGPU's worker process, forked from this one, has it too."""

ABOUT = {
    "tiny": "random weights in SD v1.4's block layout, 32 px: images are noise and concepts "
    "arbitrary; it runs offline in seconds and exercises every view",
    "toy": "the embedded shapes-world model (coloured shapes on patterned backgrounds), offline",
    "sd14": "Stable Diffusion v1.4, 512 px, DDIM 50 (paper 1); SAEs from the repo named by "
    f"--sd14-saes or {SD14_SAES_ENV}; wants a GPU",
    "sdxl-turbo": "SDXL-Turbo, 512 px, 1-4 steps, with the published SDLens SAEs "
    "(surokpro2/sdxl-saes); no concept dictionaries, so concepts are chosen by CID",
}
DEFAULTS = {
    "tiny": {"word": "star", "steer_block": "up_blocks.1.attentions.0"},
    "toy": {"word": "circle", "steer_block": "mid_block.attentions.0"},
    "sd14": {"word": "cat", "steer_block": "mid_block.attentions.0"},
    "sdxl-turbo": {"word": "", "steer_block": "down_blocks.2.attentions.1"},
}
EXAMPLE_PROMPTS = [
    ["a red circle and a blue star"],
    ["a photo of a red car in the sky"],
    ["a painting of a cat on a table"],
]


def sentence(error: BaseException) -> str:
    """An exception's message as one sentence: capitalised, ending with a full stop."""
    text = str(error.args[0]) if error.args else type(error).__name__
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def user_errors(fn: Callable) -> Callable:
    """Turn the core's errors into `gr.Error`s; the server keeps serving either way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as error:
            raise gr.Error(sentence(error)) from error
        except RuntimeError as error:
            message = f"The request failed ({sentence(error)}) Try fewer steps or another preset."
            raise gr.Error(message) from error

    return wrapper


def progress_hooks(progress: gr.Progress) -> dict:
    """The core's callbacks, reported to the page: loading, then one tick per step."""
    return {
        "on_load": lambda name: progress(0, desc=f"loading the {name} preset"),
        "on_step": lambda done, total: progress((done, total), desc="denoising", unit="steps"),
    }


def preferred_block(preset: str, tab: str) -> str:
    blocks = PRESETS[preset].hook_points
    if tab == "steer":
        return DEFAULTS.get(preset, {}).get("steer_block", blocks[0])
    return "up_blocks.1.attentions.0" if "up_blocks.1.attentions.0" in blocks else blocks[-1]


def canvas_mask(value: dict | None) -> np.ndarray | None:
    """The drawn region of an image-editor value: where any layer is painted."""
    if not value:
        return None
    layers = [np.asarray(layer) for layer in value.get("layers") or [] if layer is not None]
    painted = [layer[..., 3] > 0 for layer in layers if layer.ndim == 3 and layer.shape[2] == 4]
    if painted:
        return np.logical_or.reduce(painted)
    background, composite = value.get("background"), value.get("composite")
    if background is None or composite is None:
        return None
    difference = np.abs(np.asarray(composite, float) - np.asarray(background, float))
    return difference[..., :3].sum(axis=-1) > 0


def shown_path(source: str) -> str:
    """A folder of this repository relative to it (a Hub id or other path as is)."""
    path = Path(source)
    root = Path(__file__).resolve().parent
    return (
        str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else source
    )


def blank_canvas(side: int = 256) -> dict:
    white = np.full((side, side, 3), 255, dtype=np.uint8)
    return {"background": white, "layers": [], "composite": white}


@user_errors
def on_status(preset: str) -> str:
    check_preset(preset)
    loaded = CACHE.loaded_now(preset)
    state = "loaded" if loaded else "loads on first use"
    lines = [f"**Preset `{preset}`** ({state}): {ABOUT.get(preset, PRESETS[preset].model)}."]
    if loaded:
        lines.append(
            f"{len(loaded.bank)} SAEs and {len(loaded.dictionaries)} concept dictionaries "
            f"from `{shown_path(loaded.preset.sae_source)}`."
        )
        lines += [f"Note: {note}" for note in loaded.notes]
    return "\n\n".join(lines)


def on_select_preset(preset: str) -> tuple:
    text = on_status(preset)
    blocks = list(PRESETS[preset].hook_points)
    steps = PRESETS[preset].steps

    def dropdown(tab: str) -> gr.Dropdown:
        return gr.Dropdown(choices=blocks, value=preferred_block(preset, tab))

    word = DEFAULTS.get(preset, {}).get("word", "")
    return (
        text,
        dropdown("emergence"),
        dropdown("steer"),
        dropdown("inspect"),
        gr.Number(value=steps),
        gr.Textbox(value=word),
    )


@gpu
@user_errors
def on_emergence(preset, prompt, seed, steps, block, branch, words, progress=PROGRESS):
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        result = run_emergence(loaded, prompt, seed, steps, block, branch, words, hooks["on_step"])
    last = len(result.steps) - 1
    return (
        for_display(result.image),
        iou_figure(result),
        gr.Slider(maximum=last, value=last),
        step_panels(result, last),
        emergence_summary(preset, result),
        result,
    )


@user_errors
def on_emergence_step(result: EmergenceResult | None, index: float) -> list:
    if result is None:
        raise gr.Error("Run the emergence view first; the slider then moves through its steps.")
    return step_panels(result, int(index))


@user_errors
def on_default_strength(kind: str, stage: str, t_min: float, t_max: float) -> tuple:
    """The paper's strength for the type and stage; the t range shows for "custom"."""
    request = SteerRequest("", 0, "", kind=kind, stage=stage, t_range=(t_min, t_max))
    return gr.Number(value=strength_of(request)), gr.Row(visible=stage == "custom")


@gpu
@user_errors
def on_steer(
    preset,
    prompt,
    seed,
    block,
    branch,
    concept_by,
    word,
    cid,
    cid_t,
    kind,
    stage,
    t_min,
    t_max,
    strength,
    region_by,
    quadrant,
    canvas,
    progress=PROGRESS,
):
    mask = None
    if kind == "spatial" and region_by == "drawn":
        mask = canvas_mask(canvas)
        if mask is None:
            raise gr.Error("Draw the region on the canvas first, or choose a quadrant.")
    request = SteerRequest(
        prompt,
        seed,
        block,
        kind,
        stage,
        (t_min, t_max),
        strength,
        branch,
        word if concept_by == "word" else "",
        cid,
        cid_t,
        quadrant,
        mask,
    )
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        result = run_steer(loaded, request, hooks["on_step"])
    pair = (for_display(result.before), for_display(result.after))
    return pair, result.difference, result.metrics


@gpu
@user_errors
def on_search_concepts(preset, block, t, branch, word, runs, progress=PROGRESS):
    """Concepts for a word; the best becomes the CID and `runs` + 1 starts inspecting."""
    with CACHE.using(preset, progress_hooks(progress)["on_load"]) as loaded:
        found, how = inspection.search(loaded, block, t, branch, word)
    choices = [(f"CID {cid}: {labels}", cid) for cid, labels in found]
    best = found[0][0]
    return gr.Dropdown(choices=choices, value=best), best, f"Found: {how}.", runs + 1


@gpu
@user_errors
def on_inspect_concept(preset, block, t, branch, cid, progress=PROGRESS):
    with CACHE.using(preset, progress_hooks(progress)["on_load"]) as loaded:
        card = inspection.concept_card(loaded, block, t, branch, cid)
    notes = "; ".join(card.notes) or f"CID {card.cid} of the SAE at t={card.key.t}"
    return card.entry, card.stats, card.nearest, notes


@gpu
@user_errors
def on_top_examples(preset, block, t, branch, cid, progress=PROGRESS):
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        panels, note = inspection.top_examples(
            loaded, block, t, branch, cid, on_step=hooks["on_step"]
        )
    return panels, note


@gpu
@user_errors
def on_activation_map(preset, block, t, branch, cid, prompt, seed, progress=PROGRESS):
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        return inspection.activation_on(
            loaded, block, t, branch, cid, prompt, seed, hooks["on_step"]
        )


@gpu
@user_errors
def on_feature_icon(preset, block, t, branch, cid, strength, seed, progress=PROGRESS):
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        icon = inspection.feature_icon(
            loaded, block, t, branch, cid, strength, seed, hooks["on_step"]
        )
    return for_display(icon)


def emergence_summary(preset: str, result: EmergenceResult) -> str:
    lines = [
        f"**{preset}**, {result.block} ({result.branch}), seed {result.seed}, "
        f"{len(result.steps)} steps.",
        *[f"- {note}" for note in result.notes],
        "- Panels per word: the predicted mask on the final image, the similarity of each "
        "position's top labelled concept with the word (grey: none fires), and the word's "
        "cross-attention (DAAM-style baseline).",
    ]
    return "\n".join(lines)


REVELIO_ABOUT = (
    "What each U-Net layer and timestep knows about labelled images (Revelio): a feature "
    "cache (`python -m core.revelio.features`), its k-SAEs (`python -m core.revelio.ksae`) "
    "and, for pictures, the image folder the cache was extracted from. **Load** lists their "
    "layers and timesteps "
    "and measures every k-SAE's label purity against chance. The default demo is 120 "
    "shapes-world images through the `tiny` preset, whose weights are random: it shows the "
    "views working, not findings (its purity is at chance)."
)


def revelio_choices(found: revelio.Contents | None) -> list[tuple[list, object]]:
    """(choices, value) of the layer and timestep dropdowns: first of the pairs with a k-SAE,
    then of those with feature maps; up_ft1 when there, as the paper finds it best."""
    dropdowns: list[tuple[list, object]] = []
    for pairs in (found.ksae_pairs, found.map_pairs) if found else ([], []):
        layers = list(dict(pairs))
        layer = "up_blocks.1" if "up_blocks.1" in layers else next(iter(layers), None)
        times = sorted({t for _, t in pairs})
        dropdowns.append(([(revelio.layer_label(name), name) for name in layers], layer))
        dropdowns.append((times, times[0] if times else None))
    return dropdowns


def revelio_demo_contents() -> revelio.Contents | None:
    try:
        return revelio.contents(revelio.DEMO_CACHE, revelio.DEMO_SAES)
    except USER_ERRORS:
        return None


@user_errors
def on_revelio_load(cache: str, saes: str) -> tuple:
    found = revelio.contents(cache, saes)
    meta = found.meta
    note = (
        f"{len(meta)} images of {len(meta.classes)} classes ({', '.join(meta.classes)}), "
        f"features of `{meta.model}`; k-SAEs for {len(found.ksae_pairs)} (layer, timestep) "
        f"pairs, feature maps for {len(found.map_pairs)}."
    )
    rows = revelio.purity_table(cache, saes) if found.saes else []
    dropdowns = [gr.Dropdown(choices=c, value=v) for c, v in revelio_choices(found)]
    return note, rows, *dropdowns


@user_errors
def on_revelio_inspect(cache, saes, images, layer, timestep, by, number) -> tuple:
    view = revelio.inspect_latent(cache, saes, images, layer, timestep, by, number)
    return view.note, view.grid, view.rows


@user_errors
def on_revelio_pca(cache, images, layer, timestep, indices) -> list:
    return revelio.pca_view(cache, images, layer, timestep, indices)


def revelio_tab() -> None:
    """The revelio tab: its components and events (model-free, so outside the model slot)."""
    gr.Markdown(REVELIO_ABOUT)
    with gr.Row():
        cache = gr.Textbox(shown_path(str(revelio.DEMO_CACHE)), label="feature cache")
        saes = gr.Textbox(shown_path(str(revelio.DEMO_SAES)), label="k-SAE folder")
        images = gr.Textbox(shown_path(str(revelio.DEMO_IMAGES)), label="image folder (optional)")
    load = gr.Button("load", variant="primary", elem_id="revelio-load")
    note = gr.Markdown(elem_id="revelio-note")
    table = gr.Dataframe(
        headers=revelio.PURITY_HEADERS,
        label="label purity of the most activating "
        "latents (top 10 images each), and the same measures on random images",
        elem_id="revelio-table",
    )
    choices = revelio_choices(revelio_demo_contents())

    def dropdown(index: int, label: str) -> gr.Dropdown:
        options, value = choices[index]
        return gr.Dropdown(options, value=value, label=label, allow_custom_value=True)

    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### k-SAE latent")
            k_layer, k_time = dropdown(0, "layer"), dropdown(1, "timestep")
            by = gr.Radio(["purest", "id"], value="purest", label="latent by")
            number = gr.Number(0, precision=0, label="rank among the purest (0 = purest), or id")
            inspect = gr.Button("inspect", variant="primary", elem_id="revelio-inspect")
        with gr.Column(scale=2):
            latent_note = gr.Markdown(elem_id="revelio-latent-note")
            grid = gr.Image(label="top-activating images", format="png", elem_id="revelio-grid")
            top = gr.Dataframe(headers=revelio.TOP_IMAGE_HEADERS, label="its top images")
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### PCA maps of features")
            p_layer, p_time = dropdown(2, "layer (with maps)"), dropdown(3, "timestep")
            indices = gr.Textbox(
                "", label='images (indices like "0-7, 12"; empty: the first of each class)'
            )
            pca = gr.Button("show PCA maps", variant="primary", elem_id="revelio-pca-run")
        with gr.Column(scale=2):
            maps = gr.Gallery(
                label="image | its PCA map (one PCA over all shown: colours compare)",
                columns=4,
                height=640,
                format="png",
                elem_id="revelio-pca",
            )
    load.click(
        on_revelio_load,
        [cache, saes],
        [note, table, k_layer, k_time, p_layer, p_time],
        api_name="revelio_load",
        **LIGHT,
    )
    inspect.click(
        on_revelio_inspect,
        [cache, saes, images, k_layer, k_time, by, number],
        [latent_note, grid, top],
        api_name="revelio_inspect",
        **LIGHT,
    )
    pca.click(
        on_revelio_pca,
        [cache, images, p_layer, p_time, indices],
        maps,
        api_name="revelio_pca",
        **LIGHT,
    )


def build_demo(cache: ModelCache, preset: str) -> gr.Blocks:
    global CACHE
    CACHE = cache
    blocks = list(PRESETS[preset].hook_points)
    with gr.Blocks(title="Concept emergence and steering") as demo:
        gr.Markdown(
            "# Concepts inside a diffusion model\n"
            "Sparse autoencoders (SAEs) on the residual updates of the U-Net's transformer "
            "blocks turn every position of every denoising step into a few concepts. "
            "**emergence**: where each word will appear, predicted from the first steps. "
            "**steer**: move or add a concept during one stage of generation. "
            "**inspect**: what one concept is. "
            "**revelio**: what k-SAEs of pooled image features and PCA maps show per layer."
        )
        with gr.Row():
            preset_box = gr.Dropdown(list(PRESETS), value=preset, label="preset", scale=1)
            status = gr.Markdown(elem_id="status")
        with gr.Tab("emergence"):
            with gr.Row():
                with gr.Column(scale=1):
                    e_prompt = gr.Textbox("a red circle and a blue star", label="prompt")
                    with gr.Row():
                        e_seed = gr.Number(0, label="seed")
                        e_steps = gr.Number(
                            PRESETS[preset].steps, label=f"steps (1 to {MAX_STEPS})"
                        )
                    e_block = gr.Dropdown(
                        blocks, value=preferred_block(preset, "emergence"), label="block"
                    )
                    e_branch = gr.Radio(["cond", "uncond"], value="cond", label="branch")
                    e_words = gr.Textbox(
                        "", label="target words (comma-separated; empty: the prompt's nouns)"
                    )
                    e_run = gr.Button(
                        "generate and predict", variant="primary", elem_id="emergence-run"
                    )
                    gr.Examples(EXAMPLE_PROMPTS, [e_prompt])
                with gr.Column(scale=2):
                    with gr.Row():
                        e_image = gr.Image(
                            label="final image", height=256, format="png", elem_id="emergence-image"
                        )
                        e_plot = gr.Plot(
                            label="IoU vs t", show_label=False, elem_id="emergence-plot"
                        )
                    e_step = gr.Slider(
                        0,
                        1,
                        0,
                        step=1,
                        label="step (0 = first, noisiest)",
                        elem_id="emergence-step",
                    )
                    e_gallery = gr.Gallery(
                        label="at this step",
                        columns=3,
                        height="auto",
                        format="png",
                        elem_id="emergence-gallery",
                    )
                    e_summary = gr.Markdown()
            e_state = gr.State(None)
        with gr.Tab("steer"), gr.Row():
            with gr.Column(scale=1):
                s_prompt = gr.Textbox("a red circle and a blue star", label="prompt")
                s_seed = gr.Number(0, label="seed")
                s_block = gr.Dropdown(blocks, value=preferred_block(preset, "steer"), label="block")
                s_branch = gr.Radio(list(BRANCH_CHOICES), value="cond", label="branch")
                s_by = gr.Radio(["word", "CID"], value="word", label="concept by")
                with gr.Row():
                    s_word = gr.Textbox(DEFAULTS.get(preset, {}).get("word", ""), label="word")
                    s_cid = gr.Number(0, label="CID", precision=0)
                s_cid_t = gr.Slider(0, 1, 1.0, step=0.05, label="the CID's SAE: the one nearest t")
                s_kind = gr.Radio(["spatial", "global", "ablate"], value="spatial", label="type")
                s_stage = gr.Radio(list(STAGE_CHOICES), value="early", label="stage")
                with gr.Row(visible=False) as s_range:
                    s_t_min = gr.Slider(0, 1, 0.6, step=0.05, label="t from")
                    s_t_max = gr.Slider(0, 1, 1.0, step=0.05, label="t to")
                s_strength = gr.Number(
                    DEFAULT_STRENGTH["spatial"]["early"], label="strength (paper default)"
                )
                s_region = gr.Radio(["quadrant", "drawn"], value="quadrant", label="region")
                s_quadrant = gr.Radio(list(QUADRANTS), value="top_left", label="quadrant")
                s_canvas = gr.ImageEditor(
                    blank_canvas(),
                    type="numpy",
                    label="draw the region (with 'drawn')",
                    sources=(),
                    transforms=(),
                    layers=False,
                    height=300,
                    elem_id="steer-canvas",
                    brush=gr.Brush(colors=["#e02020"], default_size=28, color_mode="fixed"),
                )
                s_run = gr.Button(
                    "generate before and after", variant="primary", elem_id="steer-run"
                )
            with gr.Column(scale=1):
                s_pair = gr.ImageSlider(
                    label="before | after (same seed)", format="png", elem_id="steer-pair"
                )
                s_diff = gr.Image(label="difference", height=256, format="png")
                s_metrics = gr.JSON(label="what changed", elem_id="steer-metrics")
        with gr.Tab("inspect"):
            with gr.Row():
                with gr.Column(scale=1):
                    i_block = gr.Dropdown(
                        blocks, value=preferred_block(preset, "inspect"), label="block"
                    )
                    i_t = gr.Slider(0, 1, 0.5, step=0.05, label="t (the nearest SAE is used)")
                    i_branch = gr.Radio(["cond", "uncond"], value="cond", label="branch")
                    i_cid = gr.Number(0, label="CID", precision=0)
                    with gr.Row():
                        i_word = gr.Textbox("", label="search by word")
                        i_search = gr.Button("search", elem_id="inspect-search")
                    i_found = gr.Dropdown([], label="concepts found", interactive=True)
                    i_prompt = gr.Textbox("a red circle and a blue star", label="new generation")
                    with gr.Row():
                        i_seed = gr.Number(0, label="seed")
                        i_icon_strength = gr.Number(10.0, label="icon strength")
                    i_run = gr.Button("inspect", variant="primary", elem_id="inspect-run")
                with gr.Column(scale=2):
                    i_note = gr.Markdown()
                    with gr.Row():
                        i_entry = gr.Dataframe(
                            headers=["label", "count", "mean IoU"], label="dictionary entry"
                        )
                        i_stats = gr.JSON(label="firing statistics")
                    i_nearest = gr.Dataframe(
                        headers=["by", "CID", "cosine", "labels"], label="nearest concepts"
                    )
                    i_examples = gr.Gallery(
                        label="top-activating examples",
                        columns=6,
                        height=220,
                        elem_id="inspect-examples",
                    )
                    i_examples_note = gr.Markdown()
                    with gr.Row():
                        i_overlay = gr.Image(label="activation on the new generation", height=256)
                        i_heat = gr.Image(label="activation map", height=256)
                        i_icon = gr.Image(label="feature icon", height=256, elem_id="inspect-icon")
                    i_caption = gr.Markdown()
            i_runs = gr.State(0)
        with gr.Tab("revelio"):
            revelio_tab()

        demo.load(on_status, preset_box, status, api_name="status", **LIGHT)
        preset_box.change(
            on_select_preset,
            preset_box,
            [status, e_block, s_block, i_block, e_steps, s_word],
            api_name="select_preset",
            **LIGHT,
        )
        e_run.click(
            on_emergence,
            [preset_box, e_prompt, e_seed, e_steps, e_block, e_branch, e_words],
            [e_image, e_plot, e_step, e_gallery, e_summary, e_state],
            api_name="emergence",
            **MODEL,
        ).then(on_status, preset_box, status, api_name="status_after_emergence", **LIGHT)
        e_step.release(
            on_emergence_step, [e_state, e_step], e_gallery, api_name="emergence_step", **LIGHT
        )
        gr.on(
            [s_kind.change, s_stage.change, s_t_min.release, s_t_max.release],
            on_default_strength,
            [s_kind, s_stage, s_t_min, s_t_max],
            [s_strength, s_range],
            api_name="default_strength",
            **LIGHT,
        )
        s_run.click(
            on_steer,
            [
                preset_box,
                s_prompt,
                s_seed,
                s_block,
                s_branch,
                s_by,
                s_word,
                s_cid,
                s_cid_t,
                s_kind,
                s_stage,
                s_t_min,
                s_t_max,
                s_strength,
                s_region,
                s_quadrant,
                s_canvas,
            ],
            [s_pair, s_diff, s_metrics],
            api_name="steer",
            **MODEL,
        )
        key = [preset_box, i_block, i_t, i_branch, i_cid]
        i_run.click(lambda runs: runs + 1, i_runs, i_runs, api_name="request_inspect", **LIGHT)
        i_search.click(
            on_search_concepts,
            [preset_box, i_block, i_t, i_branch, i_word, i_runs],
            [i_found, i_cid, i_note, i_runs],
            api_name="search_concepts",
            **MODEL,
        )
        i_found.input(
            lambda cid, runs: (cid, runs + 1),
            [i_found, i_runs],
            [i_cid, i_runs],
            api_name="pick_concept",
            **LIGHT,
        )
        (
            i_runs.change(
                on_inspect_concept,
                key,
                [i_entry, i_stats, i_nearest, i_note],
                api_name="inspect_concept",
                **MODEL,
            )
            .success(
                on_top_examples,
                key,
                [i_examples, i_examples_note],
                api_name="top_examples",
                **MODEL,
            )
            .success(
                on_activation_map,
                [*key, i_prompt, i_seed],
                [i_overlay, i_heat, i_caption],
                api_name="activation_map",
                **MODEL,
            )
            .success(
                on_feature_icon,
                [*key, i_icon_strength, i_seed],
                i_icon,
                api_name="feature_icon",
                **MODEL,
            )
        )
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        default=os.environ.get(PRESET_ENV) or default_preset_name(),
        choices=list(PRESETS),
        help=f"preset selected when the page opens (env {PRESET_ENV}; default: the offline one)",
    )
    p.add_argument("--sd14-saes", help=f"SAE repo or folder for sd14 (env {SD14_SAES_ENV})")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, help="port (default 7860, or GRADIO_SERVER_PORT)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (on a busy small machine, 2 threads spinning against "
        "other processes can make a generation 100 times slower than 1)",
    )
    p.add_argument("--no-preload", action="store_true", help="load the preset on first use only")
    return p.parse_args(argv)


def preload(cache: ModelCache, preset: str) -> None:
    """Load the first preset in the background, so the first request does not wait for it."""
    try:
        with cache.using(preset) as loaded:
            loaded.word_vectors()
            loaded.annotator()
    except USER_ERRORS as error:
        print(f"could not preload {preset}: {sentence(error)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = ModelCache({"sd14": args.sd14_saes}, device=args.device)
    demo = build_demo(cache, args.preset)
    if not args.no_preload:
        threading.Thread(target=preload, args=(cache, args.preset), daemon=True).start()
    demo.queue(max_size=64).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
