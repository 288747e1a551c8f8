"""Concept dictionaries built on first use for SAEs published without them, on a stand-in for
sdxl-turbo: a small SDXL-layout pipeline saved with `save_pretrained`, SAEs in SDLens's
folder layout (read back with `weights_only=True`), a labeller that finds a circle
everywhere; nothing is downloaded."""

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from core.annotate.annotation import ObjectAnnotation
from core.annotate.labellers import LABELLERS, Labeller, register
from core.diffusion.presets import get_preset
from core.diffusion.tiny import build_tiny_sdxl_pipeline
from core.emergence.parts import PartedBuild, Plan
from core.emergence.words import BUNDLED_GLOVE
from core.views import dictionary_build, dictionary_cache
from core.views.dictionary_build import (
    GPU_CPU_RATIO,
    build_part,
    estimate_seconds,
    finish_build,
    first_use_plan,
    parted_build,
)
from core.views.emergence import run_emergence
from core.views.model_cache import NO_DICTIONARIES, ModelCache
from core.views.steer import SteerRequest, run_steer
from page import serving
from page.dictionaries import minutes, on_build_dictionaries, on_dictionary_plan
from page.emergence import ONE_STEP_LABEL, on_emergence, on_step_range
from page.inspect import on_timeline
from tests.helpers import write_sdlens_bank

PROMPTS = ["a red circle", "a blue circle", "a circle on a table", "a big circle", "a circle"]
BLOCKS = dict.fromkeys(get_preset("sdxl-turbo").hook_points, 64)  # the stand-in's widths


class Everywhere:
    """Finds `label` over the whole image (or nothing, where `label` is empty)."""

    def __init__(self, label: str) -> None:
        self.label = label

    def annotate(self, image, prompt=None) -> list[ObjectAnnotation]:
        mask = np.ones(image.size[::-1], dtype=bool)
        return [ObjectAnnotation(self.label, mask, 1.0)] if self.label else []


def labeller(name: str, label: str) -> Labeller:
    toy = LABELLERS["toy"]
    return Labeller(
        name,
        annotator=lambda config, device: Everywhere(label),
        reference=lambda config, device: Everywhere(label),
        segmenter=toy.segmenter,
        evaluator="the whole image",
        scorer=toy.scorer,
        world=toy.world,
    )


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("stand-in")
    build_tiny_sdxl_pipeline().save_pretrained(root / "pipeline")
    write_sdlens_bank(root / "saes", BLOCKS)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    register(labeller("circles", "circle"))
    register(labeller("nothing", ""))
    yield root
    del LABELLERS["circles"], LABELLERS["nothing"]


@pytest.fixture
def cache(stand_in, tmp_path, monkeypatch) -> Iterator:
    """A model cache serving the stand-in as sdxl-turbo, its dictionaries cached in tmp_path,
    in parts of two prompts; returns a function that makes it (one per app start)."""
    monkeypatch.setattr(dictionary_cache, "CACHE_ROOT", tmp_path / "hf-home")
    monkeypatch.setattr(dictionary_build, "PART_SIZE", 2)

    def start(annotator: str = "circles", **changes) -> ModelCache:
        preset = get_preset(
            "sdxl-turbo",
            model=str(stand_in / "pipeline"),
            sae_source=str(stand_in / "saes"),
            resolution=32,
            word_vectors=BUNDLED_GLOVE,
            annotator=annotator,
            prompts=str(stand_in / "prompts.txt"),
            **changes,
        )
        return ModelCache(device="cpu", presets={"sdxl-turbo": preset})

    yield start


def test_sdlens_saes_without_dictionaries_load_for_every_step_and_say_so(cache):
    loaded = cache().get("sdxl-turbo")
    assert sorted(k.block for k in loaded.bank) == sorted(BLOCKS)
    assert {(k.t, k.branch) for k in loaded.bank} == {(None, "cond")}  # one SAE for every step
    assert not loaded.dictionaries
    assert loaded.notes[0].startswith(NO_DICTIONARIES)
    plan = first_use_plan(loaded)
    assert plan.prompts == tuple(PROMPTS) and plan.num_parts == 3 and plan.steps == 1
    assert not dictionary_cache.cache_folder(loaded.preset).exists()  # nothing written yet


def test_a_first_use_build_is_kept_resumed_and_reused_on_the_next_start(cache, monkeypatch):
    with cache().using("sdxl-turbo") as loaded:
        build_part(loaded, 0)  # then the app stops
    with cache().using("sdxl-turbo") as loaded:  # the next start goes on
        parts = parted_build(loaded)
        assert parts.done() == [0] and parts.remaining() == [1, 2]
        assert parts.seconds_per_part() > 0
        for index in parts.remaining():
            build_part(loaded, index)
        assert finish_build(loaded) == len(PROMPTS)  # one circle per image
        assert set(loaded.dictionaries) == set(loaded.bank)
        assert not any(note.startswith(NO_DICTIONARIES) for note in loaded.notes)
    folder = dictionary_cache.cache_folder(loaded.preset)
    assert (folder / "README.md").is_file() and not (folder / "parts").exists()

    def no_build(*args, **kwargs):
        raise AssertionError("a start with cached dictionaries built them again")

    monkeypatch.setattr(PartedBuild, "build", no_build)
    with cache().using("sdxl-turbo") as loaded:  # a later start reads them
        assert set(loaded.dictionaries) == set(loaded.bank)
        block = "up_blocks.0.attentions.1"
        assert loaded.dictionaries.word_cids("circle", block, ["cond"])
        result = run_emergence(loaded, "a red circle", 0, 1, block, "cond", "circle")
        assert result.words == ["circle"] and len(result.ious["circle"]) == 1


def test_the_page_builds_them_part_by_part_and_then_hides_the_panel(cache, monkeypatch):
    models = cache()
    monkeypatch.setattr(serving, "CACHE", models)
    models.get("sdxl-turbo")
    panel, about = on_dictionary_plan("sdxl-turbo")
    assert panel.visible is True
    assert "generates the first 5 prompts" in about and "in 3 parts" in about
    assert "measured on the first part" in about
    text = on_build_dictionaries("sdxl-turbo", progress=lambda *a, **k: None)
    assert text == "Built 4 concept dictionaries from 5 labelled objects."
    assert on_dictionary_plan("sdxl-turbo")[0].visible is False  # the page hides it then
    block, steps = "up_blocks.0.attentions.1", 1  # the emergence tab, by word, at one step
    run = dict(prompt="a red circle", seed=0, steps=steps, block=block, branch="cond")
    image, plot, panels, summary, run_id = on_emergence("sdxl-turbo", **run, words="circle")
    assert "target words: circle" in summary and len(panels) == 4
    assert (
        "1 step." in summary and "One SAE, trained on every t (as SDLens's), read step 0" in summary
    )
    slider = on_step_range(run_id)
    assert (slider.value, slider.interactive, slider.label) == (0, False, ONE_STEP_LABEL)
    timeline = dict(t=0.5, branch="cond", cid=None, word="circle", prompt="a circle", seed=0)
    _, _, line = on_timeline("sdxl-turbo", block, **timeline)  # the inspect tab, one step
    assert line.startswith("'circle': step 0 (t 1.00) read with the SAE at every t")


def test_a_build_that_finds_no_object_is_refused_and_keeps_its_parts(cache, monkeypatch):
    models = cache(annotator="nothing")
    monkeypatch.setattr(serving, "CACHE", models)
    with pytest.raises(gr.Error, match="The labeller found no object in the 5 images"):
        on_build_dictionaries("sdxl-turbo", progress=lambda *a, **k: None)
    with models.using("sdxl-turbo") as loaded:
        assert parted_build(loaded).done() == [0, 1, 2]  # nothing lost
        assert not loaded.dictionaries


def test_a_labeller_that_cannot_load_names_its_cause(cache, monkeypatch):
    def fails(config, device):
        raise OSError("Grounding DINO is neither cached nor downloadable")

    monkeypatch.setitem(
        LABELLERS, "circles", replace(labeller("circles", "circle"), annotator=fails)
    )
    loaded = cache().get("sdxl-turbo")
    with pytest.raises(ValueError, match="cannot be built: the labeller does not load"):
        build_part(loaded, 0)


def test_the_estimate_scales_the_costs_measured_on_a_cpu():
    plan = Plan(
        model="stabilityai/sdxl-turbo",
        saes="surokpro2/sdxl-saes",
        keys=(),
        prompts=("a cat",) * 128,
        seed=0,
        steps=1,
        guidance_scale=0.0,
        resolution=512,
        iou_threshold=0.5,
        labeller={"annotator": "grounded-sam"},
        part_size=16,
    )
    per_image = 11.74 + 20.71 + 20.25  # U-Net call, VAE decode, image labelled by Grounded SAM
    assert estimate_seconds(plan, "cpu") == pytest.approx(128 * per_image)
    assert estimate_seconds(plan, "cuda") == pytest.approx(128 * per_image / GPU_CPU_RATIO)
    assert minutes(estimate_seconds(plan, "cuda")) == "about 1 minute"
    assert minutes(estimate_seconds(plan, "cpu")) == "about 112 minutes"
    clipseg = replace(plan, labeller={"annotator": "clipseg"})
    assert minutes(estimate_seconds(clipseg, "cpu")) == "about 73 minutes"
    assert estimate_seconds(replace(plan, model="a/model-not-measured"), "cuda") is None
    assert estimate_seconds(replace(plan, labeller={"annotator": "toy"}), "cuda") is None


def test_where_the_labeller_does_not_load_its_fallback_labels_the_images(cache, monkeypatch):
    def fails(config, device):
        raise OSError("Grounding DINO is neither cached nor downloadable")

    broken = replace(labeller("broken", "circle"), annotator=fails, fallback="circles")
    monkeypatch.setitem(LABELLERS, "broken", broken)
    with cache(annotator="broken").using("sdxl-turbo") as loaded:
        assert loaded.labelling.dictionary_annotator[1] == "circles"
        for index in parted_build(loaded).remaining():
            build_part(loaded, index)
        finish_build(loaded)
    card = (dictionary_cache.cache_folder(loaded.preset) / "README.md").read_text()
    assert "Labeller: annotator: broken; the images were labelled by circles" in card
    monkeypatch.setitem(LABELLERS, "broken", replace(broken, fallback="broken"))
    loaded = cache(annotator="broken").get("sdxl-turbo")
    with pytest.raises(ValueError, match=r"no labeller loads: broken \(Grounding DINO is"):
        build_part(loaded, 0)


def test_published_dictionaries_are_loaded_instead_of_built(cache, tmp_path, monkeypatch):
    with cache().using("sdxl-turbo") as loaded:
        for index in parted_build(loaded).remaining():
            build_part(loaded, index)
        finish_build(loaded)
    published = tmp_path / "published"  # as `build_dictionary --push-to-hub` publishes them
    shutil.move(dictionary_cache.cache_folder(loaded.preset), published)
    loaded = cache(dictionary_source=str(published)).get("sdxl-turbo")
    assert set(loaded.dictionaries) == set(loaded.bank) and not loaded.notes
    assert not dictionary_cache.cache_folder(loaded.preset).exists()  # nothing built
    offline = cache(dictionary_source="user/not-downloadable").get("sdxl-turbo")
    assert not offline.dictionaries and offline.notes[0].startswith(NO_DICTIONARIES)


def test_each_stage_steers_some_of_sdxl_turbos_four_steer_steps(cache):
    """SDXL-Turbo generates one step by default; its steer tab takes 4 (t = 0.999, 0.749,
    0.499, 0.249) so that early, middle and final each edit some."""
    loaded = cache().get("sdxl-turbo")
    block = "down_blocks.2.attentions.1"
    edited = {}
    for stage in ("early", "middle", "final"):
        request = SteerRequest("a red circle", 0, block, stage=stage, cid=3, strength=10.0)
        result = run_steer(loaded, request)
        edited[stage] = result.metrics["edited_steps"], result.record.summary().split(" with")[0]
    assert edited == {
        "early": ("1 of 4", "edited step 0"),
        "middle": ("2 of 4", "edited steps 1–2"),
        "final": ("1 of 4", "edited step 3"),
    }
