"""Watch concepts emerge inside a text-to-image diffusion model, and steer with them.

    python app.py                       # the offline default preset, on 127.0.0.1:7860
    python app.py --preset sd14 --sd14-saes user/sd14-saes

The user interface only: every computation is in `core.views` (one module per tab), what a
preset's page opens with is in its preset (`core.diffusion.presets.AppDefaults`), and errors a
person can act on become `gr.Error` messages.
"""

import argparse
import functools
import inspect
import math
import os
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import gradio as gr
import numpy as np
import torch

from core.diffusion.presets import (
    PRESETS,
    SD14_SAES_ENV,
    Preset,
    check_preset,
    default_preset_name,
    get_preset,
)
from core.files import REPO_ROOT
from core.quadrants import QUADRANTS
from core.runtime import USER_ERRORS
from core.steer.kinds import KINDS, get_kind
from core.steer.windows import SAE_CHOICES
from core.views import inspection, revelio, timeline
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
from core.views.model_cache import ModelCache
from core.views.render import figure_image, for_display
from core.views.run_file import SUFFIX, load_run, save_run
from core.views.steer import (
    BRANCH_CHOICES,
    STAGE_CHOICES,
    SteerRequest,
    before_image,
    canvas_mask,
    concept_choices,
    default_strength,
    run_steer,
    usable_controls,
)

try:  # ZeroGPU on Hugging Face Spaces: a GPU is attached while a decorated call runs
    import spaces
except ImportError:
    spaces = None

GPU_LOAD_S = 20
"""Seconds to move a preset's weights onto ZeroGPU's GPU, paid once per worker."""
GPU_STEP_S = 0.15
"""Seconds per denoising step with guidance, hooks and SAEs, with a margin: SD v1.4 at
512 px takes about 0.03 s on an H100."""
GPU_MAX_S = 120


def gpu_seconds(steps: int, generations: int | None) -> int:
    """The GPU time to ask ZeroGPU for: loading plus `generations` runs of `steps` steps;
    None asks for the most (a call that may first build an index)."""
    if generations is None:
        return GPU_MAX_S
    return min(GPU_MAX_S, math.ceil(GPU_LOAD_S + generations * steps * GPU_STEP_S))


def gpu_duration(fn: Callable, generations: int | None) -> Callable[..., int]:
    """ZeroGPU's duration function for handler `fn`: it receives `fn`'s arguments and reads
    the steps from its `steps` argument, or else from its preset."""
    signature = inspect.signature(fn)

    def duration(*args, **kwargs) -> int:
        arguments = signature.bind_partial(*args, **kwargs).arguments
        preset = PRESETS.get(arguments.get("preset"))
        steps = arguments.get("steps") or (preset.steps if preset else MAX_STEPS)
        try:
            steps = min(MAX_STEPS, max(1, int(steps)))
        except (TypeError, ValueError, OverflowError):
            steps = MAX_STEPS
        return gpu_seconds(steps, generations)

    return duration


def gpu(generations: int | None) -> Callable[[Callable], Callable]:
    """On ZeroGPU, attach a GPU while the handler runs, for as long as its request needs
    (`generations` image generations); elsewhere the handler unchanged."""

    def decorate(fn: Callable) -> Callable:
        if spaces is None:
            return fn
        return spaces.GPU(duration=gpu_duration(fn, generations))(fn)

    return decorate


PRESET_ENV = "APP_PRESET"
SPACE_ENV = "SPACE_ID"
"""Set by Hugging Face Spaces in a Space's environment."""
MODEL = {"concurrency_id": "model", "concurrency_limit": 1}
"""Every event that runs a model shares one queue slot: one generation at a time."""
LIGHT = {"concurrency_limit": None}
PAGE = {"concurrency_limit": None, "api_visibility": "private"}
"""Events that only update the page (a slider's range, a dropdown's choices): out of the
API, which returns plain values."""
PROGRESS = gr.Progress()
"""The handlers' progress argument; gradio reports through it per request."""
CACHE = ModelCache()
"""The models every handler uses; `build_demo` sets it. A module-level object (not a handler
argument), so that ZeroGPU's worker process, forked from this one, has it too."""
RUNS = EmergenceRuns()
"""The recent emergence results by run id, in this (the server's) process."""

CSS = "#steer-concepts .wrap { max-height: 12em; overflow-y: auto; }"
"""A word may label hundreds of concepts: their list scrolls."""
PROMPT = "a white triangle and a red circle on a teal gradient background"
"""The prompt every tab opens with: a caption of the toy model's shapes world."""
EXAMPLE_PROMPTS = [
    [PROMPT],
    ["a yellow star and a purple triangle on a brown striped background"],
    ["a green square on a navy dotted background"],
    ["a red circle and a blue square on a black plain background"],
]
INTRO = (
    "# Concepts inside a diffusion model\n"
    "Sparse autoencoders (SAEs) on the residual updates of the U-Net's transformer "
    "blocks turn every position of every denoising step into a few concepts. "
    "**emergence**: where each word will appear, predicted from the first steps. "
    "**steer**: move or add a concept during one stage of generation. "
    "**inspect**: what one concept is. "
    "**revelio**: what k-SAEs of pooled image features and PCA maps show per layer."
)
EMERGENCE_RESULTS = (
    "One generation: the final image, each target word's IoU with its reference per step, "
    "and the panels of the step the slider picks."
)
STEER_RESULTS = (
    "The same seed without and with the edit (drag to compare), their difference, what was "
    "edited and how much the image changed."
)
INSPECT_RESULTS = (
    "The concept's dictionary entry, firing statistics and nearest concepts, then its top "
    "examples, its activation on a new generation and its feature icon; **timeline**: the "
    "concept (the word searched for, else the CID) at every step of the new generation."
)
DEEP_LINK = "Copy a link to this page"
"""The deep-link button: the link reopens the page with this session's settings and results
(every component that an event of the session read or wrote) while the server keeps them."""
REVELIO_RESULTS = (
    "**load**: the purity table; **inspect**: one latent's top images; **show PCA maps**: "
    "images beside the maps of their features."
)
REVELIO_ABOUT = (
    "What each U-Net layer and timestep knows about labelled images (Revelio): a feature "
    "cache (`python -m core.revelio.features`), its k-SAEs (`python -m core.revelio.ksae`) "
    "and, for pictures, the image folder the cache was extracted from. **Load** lists their "
    "layers and timesteps "
    "and measures every k-SAE's label purity against chance. The default demo is 120 "
    "shapes-world images through the `tiny` preset, whose weights are random: it shows the "
    "views working, not findings (its purity is at chance)."
)


def sentence(error: BaseException) -> str:
    """An exception's message as one sentence: capitalised, ending with a full stop."""
    text = str(error.args[0]) if error.args else type(error).__name__
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def user_errors(fn: Callable) -> Callable:
    """Turn the core's errors into `gr.Error`s; the server keeps serving either way.

    A refused request (a user error) is one line in the server log; a failed one (a
    RuntimeError, such as running out of memory) its traceback, once. The `gr.Error` itself
    prints nothing, and is raised `from None`, so that no chained traceback follows.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:  # already refused (and logged) by an inner handler
            raise
        except USER_ERRORS as error:
            message = sentence(error)
            print(f"refused {fn.__name__}: {message}", file=sys.stderr, flush=True)
        except RuntimeError as error:
            traceback.print_exception(error)
            message = f"The request failed ({sentence(error)}) Try fewer steps or another preset."
        raise gr.Error(message, print_exception=False) from None

    return wrapper


def progress_hooks(progress: gr.Progress) -> dict:
    """The core's callbacks, reported to the page: loading, then one tick per step."""
    return {
        "on_load": lambda name: progress(0, desc=f"loading the {name} preset"),
        "on_step": lambda done, total: progress((done, total), desc="denoising", unit="steps"),
    }


def shown_path(source: str | Path) -> str:
    """A folder of this repository relative to it (a Hub id or other path as is)."""
    path = Path(source)
    inside = path.is_absolute() and path.is_relative_to(REPO_ROOT)
    return str(path.relative_to(REPO_ROOT)) if inside else str(source)


def results_line(text: str, elem_id: str) -> gr.Markdown:
    """A line above a tab's results saying what they show; the tab's events report progress
    and errors on it (`show_progress_on`), so that a refused request shows its message and
    leaves the results of the last one in place instead of covering each with an error."""
    return gr.Markdown(text, elem_id=elem_id)


def canvas_value(background: np.ndarray) -> dict:
    """An image editor's value with nothing drawn on `background`."""
    return {"background": background, "layers": [], "composite": background}


def blank_canvas(side: int = 256) -> dict:
    """An image editor's value with nothing drawn on a white background."""
    return canvas_value(np.full((side, side, 3), 255, dtype=np.uint8))


# Event handlers: module-level functions over CACHE (see its docstring).


@user_errors
def on_status(preset: str) -> str:
    """What the app has of a preset: loaded (its SAEs and dictionaries), loading, failed
    (why) or loading on first use.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".

    Returns:
        The status, in Markdown.
    """
    check_preset(preset)
    state, why = CACHE.state(preset)
    shown = {
        "loaded": "loaded",
        "loading": "loading in the background: requests wait for it",
        "failed": "could not load; a request tries again",
        "not loaded": "loads on first use",
    }[state]
    lines = [f"**Preset `{preset}`** ({shown}): {PRESETS[preset].app.about}."]
    if why:
        lines.append(f"Why it could not load: {sentence(ValueError(why))}")
    loaded = CACHE.loaded_now(preset)
    if loaded:
        lines.append(
            f"{len(loaded.bank)} SAEs and {len(loaded.dictionaries)} concept dictionaries "
            f"from `{shown_path(loaded.preset.sae_source)}`."
        )
        lines += [f"Note: {note}" for note in loaded.notes]
    return "\n\n".join(lines)


def on_status_tick(preset: str) -> tuple[str, gr.Timer]:
    """The status while the preset loads; the timer stops once it no longer is (page only)."""
    return on_status(preset), gr.Timer(active=CACHE.state(preset)[0] == "loading")


def on_select_preset(preset: str) -> tuple:
    """The status, and the blocks, steps, steering word and inspected CID the preset opens
    with (page only: component updates)."""
    text = on_status(preset)
    chosen = PRESETS[preset]
    app = chosen.app

    def dropdown(block: str) -> gr.Dropdown:
        return gr.Dropdown(choices=list(chosen.hook_points), value=block)

    emergence, steer, inspect = dropdown(app.block), dropdown(app.steer_block), dropdown(app.block)
    steps, word, cid = gr.Number(value=chosen.steps), gr.Textbox(app.word), gr.Number(app.cid)
    return text, emergence, steer, inspect, steps, word, cid


def on_controls(preset: str, *branches_and_by: str) -> tuple:
    """Only the controls the preset can use (page only): the branches it has SAEs and
    guidance for (emergence, steer, inspect), concepts by word only with dictionaries, the
    SAE-per-step choice only with SAEs at several t. Before the preset is loaded, what its
    settings allow; each control keeps its value where that is still offered."""
    check_preset(preset)
    controls = usable_controls(CACHE.preset(preset), CACHE.loaded_now(preset))
    single = [b for b in controls.branches if b != "both"] or ["cond"]
    e_branch, s_branch, by, i_branch = branches_and_by

    def radio(choices: list[str], value: str) -> gr.Radio:
        return gr.Radio(choices=choices, value=value if value in choices else choices[0])

    by_choices = ["word", "CID"] if controls.by_word else ["CID"]
    return (
        radio(single, e_branch),
        radio(list(controls.branches) or ["cond"], s_branch),
        radio(by_choices, by),
        radio(single, i_branch),
        gr.Radio(visible=controls.per_stage),
    )


@gpu(generations=1)
@user_errors
def emergence_result(preset, prompt, seed, steps, block, branch, words, progress):
    """One emergence generation. On ZeroGPU it runs in the GPU worker process, and its result
    comes back to the server's process, where `RUNS` keeps it."""
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        return run_emergence(loaded, prompt, seed, steps, block, branch, words, hooks["on_step"])


@user_errors
def on_emergence(preset, prompt, seed, steps, block, branch, words, progress=PROGRESS):
    """Generate an image and predict, at every denoising step, where each word will appear.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        prompt: the text prompt.
        seed: the generation seed (an integer).
        steps: denoising steps (1 to the app's maximum).
        block: the U-Net block whose SAEs read the residual updates, e.g. "mid_block.attentions.0".
        branch: "cond" or "uncond", the classifier-free guidance branch.
        words: comma-separated target words; empty takes the prompt's nouns.

    Returns:
        The final image, the IoU-per-step plot, the last step's panels, a Markdown summary,
        and the run id, which `emergence_step` takes to show the run's other steps.
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
        f"{len(result.steps)} steps.",
        *[f"- {note}" for note in result.notes],
        "- Panels per word: the predicted mask outlined in red on the final image, the "
        "reference mask it is scored against in blue, the similarity of each position's most "
        "active concept with the word (grey: it has no label, or none fires), and the word's "
        "cross-attention (DAAM-style baseline) as a share of the step's peak.",
    ]
    return "\n".join(lines)


@user_errors
def on_emergence_step(run_id: str, index: float) -> list:
    """The panels of one step of an emergence run.

    Args:
        run_id: the run id that `emergence` returned (the server keeps its recent runs).
        index: the step, 0 (the first, noisiest) to the number of steps minus 1.

    Returns:
        Per target word: its predicted mask on the final image, its concept-similarity map and
        its cross-attention map at that step.
    """
    return step_panels(RUNS.get(run_id), index)


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
        block: the U-Net block whose SAEs read the residual updates.
        branch: "cond" or "uncond", the classifier-free guidance branch.
        words: comma-separated target words; empty takes each prompt's nouns.

    Returns:
        The mean IoU vs t over every run and word, with a band of one standard deviation, of
        the SAE prediction (solid) and of cross-attention (dashed); a table with, per step,
        each one's mean, standard deviation and number of defined IoUs; and a one-line
        summary.
    """
    prompts, seeds = page_batch(prompt, prompts, seeds)
    hooks = progress_hooks(progress)

    def on_run(done: int, total: int, _) -> None:
        progress((done, total), desc="emergence runs", unit="runs")

    with CACHE.using(preset, hooks["on_load"]) as loaded:
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
        The run file: safetensors, with the final image, every step's masks and maps and the
        IoUs as tensors and the run's settings as JSON metadata (the format is documented in
        core/views/run_file.py).
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
        As `emergence`: the final image, the IoU-per-step plot, the last step's panels, a
        Markdown summary, and the run id, which `emergence_step` and `export_run` take.
    """
    if not file:
        raise ValueError("Choose a run file (.safetensors) that the emergence tab exported.")
    return emergence_outputs(*load_run(file))


@user_errors
def on_step_range(run_id: str) -> gr.Slider:
    """The step slider over the run's steps, at its last (page only)."""
    last = len(RUNS.get(run_id).steps) - 1
    return gr.Slider(maximum=last, value=last)


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
        The strength that `steer` takes, or None.
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
        block: the U-Net block whose SAE edits the residual updates.
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
        The images before and after, the difference map (grey levels 0-255), a few lines
        (the steps edited with which SAE and concepts, and those skipped and why; how much
        the image changed; for a spatial edit, whether the object's centre of mass is in the
        region before and after), and metrics.
    """
    by_word = concept_by == "word"
    concept = {
        "word": word if by_word else "",
        "keep": tuple(concepts or ()) if by_word else (),
        "cid": cid,
        "cid_t": cid_t,
    }
    drawn = get_kind(kind).needs_region and region_by == "drawn"
    region = {"quadrant": quadrant, "mask": drawn_region(canvas) if drawn else None}
    request = SteerRequest(
        prompt,
        seed,
        block,
        kind,
        stage,
        (t_min, t_max),
        strength,
        branch,
        **concept,
        **region,
        sae_choice=sae_choice,
    )
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        result = run_steer(loaded, request, hooks["on_step"])
    pair = (for_display(result.before), for_display(result.after))
    return pair, result.difference, result.summary(), result.metrics


@gpu(generations=0)
@user_errors
def on_steer_concepts(preset, block, branch, word, progress=PROGRESS):
    """The concepts labelled with a word that a steer by word edits, to narrow it to some.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the U-Net block whose SAEs edit.
        branch: "cond", "uncond" or "both".
        word: the concept's word.

    Returns:
        One entry per concept (per SAE t and branch): its label (t, branch, CID and its
        labels) and the value that `steer` takes in `concepts`.
    """
    with CACHE.using(preset, progress_hooks(progress)["on_load"]) as loaded:
        choices = concept_choices(loaded, block, branch, word)
    return [{"label": label, "value": value} for label, value in choices]


def on_concept_list(found: list[dict]) -> gr.CheckboxGroup:
    """The word's concepts as ticked boxes (page only)."""
    choices = [(entry["label"], entry["value"]) for entry in found]
    return gr.CheckboxGroup(choices=choices, value=[value for _, value in choices])


def on_ticked(values: list[str]) -> list[str]:
    """The ticked concepts, as the value `steer` takes (page only: the API takes a list that
    a check box group, whose choices a page fills, would refuse)."""
    return values


def on_concepts_stale() -> gr.CheckboxGroup:
    """A changed word, block or branch empties the list of its concepts (page only)."""
    return gr.CheckboxGroup(choices=[], value=[])


@gpu(generations=1)
@user_errors
def on_canvas_image(preset, prompt, seed, progress=PROGRESS):
    """The unsteered image on the canvas, to draw the region over it (page only)."""
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        image = before_image(loaded, prompt, seed, hooks["on_step"])
    return canvas_value(np.asarray(for_display(image).convert("RGB")))


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
        block: the U-Net block of the SAE, e.g. "mid_block.attentions.0".
        t: the SAE's timestep in [0, 1].
        branch: "cond" or "uncond".
        word: the word to look for among the concepts' labels.

    Returns:
        The matching concepts (each its CID and labels), the best CID and how they were found.
    """
    with CACHE.using(preset, progress_hooks(progress)["on_load"]) as loaded:
        found, how = inspection.search(loaded, block, t, branch, word)
    matches = [{"cid": cid, "labels": labels} for cid, labels in found]
    return matches, found[0][0], f"Found: {how}."


@gpu(generations=0)
@user_errors
def on_inspect_concept(preset, block, t, branch, cid, progress=PROGRESS):
    """What one SAE concept is: its dictionary entry, statistics and nearest concepts.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the U-Net block of the SAE, e.g. "mid_block.attentions.0".
        t: the SAE's timestep in [0, 1] (1.0: the first denoising step).
        branch: "cond" or "uncond".
        cid: the concept id (the SAE latent's index).

    Returns:
        The dictionary entry (labels and their weights), activation statistics, the nearest
        concepts by decoder direction, and a one-line note.
    """
    with CACHE.using(preset, progress_hooks(progress)["on_load"]) as loaded:
        card = inspection.concept_card(loaded, block, t, branch, cid)
    notes = "; ".join(card.notes) or f"CID {card.cid} of the SAE at t={card.key.t}"
    return card.entry, card.stats, card.nearest, notes


@gpu(generations=None)
@user_errors
def on_top_examples(preset, block, t, branch, cid, progress=PROGRESS):
    """The images a concept fires on most, with its activation map over each.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the U-Net block of the SAE, e.g. "mid_block.attentions.0".
        t: the SAE's timestep in [0, 1].
        branch: "cond" or "uncond".
        cid: the concept id.

    Returns:
        A gallery of (image, caption) pairs and a one-line note on the example index used.
    """
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        panels, note = inspection.top_examples(
            loaded, block, t, branch, cid, on_step=hooks["on_step"]
        )
    return panels, note


@gpu(generations=1)
@user_errors
def on_activation_map(preset, block, t, branch, cid, prompt, seed, progress=PROGRESS):
    """Where a concept fires when a prompt of your choice is generated.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the U-Net block of the SAE, e.g. "mid_block.attentions.0".
        t: the SAE's timestep in [0, 1]; the map is read at the step nearest to it.
        branch: "cond" or "uncond".
        cid: the concept id.
        prompt: the prompt to generate.
        seed: the generation seed.

    Returns:
        The generated image with the concept's activation map over it, and a note.
    """
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        return inspection.activation_on(
            loaded, block, t, branch, cid, prompt, seed, hooks["on_step"]
        )


@gpu(generations=1)
@user_errors
def on_timeline(preset, block, t, branch, cid, word, prompt, seed, progress=PROGRESS):
    """How strongly a concept fires at every denoising step of one generation.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the U-Net block whose SAEs read the residual updates, e.g.
            "mid_block.attentions.0".
        t: the timestep in [0, 1] of the SAE that `cid` belongs to; that SAE reads every step.
        branch: "cond" or "uncond".
        cid: the concept id, used when `word` is empty.
        word: a concept label; each step sums its CIDs in the SAE trained nearest to the
            step's t. Empty: follow `cid`.
        prompt: the prompt to generate.
        seed: the generation seed.

    Returns:
        The filmstrip (the concept's activation map at each step, t from 1 to 0, on one fixed
        scale with its colour bar), the plot of its mean and max activation against t, and a
        line saying which SAE read which steps, which were skipped and the scale.
    """
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        found = timeline.concept_timeline(
            loaded, block, branch, prompt, seed, word, cid, t, hooks["on_step"]
        )
    strength = figure_image(timeline.strength_figure(found))
    return timeline.filmstrip(found), strength, found.summary()


@gpu(generations=1)
@user_errors
def on_feature_icon(preset, block, t, branch, cid, strength, seed, progress=PROGRESS):
    """The concept's icon: an image generated from the empty prompt with the concept added.

    Args:
        preset: the model preset, e.g. "toy", "tiny" or "sd14".
        block: the U-Net block of the SAE, e.g. "mid_block.attentions.0".
        t: the SAE's timestep in [0, 1].
        branch: "cond" or "uncond".
        cid: the concept id.
        strength: how strongly the concept is added (the SAE latent's value).
        seed: the generation seed.

    Returns:
        The generated image.
    """
    hooks = progress_hooks(progress)
    with CACHE.using(preset, hooks["on_load"]) as loaded:
        icon = inspection.feature_icon(
            loaded, block, t, branch, cid, strength, seed, hooks["on_step"]
        )
    return for_display(icon)


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
    """Open a Revelio feature cache and its k-SAEs and measure every k-SAE's label purity.

    Args:
        cache: folder of a feature cache (`python -m core.revelio.features`).
        saes: folder of its k-SAEs (`python -m core.revelio.ksae`); may be empty.

    Returns:
        A note on what was found and the purity table (one row per layer and timestep).
    """
    found = revelio.contents(cache, saes)
    meta = found.meta
    note = (
        f"{len(meta)} images of {len(meta.classes)} classes ({', '.join(meta.classes)}), "
        f"features of `{meta.model}`; k-SAEs for {len(found.ksae_pairs)} (layer, timestep) "
        f"pairs, feature maps for {len(found.map_pairs)}."
    )
    rows = revelio.purity_table(cache, saes) if found.saes else []
    return note, rows


@user_errors
def on_revelio_choices(cache: str, saes: str) -> list[gr.Dropdown]:
    """The layer and timestep dropdowns of both views, over what the folders hold (page
    only)."""
    return [
        gr.Dropdown(choices=c, value=v) for c, v in revelio_choices(revelio.contents(cache, saes))
    ]


@user_errors
def on_revelio_inspect(cache, saes, images, layer, timestep, by, number) -> tuple:
    """One k-SAE latent of a layer and timestep: its top images and their labels.

    Args:
        cache: folder of the feature cache.
        saes: folder of its k-SAEs.
        images: the image folder the cache was extracted from (for pictures); may be empty.
        layer: the U-Net layer, e.g. "up_blocks.1".
        timestep: the diffusion timestep the features were extracted at.
        by: "purest" (`number` is a rank among the purest latents, 0 the purest) or "id"
            (`number` is the latent's index).
        number: the rank or the latent's index.

    Returns:
        A note, a grid of the latent's top images, and a table of their labels.
    """
    view = revelio.inspect_latent(cache, saes, images, layer, timestep, by, number)
    return view.note, view.grid, view.rows


@user_errors
def on_revelio_pca(cache, images, layer, timestep, indices) -> list:
    """PCA maps of a layer's spatial features: the first three components as colours.

    Args:
        cache: folder of the feature cache (with feature maps).
        images: the image folder the cache was extracted from.
        layer: the U-Net layer, e.g. "up_blocks.1".
        timestep: the diffusion timestep the features were extracted at.
        indices: comma-separated image indices to show; empty picks some of each class.

    Returns:
        A gallery of (image, PCA map) panels.
    """
    return revelio.pca_view(cache, images, layer, timestep, indices)


# The page: one builder per tab, each laying out its components and wiring its own events.


def block_dropdown(preset: Preset, block: str) -> gr.Dropdown:
    """The preset's hook points. Other values pass, so that an API client can name another
    preset's blocks; the core checks a block against the preset named with it."""
    return gr.Dropdown(
        list(preset.hook_points), value=block, label="block", allow_custom_value=True
    )


def emergence_tab(
    preset_box: gr.Dropdown, status: gr.Markdown, preset: Preset
) -> tuple[gr.Dropdown, gr.Number, gr.Radio]:
    """Generate once; where each word will be at every step. Returns (block, steps, branch)."""
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(PROMPT, label="prompt")
            with gr.Row():
                seed = gr.Number(0, label="seed")
                steps = gr.Number(preset.steps, label=f"steps (1 to {MAX_STEPS})")
            block = block_dropdown(preset, preset.app.block)
            branch = gr.Radio(["cond", "uncond"], value="cond", label="branch")
            words = gr.Textbox(
                "", label="target words (comma-separated; empty: the prompt's nouns)"
            )
            run = gr.Button("generate and predict", variant="primary", elem_id="emergence-run")
            gr.Examples(EXAMPLE_PROMPTS, [prompt])
        with gr.Column(scale=2):
            line = results_line(EMERGENCE_RESULTS, "emergence-line")
            with gr.Row():
                image = gr.Image(
                    label="final image",
                    height=256,
                    format="png",
                    scale=1,
                    elem_id="emergence-image",
                )
                plot = gr.Image(
                    label="IoU vs t",
                    show_label=False,
                    format="png",
                    scale=2,
                    elem_id="emergence-plot",
                )
            summary = gr.Markdown(label="summary")
            run_id = gr.Textbox(label="run id", interactive=False, elem_id="emergence-run-id")
            with gr.Row():
                export = gr.Button("export run", elem_id="emergence-export")
                opener = gr.UploadButton(
                    "open a run file", file_types=[SUFFIX], elem_id="emergence-open"
                )
            run_file = gr.File(  # shown once there is a file: empty, it is a large blank box
                label="run file (safetensors)",
                interactive=False,
                visible=False,
                elem_id="emergence-run-file",
            )
    step = gr.Slider(  # any run's steps: the server checks API calls against this range
        0, MAX_STEPS - 1, 0, step=1, label="step (0 = first, noisiest)", elem_id="emergence-step"
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
    inputs = [preset_box, prompt, seed, steps, block, branch, words]
    outputs = [image, plot, gallery, summary, run_id]
    done = run.click(
        on_emergence, inputs, outputs, api_name="emergence", show_progress_on=line, **MODEL
    )
    done.success(on_step_range, run_id, step, api_name="step_range", **PAGE)
    done.then(on_status, preset_box, status, api_name="status_after_emergence", **PAGE)
    light = {**LIGHT, "show_progress_on": line}
    exported = export.click(on_export_run, run_id, run_file, api_name="export_run", **light)
    exported.success(on_run_file_written, None, run_file, api_name="show_run_file", **PAGE)
    opened = opener.upload(on_import_run, opener, outputs, api_name="import_run", **light)
    opened.success(on_step_range, run_id, step, api_name="step_range_after_import", **PAGE)
    step.release(on_emergence_step, [run_id, step], gallery, api_name="emergence_step", **light)
    emergence_batch_panel(preset_box, prompt, steps, block, branch, words, line)
    return block, steps, branch


def emergence_batch_panel(
    preset_box: gr.Dropdown,
    prompt: gr.Textbox,
    steps: gr.Number,
    block: gr.Dropdown,
    branch: gr.Radio,
    words: gr.Textbox,
    line: gr.Markdown,
) -> None:
    """Every prompt with every seed, at the tab's settings: each step's IoU averaged over the
    runs. Progress and errors show on the tab's results `line`."""
    title = f"batch: several prompts and seeds (at most {MAX_PAGE_RUNS} runs)"
    with gr.Accordion(title, open=False):
        with gr.Row():
            with gr.Column(scale=1):
                seeds = gr.Textbox("0-3", label='seeds, like "0-3" or "0, 1, 2"')
                prompts = gr.Textbox(
                    "", lines=3, label="more prompts, one a line (the tab's prompt runs too)"
                )
                run = gr.Button("run the batch", elem_id="emergence-batch-run")
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
    inputs = [preset_box, prompt, prompts, seeds, steps, block, branch, words]
    run.click(
        on_emergence_batch,
        inputs,
        [plot, table, summary],
        api_name="emergence_batch",
        show_progress_on=line,
        **MODEL,
    )


class SteerControls(NamedTuple):
    """The steer tab's controls that follow the preset."""

    block: gr.Dropdown
    word: gr.Textbox
    branch: gr.Radio
    by: gr.Radio
    sae_choice: gr.Radio


def steer_tab(preset_box: gr.Dropdown, preset: Preset) -> SteerControls:
    """Generate without and with a concept edited in, from one seed."""
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(PROMPT, label="prompt")
            seed = gr.Number(0, label="seed")
            block = block_dropdown(preset, preset.app.steer_block)
            branch = gr.Radio(
                list(BRANCH_CHOICES), value="cond", label="branch", elem_id="steer-branch"
            )
            by = gr.Radio(["word", "CID"], value="word", label="concept by")
            word, concepts = steer_concepts(preset_box, preset, block, branch)
            with gr.Row():
                cid = gr.Number(0, label="CID", precision=0)
                cid_t = gr.Slider(0, 1, 1.0, step=0.05, label="the CID's SAE: the one nearest t")
            edit = steer_edit(preset_box, preset)
            region = steer_region(preset_box, prompt, seed)
            run = gr.Button("generate before and after", variant="primary", elem_id="steer-run")
        with gr.Column(scale=1):
            line = results_line(STEER_RESULTS, "steer-line")
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
    inputs = [
        preset_box,
        prompt,
        seed,
        block,
        branch,
        by,
        word,
        concepts,
        cid,
        cid_t,
        *edit,
        *region,
    ]
    outputs = [pair, difference, edits, metrics]
    run.click(on_steer, inputs, outputs, api_name="steer", show_progress_on=line, **MODEL)
    return SteerControls(block, word, branch, by, edit[-1])


def steer_concepts(
    preset_box: gr.Dropdown, preset: Preset, block: gr.Dropdown, branch: gr.Radio
) -> tuple[gr.Textbox, gr.JSON]:
    """The concept's word and, listed on request, its concepts to narrow the edit to (the
    ticked ones, as a list)."""
    with gr.Row():
        word = gr.Textbox(preset.app.word, label="word", scale=2)
        listing = gr.Button("list its concepts", scale=1, elem_id="steer-list")
    concepts = gr.CheckboxGroup(
        [],
        label="edit only the ticked concepts of the word (none listed or ticked: all of them)",
        elem_id="steer-concepts",
    )
    found = gr.JSON(label="the word's concepts", visible="hidden")
    ticked = gr.JSON([], label="the ticked concepts", visible="hidden")
    concepts.change(on_ticked, concepts, ticked, api_name="ticked", **PAGE)
    listing.click(
        on_steer_concepts,
        [preset_box, block, branch, word],
        found,
        api_name="steer_concepts",
        **MODEL,
    ).success(on_concept_list, found, concepts, api_name="concept_list", **PAGE)
    gr.on(
        [word.change, block.change, branch.change],
        on_concepts_stale,
        None,
        concepts,
        api_name="concepts_stale",
        **PAGE,
    )
    return word, ticked


def steer_edit(preset_box: gr.Dropdown, preset: Preset) -> list:
    """The edit's type, stage (or t range), strength (which follows the preset's default) and
    the SAE each step edits with."""
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
    gr.on(
        [preset_box.change, kind.change, stage.change, t_min.release, t_max.release],
        on_default_strength,
        [preset_box, kind, stage, t_min, t_max],
        strength,
        api_name="default_strength",
        **LIGHT,
    )
    stage.change(on_stage, stage, t_range, api_name="stage_range", **PAGE)
    sae_choice = gr.Radio(
        list(SAE_CHOICES),
        value="stage",
        label="SAE per edited step: the stage's (t = 1.0, 0.5, 0.0) or the nearest to its t",
    )
    return [kind, stage, t_min, t_max, strength, sae_choice]


def steer_region(preset_box: gr.Dropdown, prompt: gr.Textbox, seed: gr.Number) -> list:
    """Where a spatial edit acts: a quadrant, or a region drawn on the canvas over the image
    to edit (a button puts it there)."""
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
    show.click(
        on_canvas_image,
        [preset_box, prompt, seed],
        canvas,
        api_name="canvas_image",
        **{**MODEL, "api_visibility": "private"},
    )
    return [region_by, quadrant, canvas]


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


def inspect_tab(preset_box: gr.Dropdown, preset: Preset) -> tuple[gr.Dropdown, gr.Radio, gr.Number]:
    """One concept of one SAE, found by CID or by word. Returns the block, branch and CID."""
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
            prompt = gr.Textbox(PROMPT, label="new generation")
            with gr.Row():
                seed = gr.Number(0, label="seed")
                icon_strength = gr.Number(10.0, label="icon strength")
            run = gr.Button("inspect", variant="primary", elem_id="inspect-run")
            follow = gr.Button("timeline", elem_id="inspect-timeline")
        with gr.Column(scale=2):
            line = results_line(INSPECT_RESULTS, "inspect-line")
            views = concept_views()
    matches = gr.JSON(label="concepts matching the word", visible="hidden")
    runs = gr.State(0)  # inspections asked for: each change runs `show_concept`'s chain
    run.click(on_request_inspect, runs, runs, api_name="request_inspect", **PAGE)
    search.click(
        on_search_concepts,
        [preset_box, block, t, branch, word],
        [matches, cid, views.note],
        api_name="search_concepts",
        show_progress_on=line,
        **MODEL,
    ).success(on_found, [matches, runs], [found, runs], api_name="show_found", **PAGE)
    found.input(on_pick_concept, [found, runs], [cid, runs], api_name="pick_concept", **PAGE)
    show_concept(
        runs, [preset_box, block, t, branch, cid], prompt, seed, icon_strength, views, line
    )
    follow.click(
        on_timeline,
        [preset_box, block, t, branch, cid, word, prompt, seed],
        [views.strip, views.strength, views.timeline_note],
        api_name="timeline",
        show_progress_on=line,
        **MODEL,
    )
    return block, branch, cid


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
    key: list,
    prompt: gr.Textbox,
    seed: gr.Number,
    icon_strength: gr.Number,
    views: ConceptViews,
    line: gr.Markdown,
) -> None:
    """On each new inspection: the card, then top examples, activation map and feature icon,
    each only if the one before succeeded; progress and errors show on `line`."""
    model = {**MODEL, "show_progress_on": line}
    outputs = [views.entry, views.stats, views.nearest, views.note]
    shown = runs.change(on_inspect_concept, key, outputs, api_name="inspect_concept", **model)
    outputs = [views.examples, views.examples_note]
    shown = shown.success(on_top_examples, key, outputs, api_name="top_examples", **model)
    inputs, outputs = [*key, prompt, seed], [views.overlay, views.heat, views.caption]
    shown = shown.success(on_activation_map, inputs, outputs, api_name="activation_map", **model)
    inputs = [*key, icon_strength, seed]
    shown.success(on_feature_icon, inputs, views.icon, api_name="feature_icon", **model)


def revelio_tab() -> None:
    """A feature cache's k-SAEs and PCA maps (model-free, so outside the model slot)."""
    gr.Markdown(REVELIO_ABOUT)
    with gr.Row():
        cache = gr.Textbox(shown_path(revelio.DEMO_CACHE), label="feature cache")
        saes = gr.Textbox(shown_path(revelio.DEMO_SAES), label="k-SAE folder")
        images = gr.Textbox(shown_path(revelio.DEMO_IMAGES), label="image folder (optional)")
    load = gr.Button("load", variant="primary", elem_id="revelio-load")
    line = results_line(REVELIO_RESULTS, "revelio-line")
    light = {**LIGHT, "show_progress_on": line}
    note = gr.Markdown(label="note", elem_id="revelio-note")
    table = gr.Dataframe(
        headers=revelio.PURITY_HEADERS,
        label="label purity of the most activating latents (top 10 images each), and the same "
        "measures on random images",
        elem_id="revelio-table",
    )
    choices = revelio_choices(revelio_demo_contents())
    ksae = ksae_latent_panel(cache, saes, images, choices[:2], light)
    maps = pca_panel(cache, images, choices[2:], light)
    loaded = load.click(
        on_revelio_load, [cache, saes], [note, table], api_name="revelio_load", **light
    )
    loaded.success(
        on_revelio_choices, [cache, saes], [*ksae, *maps], api_name="revelio_choices", **PAGE
    )


def pair_dropdowns(choices: list[tuple[list, object]], layer_label: str) -> list[gr.Dropdown]:
    """The layer and timestep dropdowns of a panel; `load` replaces their choices."""
    labels = (layer_label, "timestep")
    return [
        gr.Dropdown(options, value=value, label=label, allow_custom_value=True)
        for (options, value), label in zip(choices, labels, strict=True)
    ]


def ksae_latent_panel(
    cache: gr.Textbox, saes: gr.Textbox, images: gr.Textbox, choices: list, light: dict
) -> list[gr.Dropdown]:
    """One k-SAE latent's top images (its event's settings `light`); returns its layer and
    timestep dropdowns."""
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### k-SAE latent")
            layer, timestep = pair_dropdowns(choices, "layer")
            by = gr.Radio(["purest", "id"], value="purest", label="latent by")
            number = gr.Number(0, precision=0, label="rank among the purest (0 = purest), or id")
            inspect = gr.Button("inspect", variant="primary", elem_id="revelio-inspect")
        with gr.Column(scale=2):
            note = gr.Markdown(label="note", elem_id="revelio-latent-note")
            grid = gr.Image(label="top-activating images", format="png", elem_id="revelio-grid")
            top = gr.Dataframe(headers=revelio.TOP_IMAGE_HEADERS, label="its top images")
    inspect.click(
        on_revelio_inspect,
        [cache, saes, images, layer, timestep, by, number],
        [note, grid, top],
        api_name="revelio_inspect",
        **light,
    )
    return [layer, timestep]


def pca_panel(
    cache: gr.Textbox, images: gr.Textbox, choices: list, light: dict
) -> list[gr.Dropdown]:
    """Images beside the PCA maps of their features (its event's settings `light`); returns
    its layer and timestep dropdowns."""
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### PCA maps of features")
            layer, timestep = pair_dropdowns(choices, "layer (with maps)")
            indices = gr.Textbox(
                "", label='images (indices like "0-7, 12"; empty: the first of each class)'
            )
            run = gr.Button("show PCA maps", variant="primary", elem_id="revelio-pca-run")
        with gr.Column(scale=2):
            maps = gr.Gallery(
                label="image | its PCA map (one PCA over all shown: colours compare)",
                columns=4,
                height=640,
                format="png",
                elem_id="revelio-pca",
            )
    inputs = [cache, images, layer, timestep, indices]
    run.click(on_revelio_pca, inputs, maps, api_name="revelio_pca", **light)
    return [layer, timestep]


def build_demo(cache: ModelCache, preset: str) -> gr.Blocks:
    """The page: the preset and its status, then one tab per view."""
    global CACHE
    CACHE = cache
    opening = PRESETS[preset]
    with gr.Blocks(title="Concept emergence and steering") as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            preset_box = gr.Dropdown(list(PRESETS), value=preset, label="preset", scale=1)
            status = gr.Markdown(label="status", elem_id="status")
            gr.DeepLinkButton(DEEP_LINK, "Link copied", size="sm", scale=0, min_width=200)
        with gr.Tab("emergence"):
            e_block, e_steps, e_branch = emergence_tab(preset_box, status, opening)
        with gr.Tab("steer"):
            steer = steer_tab(preset_box, opening)
        with gr.Tab("inspect"):
            i_block, i_branch, i_cid = inspect_tab(preset_box, opening)
        with gr.Tab("revelio"):
            revelio_tab()
        controls = [e_branch, steer.branch, steer.by, i_branch]
        follow = (on_controls, [preset_box, *controls], [*controls, steer.sae_choice])
        demo.load(on_status, preset_box, status, api_name="status", **LIGHT).then(
            *follow, api_name="controls", **PAGE
        )
        ticks = gr.Timer(1.0)  # while the preset loads in the background
        ticks.tick(
            on_status_tick, preset_box, [status, ticks], api_name="status_tick", **PAGE
        ).then(*follow, api_name="tick_controls", **PAGE)
        preset_box.change(
            on_select_preset,
            preset_box,
            [status, e_block, steer.block, i_block, e_steps, steer.word, i_cid],
            api_name="select_preset",
            **PAGE,
        ).then(*follow, api_name="preset_controls", **PAGE)
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
    p.add_argument(
        "--mcp-server",
        action=argparse.BooleanOptionalAction,
        default=bool(os.environ.get(SPACE_ENV)),
        help="also serve the model events as tools to MCP clients at /gradio_api/mcp/ "
        f"(default: on in a Hugging Face Space, where {SPACE_ENV} is set; off elsewhere)",
    )
    return p.parse_args(argv)


def preload(cache: ModelCache, preset: str) -> None:
    """Load the first preset in the background once the page is served (the model libraries
    are imported here, not before), so that neither the page nor the first request waits."""
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
    demo.queue(max_size=64).launch(
        server_name=args.host,
        server_port=args.port,
        mcp_server=args.mcp_server,
        css=CSS,
        prevent_thread_lock=True,  # serve the page first, then load the preset
    )
    if not args.no_preload:
        threading.Thread(target=preload, args=(cache, args.preset), daemon=True).start()
    demo.block_thread()


if __name__ == "__main__":
    main()
