"""Concept dictionaries built on first use, for a preset whose SAEs come without them: the
emergence tab says what a build does and how long it takes, then builds them part by part,
each part one GPU call."""

from typing import NamedTuple

import gradio as gr
from gradio.events import Dependency

from core.emergence.parts import PartedBuild
from core.runtime import counted
from core.views.dictionary_build import (
    GPU_CPU_RATIO,
    build_part,
    estimate_seconds,
    finish_build,
    parted_build,
)
from core.views.dictionary_cache import cache_folder
from core.views.model_cache import Loaded
from page import serving
from page.components import shown_path
from page.refusals import clears, message_line, tells_refusal
from page.serving import MODEL, PROGRESS, gpu, inputs_of, models, sentence, user_errors


def plan_text(loaded: Loaded) -> str:
    """What a first-use build of the loaded preset does, how far it is and how long it takes."""
    try:
        parts = parted_build(loaded)
    except ValueError as error:
        return sentence(error)
    plan = parts.plan
    labeller = ", ".join(f"{k} {v}" for k, v in plan.labeller.items())
    lines = [
        f"The SAEs of `{loaded.preset.name}` come without concept dictionaries, so concepts "
        f"are chosen by CID. **build** generates the first {len(plan.prompts)} prompts of "
        f"`{shown_path(loaded.preset.prompts)}` (seeds {plan.seed} to "
        f"{plan.seed + len(plan.prompts) - 1}, {counted(plan.steps, 'step')}), labels each image "
        f"({labeller}) and names the concepts of its {len(plan.keys)} SAEs, in "
        f"{plan.num_parts} parts; they are kept in `{shown_path(cache_folder(loaded.preset))}` "
        "and read on every later start.",
    ]
    lines.append(duration_text(parts, loaded.device.type))
    return "\n\n".join(lines)


def duration_text(parts: PartedBuild, device_type: str) -> str:
    """How long the rest of a build takes: measured on the parts done, else estimated."""
    plan, done, per_part = parts.plan, len(parts.done()), parts.seconds_per_part()
    if per_part is not None:
        left = per_part * (plan.num_parts - done)
        return (
            f"{done} of {plan.num_parts} parts are done ({per_part:.0f} s each here): "
            f"{minutes(left)} left."
        )
    estimate = estimate_seconds(plan, device_type)
    if estimate is None:
        return "How long it takes is measured on the first part."
    scaled = f", divided by {GPU_CPU_RATIO} for a GPU" if device_type == "cuda" else ""
    return (
        f"It takes {minutes(estimate)} here: an estimate from costs measured on a CPU"
        f"{scaled} (docs/app.md), measured on the first part once it runs."
    )


def minutes(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    count = round(seconds / 60)
    return f"about {count} minute{'' if count == 1 else 's'}"


@user_errors
def on_dictionary_plan(preset: str) -> tuple[gr.Column, str]:
    """The build panel, shown while the loaded preset has no dictionaries, and what a build
    would do (page only)."""
    loaded = serving.CACHE.loaded_now(preset)
    if loaded is None or loaded.dictionaries:
        return gr.Column(visible=False), ""
    return gr.Column(visible=True), plan_text(loaded)


@gpu(generations=None)
@user_errors
def on_build_part(preset: str, index: int) -> None:
    """Generate, label and keep one part of the first-use build (one GPU call)."""
    with models(preset, PROGRESS) as (loaded, _):
        build_part(loaded, index)


@gpu(generations=0)
@user_errors
def on_finish_build(preset: str) -> int:
    """The dictionaries of a build whose parts are done; how many objects were labelled."""
    with models(preset, PROGRESS) as (loaded, _):
        return finish_build(loaded)


@user_errors
def on_build_dictionaries(preset: str, progress=PROGRESS) -> str:
    """Build the concept dictionaries of a preset whose SAEs come without them, from its
    prompt file, and keep them for every later start; a build stopped half way goes on
    from the parts it kept. Each part is its own GPU call.

    Args:
        preset: the model preset, e.g. "sdxl-turbo".

    Returns:
        what was built
    """
    with models(preset, progress) as (loaded, _):
        if loaded.dictionaries:
            have = len(loaded.dictionaries)
            return f"The preset's SAEs have their {have} concept dictionaries; nothing was built."
        parts = parted_build(loaded)
    remaining, total = parts.remaining(), parts.plan.num_parts
    for done, index in enumerate(remaining, start=total - len(remaining)):
        progress((done, total), desc="building concept dictionaries", unit="parts")
        on_build_part(preset, index)
    objects = on_finish_build(preset)
    with models(preset, progress) as (loaded, _):
        count = len(loaded.dictionaries)
    return f"Built {count} concept dictionaries from {objects} labelled objects."


class DictionaryPanel(NamedTuple):
    """The build panel, what it says, and the build's event (the page follows it)."""

    panel: gr.Column
    about: gr.Markdown
    built: Dependency


def dictionary_panel(preset_box: gr.Dropdown) -> DictionaryPanel:
    """A build button for the preset's dictionaries, shown only while it has none."""
    with gr.Column(visible=False) as panel:
        about = gr.Markdown(label="concept dictionaries", elem_id="dictionaries-about")
        build = gr.Button("build concept dictionaries", elem_id="dictionaries-build")
        message = message_line("dictionaries-message")
    built = build.click(
        on_build_dictionaries,
        inputs_of(on_build_dictionaries, preset=preset_box),
        about,
        api_name="build_dictionaries",
        show_progress_on=message,
        **MODEL,
    )
    tells_refusal(built, message, "build_dictionaries_refused")
    clears(message, {"build_dictionaries_clears": build.click})
    return DictionaryPanel(panel, about, built)
