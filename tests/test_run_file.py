"""An emergence run saved to one file and loaded back, on the shipped tiny preset."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.views.emergence import iou_figure, run_emergence, step_panels
from core.views.model_cache import ModelCache
from core.views.render import figure_image
from core.views.run_file import FORMAT, FORMAT_VERSION, load_run, save_run

UP = "up_blocks.1.attentions.0"
PROMPT = "a red square and a blue star"


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)
    # "circle" is not in the prompt (no cross-attention) and "square" is in no mask (NaN IoUs)
    return run_emergence(ModelCache().get("tiny"), PROMPT, 0, 6, UP, "cond", "circle, star, square")


@pytest.fixture
def saved(result, tmp_path) -> Path:
    return save_run(result, tmp_path / "run.safetensors", "tiny")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def rewritten(path: Path, drop: str = "", **metadata: str) -> Path:
    """A copy of the run file at `path` without the tensor `drop`, with `metadata` changed."""
    with safe_open(path, "pt") as f:
        header = {**f.metadata(), **metadata}
    tensors = {key: tensor for key, tensor in load_file(path).items() if key != drop}
    out = path.with_name(f"changed-{path.name}")
    save_file(tensors, out, metadata=header)
    return out


def test_a_loaded_run_shows_the_same_panels_and_plot(result, saved):
    preset, loaded = load_run(saved)
    assert preset == "tiny" and loaded.notes == result.notes and loaded.ts == result.ts
    assert np.array_equal(pixels(loaded.image), pixels(result.image))
    for index in range(len(result.steps)):
        before, after = step_panels(result, index), step_panels(loaded, index)
        assert [caption for _, caption in after] == [caption for _, caption in before]
        for (image, _), (again, _) in zip(before, after, strict=True):
            assert np.array_equal(pixels(image), pixels(again))
    assert np.isnan(loaded.ious["square"]).all()  # NaN kept, so the plot keeps its gaps
    assert np.array_equal(
        pixels(figure_image(iou_figure(loaded))), pixels(figure_image(iou_figure(result)))
    )


def test_a_script_reads_the_file_with_safetensors_and_json(result, saved):
    with safe_open(saved, "np") as f:
        header = f.metadata()
        run = json.loads(header["run"])
        image = f.get_tensor("image")
        masks = f.get_tensor("predicted_mask/star")
        ious = f.get_tensor("iou/star")
    assert (header["format"], header["format_version"]) == (FORMAT, str(FORMAT_VERSION))
    assert run["words"] == ["circle", "star", "square"] and run["seed"] == 0
    assert run["references"]["circle"] in ("annotation", "last step")
    assert [step["t"] for step in run["steps"]] == result.ts
    assert run["attention"]["missing"] == ["circle"]
    assert image.dtype == np.uint8 and image.shape == (*result.image.size[::-1], 3)
    assert masks.dtype == bool and masks.shape[0] == len(result.steps)
    assert np.allclose(ious, result.ious["star"], equal_nan=True)


def one_sentence(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message.endswith(".") and ". " not in message, message
    return message


def test_a_file_that_is_not_safetensors_is_one_sentence(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("a text file, not a run")
    with pytest.raises(ValueError) as error:
        load_run(path)
    assert one_sentence(error).startswith(
        "The file notes.safetensors is not a run file (not a safetensors"
    )


def test_another_safetensors_file_is_one_sentence(tmp_path):
    path = tmp_path / "sae.safetensors"
    save_file({"W_dec": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError) as error:
        load_run(path)
    assert "is a safetensors file but not an emergence run" in one_sentence(error)


def test_another_format_version_says_both_versions_and_what_to_do(saved):
    with pytest.raises(ValueError) as error:
        load_run(rewritten(saved, format_version="2"))
    assert one_sentence(error).startswith(
        f"This run file was written by format version 2; this app reads version {FORMAT_VERSION}: "
        "re-export it with this app"
    )


@pytest.mark.parametrize(
    ("drop", "metadata", "missing"),
    [("iou/star", {}, "'iou/star'"), ("", {"run": "{}"}, "'words'")],
)
def test_a_file_missing_part_of_the_run_is_one_sentence(saved, drop, metadata, missing):
    with pytest.raises(ValueError) as error:
        load_run(rewritten(saved, drop, **metadata))
    assert one_sentence(error).startswith(
        f"The file changed-run.safetensors is incomplete or altered ({missing} is missing"
    )
