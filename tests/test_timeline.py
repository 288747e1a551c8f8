"""A concept's timeline over one generation of the shipped tiny preset."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.diffusion.hooks import StepInfo, record
from core.emergence.composition import latent_grid
from core.sae.bank import SAEKey
from core.views.model_cache import Loaded, ModelCache
from core.views.render import BAR_WIDTH, INVALID_GREY
from core.views.timeline import (
    FRAME,
    FRAMES_PER_ROW,
    HEADER_HEIGHT,
    TITLE_HEIGHT,
    Timeline,
    TimelineStep,
    concept_timeline,
    filmstrip,
    strength_figure,
)
from tests.helpers import dense_latents, hook_count

UP = "up_blocks.1.attentions.0"
PROMPT = "a red circle and a blue star"
STEPS = 4
"""DDIM at t = 0.751, 0.501, 0.251, 0.001: the SAEs at t = 1, 0.5 and 0 are each nearest to one."""


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    torch.set_num_threads(1)
    tiny = ModelCache().get("tiny")
    return with_steps(tiny, STEPS)


def with_steps(loaded: Loaded, steps: int) -> Loaded:
    return replace(loaded, preset=replace(loaded.preset, steps=steps))


def recorded_latents(loaded: Loaded, key: SAEKey, t: float, seed: int = 0) -> torch.Tensor:
    """[h, w, num_latents] the SAE of `key`'s dense code of the update recorded at the step
    nearest `t` of the same generation, encoded here without the timeline's code."""
    with record(loaded.pipe, [UP], at_t=[t]) as recording:
        loaded.generate([PROMPT], [seed], loaded.preset.steps)
    recorded = recording.at(UP, t, "cond")
    sae = loaded.bank[key]
    return dense_latents(latent_grid(sae, recorded.delta), sae.cfg.num_latents)[0]


def test_a_cids_strength_per_step_is_its_activation_in_its_own_sae(loaded):
    timeline = concept_timeline(loaded, UP, "cond", PROMPT, 0, cid=3, cid_t=0.4)
    key = SAEKey(UP, 0.5, "cond")
    assert [step.sae for step in timeline.steps] == [key] * STEPS
    assert all(step.cids == (3,) for step in timeline.steps)
    step = timeline.steps[0]  # t = 0.75: not the SAE's own t, read with it all the same
    expected = recorded_latents(loaded, key, step.step.t)[..., 3]
    torch.testing.assert_close(step.activation, expected)
    assert step.mean == pytest.approx(float(expected.mean()))
    assert step.max == pytest.approx(float(expected.max()))
    assert timeline.scale == pytest.approx(float(loaded.bank[key].stats.act_max[3]))
    assert "CID 3 of the SAE at t=0.5: steps 0–3 (t 0.75 to 0.00)" in timeline.summary()
    assert "that SAE read every step" in timeline.summary()


def test_a_words_steps_use_the_nearest_sae_and_sum_its_cids(loaded):
    timeline = concept_timeline(loaded, UP, "cond", PROMPT, 0, word=" Star ")
    assert timeline.ts == pytest.approx([0.75, 0.5, 0.25, 0.0], abs=0.002)  # DDIM's offset
    assert [step.sae.t for step in timeline.steps] == [1.0, 0.5, 0.5, 0.0]
    for step in timeline.steps:
        assert step.cids == tuple(loaded.dictionaries[step.sae].cids_for("star"))
    step = timeline.steps[-1]
    latents = recorded_latents(loaded, step.sae, step.step.t)
    torch.testing.assert_close(step.activation, latents[..., list(step.cids)].sum(dim=-1))
    assert timeline.scale == pytest.approx(max(s.max for s in timeline.steps))
    summary = timeline.summary()
    assert summary.startswith("'star': step 0 (t 0.75) read with the SAE at t=1; ")
    assert "steps 1–2 (t 0.50 to 0.25) read with the SAE at t=0.5" in summary
    assert "skipped" not in summary


def test_steps_whose_sae_has_no_cid_for_the_word_are_skipped_and_noted(loaded):
    missing = SAEKey(UP, 0.0, "cond")
    dictionaries = {k: d for k, d in loaded.dictionaries.items() if k != missing}
    timeline = concept_timeline(
        replace(loaded, dictionaries=dictionaries), UP, "cond", PROMPT, 0, word="star"
    )
    last = timeline.steps[-1]
    assert last.sae == missing and last.cids == () and torch.isnan(last.activation).all()
    assert np.isnan(last.mean) and not np.isnan(timeline.steps[0].mean)
    assert "skipped step 3: the SAE at t=0 has no CID labelled 'star'" in timeline.summary()
    strip = np.asarray(filmstrip(timeline))
    centre = HEADER_HEIGHT + TITLE_HEIGHT + FRAME // 2
    frames = [strip[centre, i * (FRAME + 4) + 2 + FRAME // 2] for i in range(STEPS)]
    assert tuple(frames[-1]) == INVALID_GREY
    assert all(tuple(frame) != INVALID_GREY for frame in frames[:-1])


def test_the_filmstrip_has_one_frame_per_step_and_wraps_long_runs(loaded):
    narrow, wide, wrapped = (
        filmstrip(concept_timeline(with_steps(loaded, steps), UP, "cond", PROMPT, 0, cid=3))
        for steps in (4, 6, FRAMES_PER_ROW + 2)
    )
    assert wide.width - narrow.width == 2 * (FRAME + 4)
    assert wide.height == narrow.height
    assert wrapped.width == FRAMES_PER_ROW * (FRAME + 4) + BAR_WIDTH
    assert wrapped.height == wide.height + FRAME + TITLE_HEIGHT
    colour_bar = np.asarray(wide)[:, -BAR_WIDTH:]
    assert (colour_bar != 255).any()


def test_the_strength_plot_runs_from_noise_to_image_with_each_saes_range_shaded(loaded):
    timeline = concept_timeline(loaded, UP, "cond", PROMPT, 0, word="star")
    (ax,) = strength_figure(timeline).axes
    left, right = ax.get_xlim()
    assert left > 1 and right < 0
    assert ax.get_xlabel() and ax.get_ylabel() and "'star'" in ax.get_title(loc="left")
    assert len(ax.patches) == 3  # the SAEs at t = 1, 0.5 and 0
    names = [text.get_text() for text in ax.texts]
    assert names == ["SAE t=1", "SAE t=0.5", "SAE t=0"]
    (mean,) = [line for line in ax.lines if line.get_label() == "mean"]
    np.testing.assert_allclose(mean.get_ydata(), [s.mean for s in timeline.steps])


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({}, "Choose a concept: type a word, or give a CID."),
        ({"word": "qzxv"}, "is labelled 'qzxv' at any t; try one of"),
        ({"cid": 9999}, "from 0 to 255 for this SAE, got 9999"),
        ({"cid": 3, "cid_t": 2}, "The t of the CID's SAE must be between 0 and 1"),
        ({"cid": 3, "block": "up_blocks.0.attentions.1"}, "is not a hook point of the preset"),
        ({"cid": 3, "branch": "uncond"}, "There is no SAE for up_blocks.1.attentions.0 on the"),
        ({"cid": 3, "prompt": " "}, "The prompt is empty"),
    ],
)
def test_bad_input_is_one_sentence_before_anything_is_generated(loaded, changes, fragment):
    steps = []
    args = {"block": UP, "branch": "cond", "prompt": PROMPT, "seed": 0, **changes}
    with pytest.raises(ValueError, match="^.+$") as info:
        concept_timeline(loaded, on_step=lambda done, total: steps.append(done), **args)
    message = str(info.value)
    assert fragment in message and message.count(". ") == 0 and "\n" not in message
    assert steps == [] and hook_count(loaded.pipe) == 0


def test_an_sae_of_every_t_is_named_so():
    key = SAEKey(UP, None, "cond")  # as SDLens's SAEs are
    steps = [
        TimelineStep(StepInfo(i, t * 1000, t), key, (3,), torch.ones(2, 2))
        for i, t in enumerate((0.9, 0.5))
    ]
    timeline = Timeline(UP, "cond", "", "CID 3 of the SAE at every t", steps, 1.0, "1")
    assert "steps 0–1 (t 0.90 to 0.50) read with the SAE at every t" in timeline.summary()
    assert filmstrip(timeline).width > 2 * FRAME
    assert [text.get_text() for text in strength_figure(timeline).axes[0].texts] == ["SAE every t"]
