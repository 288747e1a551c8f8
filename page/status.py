"""The preset's status line, and the controls that follow the preset."""

import gradio as gr

from core.diffusion.presets import PRESETS, check_preset
from core.views.steer import usable_controls
from page import serving
from page.components import shown_path
from page.serving import sentence, user_errors


@user_errors
def on_status(preset: str) -> str:
    """What the app has of a preset: loaded (its SAEs and dictionaries), loading, failed
    (why) or loading on first use.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".

    Returns:
        the preset's status, in Markdown
    """
    check_preset(preset)
    state, why = serving.CACHE.state(preset)
    shown = {
        "loaded": "loaded",
        "loading": "loading in the background: requests wait for it",
        "failed": "could not load; a request tries again",
        "not loaded": "loads on first use",
    }[state]
    lines = [f"**Preset `{preset}`** ({shown}): {PRESETS[preset].app.about}."]
    if why:
        lines.append(f"Why it could not load: {sentence(ValueError(why))}")
    loaded = serving.CACHE.loaded_now(preset)
    if loaded:
        lines.append(
            f"{len(loaded.bank)} SAEs and {len(loaded.dictionaries)} concept dictionaries "
            f"from `{shown_path(loaded.preset.sae_source)}`."
        )
        lines += [f"Note: {note}" for note in loaded.notes]
    return "\n\n".join(lines)


def on_status_tick(preset: str) -> tuple[str, gr.Timer]:
    """The status while the preset loads; the timer stops once it no longer is (page only)."""
    return on_status(preset), gr.Timer(active=serving.CACHE.state(preset)[0] == "loading")


def on_select_preset(preset: str) -> tuple:
    """The status, and the blocks, steps, steering word, inspected CID, prompts (of the
    emergence, steer and inspect tabs) and example prompts the preset opens with (page only:
    component updates)."""
    text = on_status(preset)
    chosen = PRESETS[preset]
    app = chosen.app

    def dropdown(block: str) -> gr.Dropdown:
        return gr.Dropdown(choices=list(chosen.hook_points), value=block)

    emergence, steer, inspect = dropdown(app.block), dropdown(app.steer_block), dropdown(app.block)
    steps, word, cid = gr.Number(value=chosen.steps), gr.Textbox(app.word), gr.Number(app.cid)
    prompt = gr.Textbox(app.prompts[0])
    examples = gr.Dataset(samples=[[p] for p in app.prompts])
    return text, emergence, steer, inspect, steps, word, cid, prompt, prompt, prompt, examples


def on_controls(
    preset: str, emergence_branch: str, steer_branch: str, steer_by: str, inspect_branch: str
) -> tuple:
    """Only the controls the preset can use (page only): the branches it has SAEs and
    guidance for (emergence, steer, inspect), concepts by word only with dictionaries, the
    SAE-per-step choice only with SAEs at several t. Before the preset is loaded, what its
    settings allow; each control keeps its value where that is still offered."""
    check_preset(preset)
    controls = usable_controls(serving.CACHE.preset(preset), serving.CACHE.loaded_now(preset))
    single = [b for b in controls.branches if b != "both"] or ["cond"]

    def radio(choices: list[str], value: str) -> gr.Radio:
        return gr.Radio(choices=choices, value=value if value in choices else choices[0])

    by_choices = ["word", "CID"] if controls.by_word else ["CID"]
    return (
        radio(single, emergence_branch),
        radio(list(controls.branches) or ["cond"], steer_branch),
        radio(by_choices, steer_by),
        radio(single, inspect_branch),
        gr.Radio(visible=controls.per_stage),
    )
