"""The app's tabs on the tiny diffusion-transformer presets (PixArt, SD3 and FLUX layouts,
random weights, the SAEs and dictionaries shipped in assets/), through the page's handlers:
each gives results, not refusals, and says what the layout lacks."""

import json

import pytest

from core.diffusion.presets import get_preset
from core.views.model_cache import ModelCache
from page import serving
from page.emergence import on_emergence
from page.inspect import on_activation_map, on_inspect_concept, on_timeline, on_top_examples
from page.status import on_status
from page.steer import on_steer
from scripts.build_tiny_assets import build_file, pipeline_fingerprint

DITS = ("tiny-pixart", "tiny-sd3", "tiny-flux")
PROMPT = "a red circle and a blue square on a white plain background"


@pytest.fixture(scope="module")
def models():
    cache = ModelCache(device="cpu", max_loaded=3)
    previous, serving.CACHE = serving.CACHE, cache
    yield cache
    serving.CACHE = previous


def quiet(*args, **kwargs) -> None:
    """A progress reporter that reports nowhere."""


@pytest.mark.parametrize("preset", DITS)
def test_every_tab_gives_results_on_a_tiny_dit(models, preset):
    chosen = get_preset(preset)
    block = chosen.app.block
    models.get(preset)
    status = on_status(preset)
    assert "random weights" in status and "diffusion-transformer layout" in status

    run = dict(prompt=PROMPT, seed=0, steps=chosen.steps, block=block, branch="cond")
    image, plot, panels, summary, _ = on_emergence(preset, **run, words="", progress=quiet)
    assert "target words:" in summary
    traced = preset == "tiny-pixart"  # the one layout with cross-attention layers
    assert ("no cross-attention map" in summary) != traced
    attention_captions = [caption for _, caption in panels[3::4]]  # the fourth of each word's
    assert attention_captions and all(
        caption.endswith("cross-attention" if traced else "no cross-attention layer")
        for caption in attention_captions
    ), attention_captions

    word = chosen.app.word
    steer = dict(
        prompt=PROMPT,
        seed=1,
        block=chosen.app.steer_block,
        branch="cond",
        concept_by="word",
        word=word,
        concepts=[],
        cid=0,
        cid_t=1.0,
        kind="spatial",
        stage="early",
        t_min=0.6,
        t_max=1.0,
        strength=None,
        sae_choice="stage",
        region_by="quadrant",
        quadrant="top_left",
        canvas=None,
    )
    pair, difference, summary, metrics = on_steer(preset, **steer, progress=quiet)
    assert summary.startswith("edited step") and metrics["edited_steps"] != "0 of 10"

    loaded = models.get(preset)
    cid = loaded.dictionaries[loaded.bank.nearest_key(block, 0.5, "cond")].ranked_cids(word)[0]
    concept = dict(block=block, t=0.5, branch="cond", cid=cid)
    entry, stats, nearest, notes = on_inspect_concept(preset, **concept, progress=quiet)
    assert word in str(entry)
    assert on_top_examples(preset, **concept, progress=quiet)
    assert on_activation_map(preset, **concept, prompt=PROMPT, seed=0, progress=quiet)
    timeline = on_timeline(preset, **concept, word="", prompt=PROMPT, seed=0, progress=quiet)
    assert timeline[-1].startswith(f"CID {cid}")


def test_flux_has_no_uncond_branch_and_says_why(models):
    run = dict(prompt=PROMPT, seed=0, steps=2, block="single_transformer_blocks.0")
    with pytest.raises(ValueError, match="guidance is distilled into it"):
        on_emergence("tiny-flux", **run, branch="uncond", words="", progress=quiet)


@pytest.mark.parametrize("preset", DITS)
def test_the_shipped_saes_match_the_random_weights_they_were_trained_on(models, preset):
    build = json.loads(build_file(preset).read_text())
    assert build["pipeline"]["fingerprint"] == pipeline_fingerprint(models.get(preset).pipe), (
        f"{preset}'s random weights changed (a torch or diffusers initialiser?); rebuild its "
        f"assets with `python -m scripts.build_tiny_assets --preset {preset}`"
    )
