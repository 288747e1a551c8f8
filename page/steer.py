"""The steer tab: one seed generated without and with a concept edited in."""

from typing import NamedTuple

import gradio as gr
import numpy as np

from core.diffusion.presets import Preset, get_preset
from core.quadrants import QUADRANTS
from core.runtime import counted
from core.steer.kinds import KINDS, get_kind
from core.steer.windows import SAE_CHOICES
from core.views.render import for_display
from core.views.steer import (
    BRANCH_CHOICES,
    STAGE_CHOICES,
    SteerRequest,
    before_image,
    canvas_mask,
    concept_choices,
    default_strength,
    run_steer,
)
from page.components import block_dropdown, results_line
from page.refusals import clears, message_line, tells_refusal
from page.serving import LIGHT, MODEL, PAGE, PROGRESS, gpu, inputs_of, models, user_errors
from page.texts import STEER_RESULTS

CONCEPTS_LABEL = "edit only the ticked concepts of the word (none listed or ticked: all of them)"


@user_errors
def on_default_strength(
    preset: str, kind: str, stage: str, t_min: float, t_max: float
) -> float | None:
    """The preset's or the paper's strength for an edit's type and stage; none (empty) for a
    custom stage without a preset strength: each of its steps takes its own stage's.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        kind: "spatial", "global" or "ablate".
        stage: "early", "middle", "final" or "custom" (then `t_min` to `t_max`).
        t_min: the start of a custom stage, in [0, 1].
        t_max: the end of a custom stage, in [0, 1].

    Returns:
        the strength that `steer` takes, or None
    """
    return default_strength(get_preset(preset), kind, stage, (t_min, t_max))


def on_stage(stage: str) -> gr.Row:
    """The t range shows for a custom stage only (page only)."""
    return gr.Row(visible=stage == "custom")


def drawn_region(canvas: dict | None) -> np.ndarray:
    """The region drawn on the canvas; an error asking for one when nothing is drawn."""
    mask = canvas_mask(canvas)
    if mask is None:
        raise ValueError("Draw the region on the canvas first, or choose a quadrant.")
    return mask


@gpu(generations=2)
@user_errors
def on_steer(
    preset,
    prompt,
    seed,
    block,
    branch,
    concept_by,
    word,
    concepts,
    cid,
    cid_t,
    kind,
    stage,
    t_min,
    t_max,
    strength,
    sae_choice,
    region_by,
    quadrant,
    canvas,
    progress=PROGRESS,
):
    """Generate an image twice, without and with a concept edit during one stage.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        prompt: the text prompt.
        seed: the generation seed (the same for both images).
        block: the denoiser block (U-Net or DiT) whose SAE edits the residual updates.
        branch: "cond", "uncond" or "both" (the guidance branches edited).
        concept_by: "word" (the concepts labelled `word`) or "cid" (the concept `cid`).
        word: the concept's word when `concept_by` is "word".
        concepts: of the word's concepts, only these (values that `steer_concepts` lists);
            empty: all of them.
        cid: the concept id when `concept_by` is "cid".
        cid_t: the timestep of the SAE that `cid` belongs to.
        kind: "spatial" (move the concept into a region) or "global" (add it everywhere).
        stage: "early", "middle", "final" or "custom" (then `t_min` to `t_max`).
        t_min: the start of a custom stage, in [0, 1].
        t_max: the end of a custom stage, in [0, 1].
        strength: the edit's strength; empty: the paper's for the kind and stage (in a custom
            stage, each step's own stage's).
        sae_choice: "stage" (every step edited with its stage's SAE, as the paper; in a custom
            stage, the stage of the step's t) or "nearest" (each step with the SAE of the
            nearest t).
        region_by: "quadrant" or "drawn" (the canvas) for spatial edits.
        quadrant: "top_left", "top_right", "bottom_left" or "bottom_right".
        canvas: the drawn region (an image editor value) when `region_by` is "drawn".

    Returns:
        the images before and after
        the difference map, in grey levels on a fixed 0-255 scale
        the steps edited (with which SAE and CIDs) and skipped (why), and what changed, in words
        the edit and what changed (pixel difference, LPIPS, CLIP, centre of mass), as JSON
    """
    by_word = concept_by == "word"
    if by_word and not str(word or "").strip():
        raise ValueError("Type the word to steer with, or choose the concept by CID.")
    drawn = get_kind(kind).needs_region and region_by == "drawn"
    request = SteerRequest(
        prompt=prompt,
        seed=seed,
        block=block,
        kind=kind,
        stage=stage,
        t_range=(t_min, t_max),
        strength=strength,
        branch=branch,
        word=word if by_word else "",
        cid=cid,
        cid_t=cid_t,
        quadrant=quadrant,
        mask=drawn_region(canvas) if drawn else None,
        sae_choice=sae_choice,
        keep=tuple(concepts or ()) if by_word else (),
    )
    with models(preset, progress) as (loaded, on_step):
        result = run_steer(loaded, request, on_step)
    pair = (for_display(result.before), for_display(result.after))
    return pair, result.difference, result.summary(), result.metrics


@gpu(generations=0)
@user_errors
def on_steer_concepts(preset, block, branch, word, progress=PROGRESS):
    """The concepts labelled with a word that a steer by word edits, to narrow it to some.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the denoiser block (U-Net or DiT) whose SAEs edit.
        branch: "cond", "uncond" or "both".
        word: the concept's word.

    Returns:
        one entry per concept and SAE: its label and the value that `steer` takes in `concepts`
    """
    with models(preset, progress) as (loaded, _):
        choices = concept_choices(loaded, block, branch, word)
    return [{"label": label, "value": value} for label, value in choices]


def on_concept_list(found: list[dict]) -> gr.CheckboxGroup:
    """The word's concepts as ticked boxes, under a label that counts them (page only)."""
    choices = [(entry["label"], entry["value"]) for entry in found]
    saes = {value.rsplit(":", 1)[0] for _, value in choices}
    label = (
        f"the word's {counted(len(choices), 'concept')} in {counted(len(saes), 'SAE')}, "
        "scrolling; the ticked ones are edited (none ticked: all of them)"
    )
    return gr.CheckboxGroup(choices=choices, value=[v for _, v in choices], label=label)


def on_ticked(values: list[str]) -> list[str]:
    """The ticked concepts, as the value `steer` takes (page only: the API takes a list that
    a check box group, whose choices a page fills, would refuse)."""
    return values


def on_concepts_stale() -> gr.CheckboxGroup:
    """A changed word, block or branch empties the list of its concepts (page only)."""
    return gr.CheckboxGroup(choices=[], value=[], label=CONCEPTS_LABEL)


def canvas_value(background: np.ndarray) -> dict:
    """An image editor's value with nothing drawn on `background`."""
    return {"background": background, "layers": [], "composite": background}


def blank_canvas(side: int = 256) -> dict:
    """An image editor's value with nothing drawn on a white background."""
    return canvas_value(np.full((side, side, 3), 255, dtype=np.uint8))


@gpu(generations=1)
@user_errors
def on_canvas_image(preset, prompt, seed, progress=PROGRESS):
    """The unsteered image on the canvas, to draw the region over it (page only)."""
    with models(preset, progress) as (loaded, on_step):
        image = before_image(loaded, prompt, seed, on_step)
    return canvas_value(np.asarray(for_display(image).convert("RGB")))


class SteerControls(NamedTuple):
    """The steer tab's controls that follow the preset."""

    block: gr.Dropdown
    word: gr.Textbox
    branch: gr.Radio
    by: gr.Radio
    sae_choice: gr.Radio
    prompt: gr.Textbox


def steer_tab(preset_box: gr.Dropdown, preset: Preset) -> SteerControls:
    """Generate without and with a concept edited in, from one seed."""
    message = message_line("steer-message", render=False)  # every event of the tab tells it
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(preset.app.prompts[0], label="prompt")
            seed = gr.Number(0, label="seed")
            block = block_dropdown(preset, preset.app.steer_block)
            branch = gr.Radio(
                list(BRANCH_CHOICES), value="cond", label="branch", elem_id="steer-branch"
            )
            by = gr.Radio(["word", "CID"], value="word", label="concept by")
            word, concepts = steer_concepts(preset_box, preset, block, branch, message)
            with gr.Row():
                cid = gr.Number(0, label="CID", precision=0)
                cid_t = gr.Slider(0, 1, 1.0, step=0.05, label="the CID's SAE: the one nearest t")
            edit = steer_edit(preset_box, preset, message)
            region = steer_region(preset_box, prompt, seed, message)
            run = gr.Button("generate before and after", variant="primary", elem_id="steer-run")
            message.render()
        with gr.Column(scale=1):
            results_line(STEER_RESULTS, "steer-line")
            pair = gr.ImageSlider(
                label="before | after (same seed)", format="png", elem_id="steer-pair"
            )
            difference = gr.Image(
                label="difference |after - before| per pixel, grey levels on a fixed 0-255 scale",
                height=256,
                format="png",
                elem_id="steer-difference",
            )
            edits = gr.Textbox(
                label="steps edited (with which SAE and CIDs) and skipped (why); how much the "
                "image changed; where the object's centre of mass is before and after",
                interactive=False,
                elem_id="steer-edits",
            )
            metrics = gr.JSON(
                label="the edit and what changed (pixel difference in [0, 1], LPIPS, CLIP, "
                "centre of mass)",
                elem_id="steer-metrics",
            )
    inputs = inputs_of(
        on_steer,
        preset=preset_box,
        prompt=prompt,
        seed=seed,
        block=block,
        branch=branch,
        concept_by=by,
        word=word,
        concepts=concepts,
        cid=cid,
        cid_t=cid_t,
        **edit._asdict(),
        **region._asdict(),
    )
    outputs = [pair, difference, edits, metrics]
    done = run.click(on_steer, inputs, outputs, api_name="steer", show_progress_on=message, **MODEL)
    tells_refusal(done, message, "steer_refused")
    clears(message, {"steer_clears": run.click})
    return SteerControls(block, word, branch, by, edit.sae_choice, prompt)


def steer_concepts(
    preset_box: gr.Dropdown,
    preset: Preset,
    block: gr.Dropdown,
    branch: gr.Radio,
    message: gr.Markdown,
) -> tuple[gr.Textbox, gr.JSON]:
    """The concept's word and, listed on request, its concepts to narrow the edit to (the
    ticked ones, as a list); a refusal shows on the tab's `message` line."""
    with gr.Row():
        word = gr.Textbox(preset.app.word, label="word", scale=2)
        listing = gr.Button("list its concepts", scale=1, elem_id="steer-list")
    concepts = gr.CheckboxGroup([], label=CONCEPTS_LABEL, elem_id="steer-concepts")
    found = gr.JSON(label="the word's concepts", visible="hidden")
    ticked = gr.JSON([], label="the ticked concepts", visible="hidden")
    concepts.change(on_ticked, concepts, ticked, api_name="ticked", **PAGE)
    listed = listing.click(
        on_steer_concepts,
        inputs_of(on_steer_concepts, preset=preset_box, block=block, branch=branch, word=word),
        found,
        api_name="steer_concepts",
        show_progress_on=message,
        **MODEL,
    )
    tells_refusal(listed, message, "steer_concepts_refused")
    clears(message, {"steer_concepts_clears": listing.click})
    listed.success(on_concept_list, found, concepts, api_name="concept_list", **PAGE)
    gr.on(
        [word.change, block.change, branch.change],
        on_concepts_stale,
        None,
        concepts,
        api_name="concepts_stale",
        **PAGE,
    )
    return word, ticked


class EditControls(NamedTuple):
    """The edit's controls, named as `on_steer`'s parameters."""

    kind: gr.Radio
    stage: gr.Radio
    t_min: gr.Slider
    t_max: gr.Slider
    strength: gr.Number
    sae_choice: gr.Radio


class RegionControls(NamedTuple):
    """The region's controls, named as `on_steer`'s parameters."""

    region_by: gr.Radio
    quadrant: gr.Radio
    canvas: gr.ImageEditor


def steer_edit(preset_box: gr.Dropdown, preset: Preset, message: gr.Markdown) -> EditControls:
    """The edit's type, stage (or t range), strength (which follows the preset's default) and
    the SAE each step edits with; a refusal shows on the tab's `message` line."""
    kind = gr.Radio(list(KINDS), value="spatial", label="type")
    stage = gr.Radio(list(STAGE_CHOICES), value="early", label="stage")
    with gr.Row(visible=False) as t_range:
        t_min = gr.Slider(0, 1, 0.6, step=0.05, label="t from")
        t_max = gr.Slider(0, 1, 1.0, step=0.05, label="t to")
    strength = gr.Number(
        default_strength(preset, kind.value, stage.value),
        label="strength",
        info="By default the paper's for the type and stage, or the strengths calibrated for "
        "the SAEs where they come with them (the toy model); empty for a custom stage: each "
        "step takes its own stage's. With SDLens SAEs (sdxl-turbo) a multiple of the "
        "concept's mean activation, as in the SDLens demo.",
    )
    proposed = gr.on(
        [preset_box.change, kind.change, stage.change, t_min.release, t_max.release],
        on_default_strength,
        inputs_of(
            on_default_strength,
            preset=preset_box,
            kind=kind,
            stage=stage,
            t_min=t_min,
            t_max=t_max,
        ),
        strength,
        api_name="default_strength",
        **LIGHT,
    )
    tells_refusal(proposed, message, "default_strength_refused")
    stage.change(on_stage, stage, t_range, api_name="stage_range", **PAGE)
    sae_choice = gr.Radio(
        list(SAE_CHOICES),
        value="stage",
        label="SAE per edited step: the one at its stage's t (the paper's 1.0, 0.5, 0.0) or the "
        "one nearest its own t",
    )
    return EditControls(kind, stage, t_min, t_max, strength, sae_choice)


def steer_region(
    preset_box: gr.Dropdown, prompt: gr.Textbox, seed: gr.Number, message: gr.Markdown
) -> RegionControls:
    """Where a spatial edit acts: a quadrant, or a region drawn on the canvas over the image
    to edit (a button puts it there; a refusal shows on the tab's `message` line)."""
    region_by = gr.Radio(["quadrant", "drawn"], value="quadrant", label="region")
    quadrant = gr.Radio(list(QUADRANTS), value="top_left", label="quadrant")
    canvas = gr.ImageEditor(
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
    show = gr.Button("put the image to edit (before) on the canvas", elem_id="steer-show")
    shown = show.click(
        on_canvas_image,
        inputs_of(on_canvas_image, preset=preset_box, prompt=prompt, seed=seed),
        canvas,
        api_name="canvas_image",
        **{**MODEL, "api_visibility": "private"},
    )
    tells_refusal(shown, message, "canvas_image_refused")
    clears(message, {"canvas_image_clears": show.click})
    return RegionControls(region_by, quadrant, canvas)
