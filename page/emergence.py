"""The emergence tab: one generation, where each word will appear at every step; a batch over
prompts and seeds; run files to keep and reopen."""

import functools
import tempfile
from pathlib import Path
from typing import NamedTuple

import gradio as gr

from core.diffusion.presets import Preset
from core.runtime import counted
from core.views.batch import (
    MAX_PAGE_RUNS,
    TABLE_HEADERS,
    batch_figure,
    batch_table,
    page_batch,
    run_batch,
    summary_line,
)
from core.views.emergence import (
    EmergenceResult,
    EmergenceRuns,
    iou_figure,
    run_emergence,
    step_panels,
)
from core.views.inputs import MAX_STEPS
from core.views.render import figure_image, for_display
from core.views.run_file import SUFFIX, load_run, save_run
from page.components import block_dropdown, results_line
from page.dictionaries import DictionaryPanel, dictionary_panel
from page.refusals import clears, message_line, tells_refusal
from page.serving import LIGHT, MODEL, PAGE, PROGRESS, gpu, inputs_of, models, user_errors
from page.status import on_status
from page.texts import EMERGENCE_RESULTS

STEP_LABEL = "step (0 = first, noisiest)"
ONE_STEP_LABEL = "step 0, the run's only step"
RUNS = EmergenceRuns()
"""The recent emergence results by run id, in this (the server's) process."""


@gpu(generations=1)
@user_errors
def emergence_result(preset, prompt, seed, steps, block, branch, words, progress):
    """One emergence generation. On ZeroGPU it runs in the GPU worker process, and its result
    comes back to the server's process, where `RUNS` keeps it."""
    with models(preset, progress) as (loaded, on_step):
        return run_emergence(loaded, prompt, seed, steps, block, branch, words, on_step)


@user_errors
def on_emergence(preset, prompt, seed, steps, block, branch, words, progress=PROGRESS):
    """Generate an image and predict, at every denoising step, where each word will appear.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        prompt: the text prompt.
        seed: the generation seed (an integer).
        steps: denoising steps (1 to the app's maximum).
        block: the block (U-Net or DiT) whose SAEs read the residual updates, e.g.
            "mid_block.attentions.0".
        branch: "cond" or "uncond", the classifier-free guidance branch.
        words: comma-separated target words; empty takes the prompt's nouns.

    Returns:
        the final image
        the plot of each word's IoU with its reference per step
        the last step's panels: four per word
        a Markdown summary of the run
        the run id, which `emergence_step` and `export_run` take
    """
    result = emergence_result(preset, prompt, seed, steps, block, branch, words, progress)
    return emergence_outputs(preset, result)


def emergence_outputs(preset: str, result: EmergenceResult) -> tuple:
    """What the page and the API show of a run, which `RUNS` now keeps: the final image, the
    IoU plot, the last step's panels, the summary and the run id."""
    return (
        for_display(result.image),
        figure_image(iou_figure(result)),
        step_panels(result, len(result.steps) - 1),
        emergence_summary(preset, result),
        RUNS.add(preset, result),
    )


def emergence_summary(preset: str, result: EmergenceResult) -> str:
    lines = [
        f"**{preset}**, {result.block} ({result.branch}), seed {result.seed}, "
        f"{counted(len(result.steps), 'step')}.",
        f"- {sae_line(result)}",
        *[f"- {note}" for note in result.notes],
        "- Panels per word: the predicted mask outlined in red on the final image, the "
        "reference mask it is scored against in blue, the similarity of each position's most "
        "active concept with the word (grey: it has no label, or none fires), and the word's "
        "cross-attention (DAAM-style baseline) as a share of the step's peak.",
    ]
    return "\n".join(lines)


def sae_line(result: EmergenceResult) -> str:
    """Which SAE read which steps: the one trained nearest each step's t, or the one SAE
    trained on every t (as SDLens's)."""

    def steps(first: int, last: int) -> str:
        return f"step {first}" if first == last else f"steps {first}-{last}"

    spans = result.sae_spans()
    if len(spans) == 1 and spans[0][0].t is None:
        return f"One SAE, trained on every t (as SDLens's), read {steps(*spans[0][1:])}."
    read = "; ".join(f"t={key.t:g}: {steps(first, last)}" for key, first, last in spans)
    return f"The SAE trained nearest each step's t read it ({read})."


@user_errors
def on_emergence_step(run_id: str, index: float) -> list:
    """The panels of one step of an emergence run.

    Args:
        run_id: the run id that `emergence` returned (the server keeps its recent runs).
        index: the step, 0 (the first, noisiest) to the number of steps minus 1.

    Returns:
        the step's panels per word: predicted mask, reference, concept similarity, cross-attention
    """
    return step_panels(RUNS.get(run_id), index)


@user_errors
def on_step_range(run_id: str) -> gr.Slider:
    """The step slider over the run's steps, at its last, and movable; a run of one step
    (SDXL-Turbo's) has nothing to move to (page only)."""
    last = len(RUNS.get(run_id).steps) - 1
    if last == 0:
        return gr.Slider(value=0, interactive=False, label=ONE_STEP_LABEL)
    return gr.Slider(maximum=last, value=last, interactive=True, label=STEP_LABEL)


@gpu(generations=None)
@user_errors
def on_emergence_batch(
    preset, prompt, prompts, seeds, steps, block, branch, words, progress=PROGRESS
):
    """Run the emergence view for several prompts and seeds; each step's IoU over the runs.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        prompt: the first prompt (the tab's).
        prompts: more prompts, one a line; may be empty.
        seeds: the seeds, like "0-3" or "0, 1, 2"; every prompt runs with every seed, at
            most 16 runs in all (more with `python -m core.views.emergence_batch`).
        steps: denoising steps (1 to the app's maximum), the same for every run.
        block: the denoiser block (U-Net or DiT) whose SAEs read the residual updates.
        branch: "cond" or "uncond", the classifier-free guidance branch.
        words: comma-separated target words; empty takes each prompt's nouns.

    Returns:
        the plot of the mean IoU per step over every run and word (SAE solid, attention dashed)
        the table of each step's mean, standard deviation and count of defined IoUs per method
        a one-line summary, counting the words left out as scored only against their own run
    """
    prompts, seeds = page_batch(prompt, prompts, seeds)

    def on_run(done: int, total: int, _) -> None:
        progress((done, total), desc="emergence runs", unit="runs")

    with models(preset, progress) as (loaded, _):
        result = run_batch(loaded, prompts, seeds, steps, block, branch, words, on_run)
    return figure_image(batch_figure(result)), batch_table(result), summary_line(result)


@functools.cache
def export_folder() -> Path:
    """Where this process writes run files before the page or a client downloads them."""
    return Path(tempfile.mkdtemp(prefix="emergence-runs-"))


@user_errors
def on_export_run(run_id: str) -> str:
    """Write an emergence run to one file, to keep, share or open again with `import_run`.

    Args:
        run_id: the run id that `emergence` or `import_run` returned.

    Returns:
        the run file (safetensors; the format is documented in core/views/run_file.py)
    """
    preset, result = RUNS.get_with_preset(run_id)
    path = export_folder() / f"emergence-{str(run_id).strip()}{SUFFIX}"
    return str(save_run(result, path, preset))


def on_run_file_written() -> gr.File:
    """The run file's box, hidden until there is a file (page only)."""
    return gr.File(visible=True)


@user_errors
def on_import_run(file: str) -> tuple:
    """Open a run file that `export_run` wrote and show it as a fresh emergence run.

    Args:
        file: the run file (a .safetensors file from `export_run`).

    Returns:
        the final image
        the plot of each word's IoU with its reference per step
        the last step's panels: four per word
        a Markdown summary of the run
        the run id, which `emergence_step` and `export_run` take
    """
    if not file:
        raise ValueError("Choose a run file (.safetensors) that the emergence tab exported.")
    return emergence_outputs(*load_run(file))


class EmergenceControls(NamedTuple):
    """The emergence tab's controls that follow the preset."""

    block: gr.Dropdown
    steps: gr.Number
    branch: gr.Radio
    prompt: gr.Textbox
    examples: gr.Dataset
    dictionaries: DictionaryPanel


def emergence_tab(
    preset_box: gr.Dropdown, status: gr.Markdown, preset: Preset
) -> EmergenceControls:
    """Generate once; where each word will be at every step."""
    dictionaries = dictionary_panel(preset_box)
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(preset.app.prompts[0], label="prompt")
            with gr.Row():
                seed = gr.Number(0, label="seed")
                steps = gr.Number(preset.steps, label=f"steps (1 to {MAX_STEPS})")
            block = block_dropdown(preset, preset.app.block)
            branch = gr.Radio(["cond", "uncond"], value="cond", label="branch")
            words = gr.Textbox(
                "", label="target words (comma-separated; empty: the prompt's nouns)"
            )
            run = gr.Button("generate and predict", variant="primary", elem_id="emergence-run")
            message = message_line("emergence-message")
            examples = gr.Examples([[p] for p in preset.app.prompts], [prompt])
        with gr.Column(scale=2):
            results_line(EMERGENCE_RESULTS, "emergence-line")
            image, plot, summary, run_id, export, opener, run_file = emergence_results()
    step = gr.Slider(  # any run's steps: the server checks API calls against this range
        0,
        MAX_STEPS - 1,
        0,
        step=1,
        label="step: movable once there is a run, over its steps",
        interactive=False,
        elem_id="emergence-step",
    )
    gallery = gr.Gallery(  # the page's full width: four panels per word, one row each
        label="at this step, per word: predicted mask (red), reference (blue), concept "
        "similarity, cross-attention",
        columns=4,
        height="max-content",
        object_fit="contain",
        format="png",
        elem_id="emergence-gallery",
    )
    inputs = inputs_of(
        on_emergence,
        preset=preset_box,
        prompt=prompt,
        seed=seed,
        steps=steps,
        block=block,
        branch=branch,
        words=words,
    )
    outputs = [image, plot, gallery, summary, run_id]
    shown = {**MODEL, "show_progress_on": message}
    done = run.click(on_emergence, inputs, outputs, api_name="emergence", **shown)
    tells_refusal(done, message, "emergence_refused")
    done.success(on_step_range, run_id, step, api_name="step_range", **PAGE)
    done.then(on_status, preset_box, status, api_name="status_after_emergence", **PAGE)
    light = {**LIGHT, "show_progress_on": message}
    exported = export.click(on_export_run, run_id, run_file, api_name="export_run", **light)
    tells_refusal(exported, message, "export_refused")
    exported.success(on_run_file_written, None, run_file, api_name="show_run_file", **PAGE)
    opened = opener.upload(on_import_run, opener, outputs, api_name="import_run", **light)
    tells_refusal(opened, message, "import_refused")
    opened.success(on_step_range, run_id, step, api_name="step_range_after_import", **PAGE)
    moved = step.release(
        on_emergence_step, [run_id, step], gallery, api_name="emergence_step", **light
    )
    tells_refusal(moved, message, "emergence_step_refused")
    presses = {
        "run": run.click,
        "export": export.click,
        "import": opener.upload,
        "step": step.release,
    }
    clears(message, {f"emergence_{name}_clears": press for name, press in presses.items()})
    emergence_batch_panel(
        preset_box=preset_box,
        prompt=prompt,
        steps=steps,
        block=block,
        branch=branch,
        words=words,
    )
    return EmergenceControls(block, steps, branch, prompt, examples.dataset, dictionaries)


class RunResults(NamedTuple):
    """A run's results beside the controls, and the buttons that keep and reopen it."""

    image: gr.Image
    plot: gr.Image
    summary: gr.Markdown
    run_id: gr.Textbox
    export: gr.Button
    opener: gr.UploadButton
    run_file: gr.File


def emergence_results() -> RunResults:
    with gr.Row():
        image = gr.Image(
            label="final image", height=256, format="png", scale=1, elem_id="emergence-image"
        )
        plot = gr.Image(
            label="IoU vs t", show_label=False, format="png", scale=2, elem_id="emergence-plot"
        )
    summary = gr.Markdown(label="summary")
    run_id = gr.Textbox(label="run id", interactive=False, elem_id="emergence-run-id")
    with gr.Row():
        export = gr.Button("export run", elem_id="emergence-export")
        opener = gr.UploadButton("open a run file", file_types=[SUFFIX], elem_id="emergence-open")
    run_file = gr.File(  # shown once there is a file: empty, it is a large blank box
        label="run file (safetensors)",
        interactive=False,
        visible=False,
        elem_id="emergence-run-file",
    )
    return RunResults(image, plot, summary, run_id, export, opener, run_file)


def emergence_batch_panel(
    preset_box: gr.Dropdown,
    prompt: gr.Textbox,
    steps: gr.Number,
    block: gr.Dropdown,
    branch: gr.Radio,
    words: gr.Textbox,
) -> None:
    """Every prompt with every seed, at the tab's settings: each step's IoU averaged over the
    runs; progress and refusals show under its button."""
    title = f"batch: several prompts and seeds (at most {MAX_PAGE_RUNS} runs)"
    with gr.Accordion(title, open=False):
        with gr.Row():
            with gr.Column(scale=1):
                seeds = gr.Textbox("0-3", label='seeds, like "0-3" or "0, 1, 2"')
                prompts = gr.Textbox(
                    "", lines=3, label="more prompts, one a line (the tab's prompt runs too)"
                )
                run = gr.Button("run the batch", elem_id="emergence-batch-run")
                message = message_line("emergence-batch-message")
            with gr.Column(scale=2):
                plot = gr.Image(
                    label="mean IoU vs t",
                    show_label=False,
                    format="png",
                    elem_id="emergence-batch-plot",
                )
                summary = gr.Markdown(label="batch summary", elem_id="emergence-batch-summary")
        table = gr.Dataframe(
            headers=TABLE_HEADERS,
            label="IoU per step over every run and word (n: defined IoUs)",
            elem_id="emergence-batch-table",
        )
    inputs = inputs_of(
        on_emergence_batch,
        preset=preset_box,
        prompt=prompt,
        prompts=prompts,
        seeds=seeds,
        steps=steps,
        block=block,
        branch=branch,
        words=words,
    )
    outputs = [plot, table, summary]
    shown = {**MODEL, "show_progress_on": message}
    done = run.click(on_emergence_batch, inputs, outputs, api_name="emergence_batch", **shown)
    tells_refusal(done, message, "emergence_batch_refused")
    clears(message, {"emergence_batch_clears": run.click})
