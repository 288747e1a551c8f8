"""What every handler of the page shares: the one model cache, GPU time on ZeroGPU, the
queue settings of events, progress reporting and the error wrapper."""

import functools
import inspect
import math
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gradio as gr

from core.diffusion.presets import PRESETS
from core.runtime import USER_ERRORS
from core.views.inputs import MAX_STEPS
from core.views.model_cache import Loaded, ModelCache

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
argument), so that ZeroGPU's worker process, forked from this one, has it too: handlers read
it as `serving.CACHE`, or through `models`."""


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


@contextmanager
def models(preset: str, progress: gr.Progress) -> Iterator[tuple[Loaded, Callable]]:
    """Hold the model slot with the preset's models, loading them if needed (reported on
    `progress`); yields them and the callback that reports each denoising step."""

    def on_load(name: str) -> None:
        progress(0, desc=f"loading the {name} preset")

    def on_step(done: int, total: int) -> None:
        progress((done, total), desc="denoising", unit="steps")

    with CACHE.using(preset, on_load) as loaded:
        yield loaded, on_step


def inputs_of(handler: Callable, **components: gr.Component) -> list[gr.Component]:
    """`handler`'s input components, each given under the name of its parameter, in the
    order of its parameters: an event's inputs are matched to a handler by name, never by
    position. A parameter with a default (such as `progress`) may have none."""
    parameters = inspect.signature(handler).parameters
    missing = [n for n, p in parameters.items() if n not in components and p.default is p.empty]
    unknown = [name for name in components if name not in parameters]
    if missing or unknown:
        raise TypeError(
            f"{handler.__name__}: no component for {missing}, no parameter for {unknown}"
        )
    return [components[name] for name in parameters if name in components]
