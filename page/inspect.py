"""The inspect tab: one concept of one SAE, from its dictionary entry to a picture, and its
timeline over one generation."""

from typing import NamedTuple

import gradio as gr
from gradio.events import Dependency

from core.diffusion.presets import Preset
from core.views import inspection, timeline
from core.views.render import figure_image, for_display
from page.components import block_dropdown, results_line
from page.refusals import clears, message_line, tells_refusal
from page.serving import MODEL, PAGE, PROGRESS, gpu, inputs_of, models, user_errors
from page.texts import INSPECT_RESULTS


def on_request_inspect(runs: int) -> int:
    """One more inspection: the change of the counter runs the inspect chain (page only)."""
    return runs + 1


def on_pick_concept(cid: int, runs: int) -> tuple[int, int]:
    """The concept picked among those found, inspected (page only)."""
    return cid, runs + 1


def on_found(matches: list[dict], runs: int) -> tuple[gr.Dropdown, int]:
    """The concepts found as the dropdown's choices, the best picked and inspected (page
    only)."""
    choices = [(f"CID {match['cid']}: {match['labels']}", match["cid"]) for match in matches]
    return gr.Dropdown(choices=choices, value=choices[0][1]), runs + 1


@gpu(generations=0)
@user_errors
def on_search_concepts(preset, block, t, branch, word, progress=PROGRESS):
    """Concepts whose labels match a word; the best becomes the CID to inspect.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the SAE's block, e.g. "mid_block.attentions.0" or "transformer_blocks.14".
        t: the SAE's timestep in [0, 1].
        branch: "cond" or "uncond".
        word: the word to look for among the concepts' labels.

    Returns:
        the matching concepts, each its CID and labels
        the best CID
        how they were found
    """
    with models(preset, progress) as (loaded, _):
        found, how = inspection.search(loaded, block, t, branch, word)
    matches = [{"cid": cid, "labels": labels} for cid, labels in found]
    return matches, found[0][0], f"Found: {how}."


@gpu(generations=0)
@user_errors
def on_inspect_concept(preset, block, t, branch, cid, progress=PROGRESS):
    """What one SAE concept is: its dictionary entry, statistics and nearest concepts.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the SAE's block, e.g. "mid_block.attentions.0" or "transformer_blocks.14".
        t: the SAE's timestep in [0, 1] (1.0: the first denoising step).
        branch: "cond" or "uncond".
        cid: the concept id (the SAE latent's index).

    Returns:
        the dictionary entry: labels, their counts and mean IoU
        the activation statistics
        the nearest concepts, by label embedding and by decoder direction
        a one-line note
    """
    with models(preset, progress) as (loaded, _):
        card = inspection.concept_card(loaded, block, t, branch, cid)
    notes = "; ".join(card.notes) or f"CID {card.cid} of the SAE at t={card.key.t}"
    return card.entry, card.stats, card.nearest, notes


@gpu(generations=None)
@user_errors
def on_top_examples(preset, block, t, branch, cid, progress=PROGRESS):
    """The images a concept fires on most, with its activation map over each.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the SAE's block, e.g. "mid_block.attentions.0" or "transformer_blocks.14".
        t: the SAE's timestep in [0, 1].
        branch: "cond" or "uncond".
        cid: the concept id.

    Returns:
        a gallery of the top examples, the concept's activation tinted on each
        a one-line note on the example index used
    """
    with models(preset, progress) as (loaded, on_step):
        panels, note = inspection.top_examples(loaded, block, t, branch, cid, on_step=on_step)
    return panels, note


@gpu(generations=1)
@user_errors
def on_activation_map(preset, block, t, branch, cid, prompt, seed, progress=PROGRESS):
    """Where a concept fires when a prompt of your choice is generated.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the SAE's block, e.g. "mid_block.attentions.0" or "transformer_blocks.14".
        t: the SAE's timestep in [0, 1]; the map is read at the step nearest to it.
        branch: "cond" or "uncond".
        cid: the concept id.
        prompt: the prompt to generate.
        seed: the generation seed.

    Returns:
        the generated image with the concept's activation over it
        the activation map alone, on the concept's fixed scale
        a caption
    """
    with models(preset, progress) as (loaded, on_step):
        return inspection.activation_on(loaded, block, t, branch, cid, prompt, seed, on_step)


@gpu(generations=1)
@user_errors
def on_timeline(preset, block, t, branch, cid, word, prompt, seed, progress=PROGRESS):
    """How strongly a concept fires at every denoising step of one generation.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the denoiser block (U-Net or DiT) whose SAEs read the residual updates, e.g.
            "mid_block.attentions.0".
        t: the timestep in [0, 1] of the SAE that `cid` belongs to; that SAE reads every step.
        branch: "cond" or "uncond".
        cid: the concept id, used when `word` is empty.
        word: a concept label; each step sums its CIDs in the SAE trained nearest to the
            step's t. Empty: follow `cid`.
        prompt: the prompt to generate.
        seed: the generation seed.

    Returns:
        the filmstrip: the concept's activation at each step on one fixed scale, t from 1 to 0
        the plot of its mean and max activation against t
        a line saying which SAE read which steps, which were skipped, and the scale
    """
    return timeline_outputs(preset, block, t, branch, cid, word, prompt, seed, progress)


def timeline_outputs(preset, block, t, branch, cid, word, prompt, seed, progress) -> tuple:
    """The timeline's filmstrip, plot and line (`on_timeline`)."""
    with models(preset, progress) as (loaded, on_step):
        found = timeline.concept_timeline(
            loaded, block, branch, prompt, seed, word, cid, t, on_step
        )
    strength = figure_image(timeline.strength_figure(found))
    return timeline.filmstrip(found), strength, found.summary()


def on_timeline_opened() -> bool:
    """A timeline is shown: from now on it follows the inspected concept (page only)."""
    return True


@gpu(generations=1)
@user_errors
def on_timeline_follows(
    opened, preset, block, t, branch, cid, word, prompt, seed, progress=PROGRESS
) -> tuple:
    """The timeline of the concept just inspected, where one is shown; else nothing changes
    (page only)."""
    if not opened:
        return gr.skip(), gr.skip(), gr.skip()
    return timeline_outputs(preset, block, t, branch, cid, word, prompt, seed, progress)


@gpu(generations=1)
@user_errors
def on_feature_icon(preset, block, t, branch, cid, strength, seed, progress=PROGRESS):
    """The concept's icon: an image generated from the empty prompt with the concept added.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the SAE's block, e.g. "mid_block.attentions.0" or "transformer_blocks.14".
        t: the SAE's timestep in [0, 1].
        branch: "cond" or "uncond".
        cid: the concept id.
        strength: how strongly the concept is added (the SAE latent's value).
        seed: the generation seed.

    Returns:
        the generated image
    """
    with models(preset, progress) as (loaded, on_step):
        icon = inspection.feature_icon(loaded, block, t, branch, cid, strength, seed, on_step)
    return for_display(icon)


class ConceptViews(NamedTuple):
    """The inspect tab's outputs, top to bottom."""

    note: gr.Markdown
    entry: gr.Dataframe
    stats: gr.JSON
    nearest: gr.Dataframe
    examples: gr.Gallery
    examples_note: gr.Markdown
    overlay: gr.Image
    heat: gr.Image
    icon: gr.Image
    caption: gr.Markdown
    strip: gr.Image
    strength: gr.Image
    timeline_note: gr.Markdown


class InspectControls(NamedTuple):
    """The inspect tab's controls that follow the preset."""

    block: gr.Dropdown
    branch: gr.Radio
    cid: gr.Number
    prompt: gr.Textbox


def inspect_tab(preset_box: gr.Dropdown, preset: Preset) -> InspectControls:
    """One concept of one SAE, found by CID or by word."""
    with gr.Row():
        with gr.Column(scale=1):
            block = block_dropdown(preset, preset.app.block)
            t = gr.Slider(0, 1, 0.5, step=0.05, label="t (the nearest SAE is used)")
            branch = gr.Radio(["cond", "uncond"], value="cond", label="branch")
            cid = gr.Number(preset.app.cid, label="CID", precision=0)
            with gr.Row():
                word = gr.Textbox("", label="search by word")
                search = gr.Button("search", elem_id="inspect-search")
            found = gr.Dropdown([], label="concepts found", interactive=True)
            prompt = gr.Textbox(preset.app.prompts[0], label="new generation")
            with gr.Row():
                seed = gr.Number(0, label="seed")
                icon_strength = gr.Number(10.0, label="icon strength")
            run = gr.Button("inspect", variant="primary", elem_id="inspect-run")
            follow = gr.Button("timeline", elem_id="inspect-timeline")
            message = message_line("inspect-message")
        with gr.Column(scale=2):
            results_line(INSPECT_RESULTS, "inspect-line")
            views = concept_views()
    matches = gr.JSON(label="concepts matching the word", visible="hidden")
    runs = gr.State(0)  # inspections asked for: each change runs `show_concept`'s chain
    run.click(on_request_inspect, runs, runs, api_name="request_inspect", **PAGE)
    key = {"preset": preset_box, "block": block, "t": t, "branch": branch}
    model = {**MODEL, "show_progress_on": message}
    searched = search.click(
        on_search_concepts,
        inputs_of(on_search_concepts, **key, word=word),
        [matches, cid, views.note],
        api_name="search_concepts",
        **model,
    )
    tells_refusal(searched, message, "search_concepts_refused")
    searched.success(on_found, [matches, runs], [found, runs], api_name="show_found", **PAGE)
    found.input(on_pick_concept, [found, runs], [cid, runs], api_name="pick_concept", **PAGE)
    concept = {**key, "cid": cid}
    shown = show_concept(runs, concept, prompt, seed, icon_strength, views, message)
    timeline = {**concept, "word": word, "prompt": prompt, "seed": seed}
    outputs = [views.strip, views.strength, views.timeline_note]
    opened = gr.State(False)  # whether this page has shown a timeline
    inputs = inputs_of(on_timeline, **timeline)
    drawn = follow.click(on_timeline, inputs, outputs, api_name="timeline", **model)
    tells_refusal(drawn, message, "timeline_refused")
    drawn.success(on_timeline_opened, None, opened, api_name="timeline_opened", **PAGE)
    followed = shown.success(  # a shown timeline follows the concept at once
        on_timeline_follows,
        inputs_of(on_timeline_follows, opened=opened, **timeline),
        outputs,
        api_name="timeline_follows",
        **{**model, "api_visibility": "private"},
    )
    tells_refusal(followed, message, "timeline_follows_refused")
    presses = {"search": search.click, "inspect": run.click, "timeline": follow.click}
    clears(message, {f"inspect_{name}_clears": press for name, press in presses.items()})
    return InspectControls(block, branch, cid, prompt)


def concept_views() -> ConceptViews:
    note = gr.Markdown(label="note")
    with gr.Row():
        entry = gr.Dataframe(headers=["label", "count", "mean IoU"], label="dictionary entry")
        stats = gr.JSON(label="firing statistics")
    nearest = gr.Dataframe(headers=["by", "CID", "cosine", "labels"], label="nearest concepts")
    examples = gr.Gallery(
        label="top-activating examples, the concept's activation tinted (0 to the scale's top)",
        columns=6,
        height=220,
        format="png",
        elem_id="inspect-examples",
    )
    examples_note = gr.Markdown(label="examples note")
    with gr.Row():
        overlay = gr.Image(label="activation over the image", height=256, format="png")
        heat = gr.Image(label="activation, fixed scale", height=256, format="png")
        icon = gr.Image(
            label="feature icon (empty prompt)", height=256, format="png", elem_id="inspect-icon"
        )
    caption = gr.Markdown(label="caption")
    strip = gr.Image(  # its header says what it shows, clear of the label and buttons
        label="timeline: the concept's activation at each step of the new generation, t from 1 "
        "(noise) to 0, all on one fixed scale (0 to its largest in training; for a word, to "
        "the strip's largest)",
        show_label=False,
        format="png",
        elem_id="inspect-timeline-strip",
    )
    strength = gr.Image(  # its title says what it shows
        label="the concept's mean and max activation per step",
        show_label=False,
        format="png",
        height=320,
        elem_id="inspect-timeline-strength",
    )
    timeline_note = gr.Markdown(label="timeline note")
    return ConceptViews(
        note,
        entry,
        stats,
        nearest,
        examples,
        examples_note,
        overlay,
        heat,
        icon,
        caption,
        strip,
        strength,
        timeline_note,
    )


def show_concept(
    runs: gr.State,
    concept: dict[str, gr.Component],
    prompt: gr.Textbox,
    seed: gr.Number,
    icon_strength: gr.Number,
    views: ConceptViews,
    message: gr.Markdown,
) -> Dependency:
    """On each new inspection of `concept` (its preset, block, t, branch and CID): the card,
    then top examples, activation map and feature icon, each only if the one before
    succeeded; progress and refusals show on `message`. Returns the last event of the chain."""
    model = {**MODEL, "show_progress_on": message}
    inputs = inputs_of(on_inspect_concept, **concept)
    outputs = [views.entry, views.stats, views.nearest, views.note]
    shown = runs.change(on_inspect_concept, inputs, outputs, api_name="inspect_concept", **model)
    tells_refusal(shown, message, "inspect_concept_refused")
    inputs = inputs_of(on_top_examples, **concept)
    outputs = [views.examples, views.examples_note]
    shown = shown.success(on_top_examples, inputs, outputs, api_name="top_examples", **model)
    tells_refusal(shown, message, "top_examples_refused")
    inputs = inputs_of(on_activation_map, **concept, prompt=prompt, seed=seed)
    outputs = [views.overlay, views.heat, views.caption]
    shown = shown.success(on_activation_map, inputs, outputs, api_name="activation_map", **model)
    tells_refusal(shown, message, "activation_map_refused")
    inputs = inputs_of(on_feature_icon, **concept, strength=icon_strength, seed=seed)
    shown = shown.success(on_feature_icon, inputs, views.icon, api_name="feature_icon", **model)
    return tells_refusal(shown, message, "feature_icon_refused")
