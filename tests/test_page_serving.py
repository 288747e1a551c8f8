"""What every handler of the page shares: GPU time on ZeroGPU, error sentences, inputs
matched to a handler by name."""

import importlib.util
from types import SimpleNamespace

import gradio as gr
import pytest

from core.diffusion.presets import PRESETS
from core.views.inputs import MAX_STEPS
from page import emergence as emergence_page
from page import serving
from page import steer as steer_page


def test_without_the_spaces_package_the_gpu_decorator_changes_nothing():
    if importlib.util.find_spec("spaces") is not None:
        pytest.skip("the spaces package is installed here")

    def handler() -> int:
        return 1

    assert serving.gpu(generations=1)(handler) is handler


def test_zero_gpu_is_asked_for_as_long_as_the_request_needs(monkeypatch):
    asked = {}

    def fake_gpu(duration):
        def decorate(fn):
            asked[fn.__name__] = duration
            return fn

        return decorate

    monkeypatch.setattr(serving, "spaces", SimpleNamespace(GPU=fake_gpu))
    serving.gpu(generations=1)(emergence_page.emergence_result)
    serving.gpu(generations=2)(steer_page.on_steer)
    emergence, steer = asked["emergence_result"], asked["on_steer"]
    few, many = (emergence("tiny", "a cat", 0, n, "b", "cond", "") for n in (5, 10_000))
    assert serving.GPU_LOAD_S < few < many == serving.gpu_seconds(MAX_STEPS, 1) <= serving.GPU_MAX_S
    assert emergence("tiny", "a cat", 0, "1e999", "b", "cond", "") == many
    steps = PRESETS["sd14"].steps
    assert (
        steer("sd14", *[None] * 16) == serving.gpu_seconds(steps, 2) > serving.gpu_seconds(steps, 1)
    )


def test_errors_become_sentences():
    assert serving.sentence(ValueError("the mask is empty; draw one")) == (
        "The mask is empty; draw one."
    )
    assert serving.sentence(KeyError("no SAE for x.")) == "No SAE for x."


def test_inputs_are_matched_to_a_handler_by_name():
    def handler(preset, prompt, seed, progress=None):
        return preset

    boxes = {name: gr.Textbox(label=name) for name in ("preset", "prompt", "seed")}
    shuffled = {"seed": boxes["seed"], "preset": boxes["preset"], "prompt": boxes["prompt"]}
    assert serving.inputs_of(handler, **shuffled) == list(boxes.values())
    with pytest.raises(TypeError, match=r"no component for \['seed'\], no parameter for \[\]"):
        serving.inputs_of(handler, preset=boxes["preset"], prompt=boxes["prompt"])
    with pytest.raises(TypeError, match=r"no parameter for \['steps'\]"):
        serving.inputs_of(handler, **boxes, steps=gr.Number())
