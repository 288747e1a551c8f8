import math

import gradio as gr
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from core.diffusion.hooks import record, schedule_t
from core.diffusion.presets import STAGE_T, STAGES, Stages
from core.sae.bank import SAEBank, SAEKey
from core.steer.intervene import Intervention, delta_change, intervene, plan_step
from core.steer.kinds import KINDS, Codes, Kind, register
from core.steer.record import EditRecord, StepEdit
from core.steer.regions import quadrant_mask, region_on_grid
from core.steer.windows import stage_at, stage_window, stages_in, step_stage
from core.training.activations import to_rows
from core.views.model_cache import ModelCache
from page.assembly import build_demo
from page.steer import on_default_strength
from tests.helpers import hook_count, random_sae, recorded_steps, seeded, write_saeuron

MID = "mid_block.attentions.0"
SIZE = (32, 32)  # the tiny pipeline's images


@pytest.fixture(scope="module")
def bank() -> SAEBank:
    return SAEBank(random_sae(64, 256, 8, t=t, seed=i) for i, t in enumerate((1.0, 0.5, 0.0)))


def generate(pipe, steps: int = 10):
    kwargs = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    return pipe("a red cat", generator=seeded(0), **kwargs).images


def reference_change(sae, delta, cids, kind, beta, inside):
    """D(Z_edited) - D(Z) with the dense code, as the paper defines the edits."""
    rows = to_rows(delta)
    z = sae.encode_dense(rows).detach()
    norms = z.norm(dim=-1, keepdim=True)
    edited = z.clone()
    if kind == "spatial":
        inside_rows = inside.flatten().repeat(delta.shape[0])[:, None]
        edited[:, cids] = torch.where(inside_rows, beta * norms, torch.zeros_like(norms))
    elif kind == "global":
        per_image = norms.view(delta.shape[0], -1)
        edited[:, cids] += (beta * per_image / per_image.sum(1, keepdim=True)).reshape(-1, 1)
    else:
        edited[:, cids] *= 1 - beta
    change = (edited @ sae.W_dec + sae.b_dec) - (z @ sae.W_dec + sae.b_dec)
    b, c, h, w = delta.shape
    return change.view(b, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize(("kind", "beta"), [("spatial", 7.0), ("global", 3.0), ("ablate", 0.6)])
def test_edit_equals_decoded_change_of_the_edited_code(kind, beta):
    sae = random_sae(8, 32, 4)
    delta = torch.randn(2, 8, 4, 4)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:2, :2] = True
    cids = [1, 5, 9]
    got = delta_change(kind, sae, delta, cids, beta, inside)
    expected = reference_change(sae, delta, cids, kind, beta, inside)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "beta"), [("spatial", 3.0), ("global", 2.0), ("ablate", 0.5)])
def test_mean_activations_are_the_unit_of_strength(kind, beta):
    """SDLens's demo adds strength * mean.pt[c] * f_c; spatial sets the latent to that value
    inside the region (removing it outside, as the paper does), ablation ignores the means."""
    sae = random_sae(8, 32, 4)
    sae.mean_acts = torch.rand(32) * 20 + 1
    delta = torch.randn(2, 8, 4, 4)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:2, :2] = True
    cids = [1, 5]
    z = sae.encode_dense(to_rows(delta)).detach()
    edited = z.clone()
    target = beta * sae.mean_acts[cids]
    if kind == "spatial":
        inside_rows = inside.flatten().repeat(2)[:, None]
        edited[:, cids] = torch.where(inside_rows, target, torch.zeros_like(target))
    elif kind == "global":
        edited[:, cids] += target
    else:
        edited[:, cids] *= 1 - beta
    expected = ((edited - z) @ sae.W_dec).view(2, 4, 4, 8).permute(0, 3, 1, 2)
    got = delta_change(kind, sae, delta, cids, beta, inside)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_quadrants_and_grids():
    mask = quadrant_mask("top_right", (8, 8))
    assert mask[:4, 4:].all() and mask.sum() == 16
    grid = region_on_grid(mask, (2, 2))
    assert grid.tolist() == [[False, True], [False, False]]
    with pytest.raises(ValueError, match="unknown quadrant"):
        quadrant_mask("top", (8, 8))


def test_the_stage_of_a_step_and_a_step_on_a_shared_bound():
    assert stage_window("middle") == (0.2, 0.6)
    assert [stage_at(t) for t in (1.0, 0.6, 0.59, 0.2, 0.19, 0.0)] == [
        "early",
        "early",  # on the bound of early and middle: the stage that ends there
        "middle",
        "middle",
        "final",
        "final",
    ]
    assert step_stage("middle", 0.6) == "middle"  # a named stage edits all its steps as itself
    assert step_stage((0.0, 1.0), 0.6) == "early"
    assert stages_in((0.1, 0.7)) == ["early", "middle", "final"]
    assert stages_in((0.2, 0.59)) == ["middle"] and stages_in((0.2, 0.6)) == ["early", "middle"]
    assert stages_in("final") == ["final"]


def test_a_custom_window_edits_each_step_as_the_stage_of_its_own_t(tiny_pipe, bank):
    """A full-range window used the middle SAE for every step before; now each stage's SAE
    and, with no strength given, each stage's strength (global: 8, 10, 10)."""
    _, edits = steered(tiny_pipe, bank, window=(0.0, 1.0), strength=None)
    steps = [(s.index, s.stage, s.sae.t, s.strength) for s in edits.edited()]
    assert steps == (
        [(i, "early", 1.0, 8.0) for i in range(4)]
        + [(i, "middle", 0.5, 10.0) for i in range(4, 8)]
        + [(i, "final", 0.0, 10.0) for i in (8, 9)]
    )
    assert edits.summary() == (
        f"edited steps 0–3 with {MID} (t=1, cond), CIDs 3, 4 at strength 8; steps 4–7 with "
        f"{MID} (t=0.5, cond), CIDs 3, 4 at strength 10; steps 8–9 with {MID} (t=0, cond), "
        "CIDs 3, 4 at strength 10; skipped none"
    )
    _, given = steered(tiny_pipe, bank, window=(0.0, 1.0), strength=5.0)
    assert {s.strength for s in given.edited()} == {5.0}
    assert [s.sae.t for s in given.edited()] == [s.sae.t for s in edits.edited()]


def steered(pipe, bank, **fields) -> tuple[np.ndarray, EditRecord]:
    """The image generated under the intervention `fields` describe, and its record."""
    spec = dict(kind="global", cids=[3, 4], strength=10.0, window=(0.0, 1.0))
    spec.update(fields)
    with intervene(pipe, bank, MID, Intervention(**spec), SIZE) as edits:
        return generate(pipe), edits


def steer(pipe, bank, **fields) -> np.ndarray:
    return steered(pipe, bank, **fields)[0]


def ddim_ts(pipe, steps: int) -> list[float]:
    """t of each step of a DDIM schedule of `steps` steps, as the hooks see it."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return schedule_t(pipe, scheduler.timesteps)


def sae_t_per_step(bank, ts, stage: str, **choice: str) -> list[float]:
    """The t of the SAE that edits each step of `stage` (by default, or as `choice` says)."""
    low, high = STAGES[stage]
    edit = Intervention("global", [3], 10.0, stage, **choice)
    return [plan_step(bank, MID, edit, t, "cond").sae.t for t in ts if low <= t <= high]


def test_each_stage_edits_with_its_own_sae_by_default(tiny_pipe, bank):
    ts = ddim_ts(tiny_pipe, 50)
    early = sae_t_per_step(bank, ts, "early")
    assert len(early) == 20 and set(early) == {1.0}
    assert set(sae_t_per_step(bank, ts, "middle")) == {0.5}
    assert set(sae_t_per_step(bank, ts, "final")) == {0.0}
    nearest = sae_t_per_step(bank, ts, "early", sae_choice="nearest")
    assert nearest == [1.0] * 12 + [0.5] * 8  # t = 0.741 .. 0.601 is nearer 0.5
    others = sum(
        t != STAGE_T[stage]
        for stage in STAGES
        for t in sae_t_per_step(bank, ts, stage, sae_choice="nearest")
    )
    assert others == 11


def test_the_record_names_each_steps_sae_and_cids_and_why_steps_were_skipped(tiny_pipe, bank):
    keys = {k.t: k for k in bank}
    plain = generate(tiny_pipe)
    # With 10 steps the early stage is t = 0.901 .. 0.601 (steps 0-3); the CIDs are the
    # t = 0.5 SAE's only, which the nearest choice uses at t = 0.701 and 0.601.
    fields = dict(cids={keys[0.5]: [3, 4]}, window="early", concept="'cat'")
    image, edits = steered(tiny_pipe, bank, **fields)
    assert (image == plain).all()
    assert edits.summary() == (
        f"edited no step; skipped steps 0–3: {MID} (t=1, cond) has no CIDs for 'cat'"
    )
    image, edits = steered(tiny_pipe, bank, sae_choice="nearest", **fields)
    assert not (image == plain).all()
    assert [(s.index, s.sae.t, s.cids) for s in edits.edited()] == [
        (2, 0.5, (3, 4)),
        (3, 0.5, (3, 4)),
    ]
    assert edits.summary() == (
        f"edited steps 2–3 with {MID} (t=0.5, cond), CIDs 3, 4; "
        f"skipped steps 0–1: {MID} (t=1, cond) has no CIDs for 'cat'"
    )


def test_a_stage_whose_t_the_bank_lacks_uses_the_nearest_and_says_so(tiny_pipe):
    bank = SAEBank(random_sae(64, 256, 8, t=t, seed=i) for i, t in enumerate((1.0, 0.4)))
    edit = Intervention("global", [3], 10.0, "middle")
    with intervene(tiny_pipe, bank, MID, edit, SIZE) as edits:
        pass
    assert edits.notes == [
        f"no SAE of {MID} (cond) is at the middle stage's t=0.5; the nearest, t=0.4, edits it"
    ]
    assert plan_step(bank, MID, edit, 0.55, "cond").sae.t == 0.4
    assert hook_count(tiny_pipe) == 0


def test_the_summary_groups_consecutive_steps_by_sae_and_cids():
    one, half = SAEKey(MID, 1.0, "cond"), SAEKey(MID, 0.5, "cond")
    steps = [StepEdit(MID, i, 1 - i / 10, "cond", one, (5,), "early", 8) for i in (0, 1, 2, 4)]
    steps += [StepEdit(MID, 3, 0.7, "cond", half, (), "early", 8, "no CIDs here")]
    steps += [StepEdit(MID, 5, 0.5, "cond", half, tuple(range(10)), "middle", 8)]
    edits = EditRecord(steps, ["a note"])
    assert edits.summary() == (
        f"edited steps 0–2, 4 with {MID} (t=1, cond), CIDs 5; step 5 with {MID} (t=0.5, "
        "cond), CIDs 0, 1, 2, 3, 4, 5, 6, 7, ... (10 in all); skipped step 3: no CIDs here; "
        "a note"
    )
    assert EditRecord().summary() == "edited no step: no step's t lies in the window"


def test_edits_outside_the_window_or_at_zero_strength_change_nothing(tiny_pipe, bank):
    plain = generate(tiny_pipe)
    # With 10 DDIM steps, t runs from 0.901 down to 0.001: no step lies in (0.95, 1.0).
    image, edits = steered(tiny_pipe, bank, window=(0.95, 1.0))
    assert (image == plain).all() and not edits.steps
    image, edits = steered(tiny_pipe, bank, strength=0.0)
    assert (image == plain).all() and not edits.edited()
    assert {s.skipped for s in edits.steps} == {"the strength is 0"} and len(edits.steps) == 10
    region = quadrant_mask("top_left", SIZE)
    assert (steer(tiny_pipe, bank, kind="spatial", region=region, strength=0.0) == plain).all()
    assert not (steer(tiny_pipe, bank, window=(0.0, 0.3)) == plain).all()
    assert hook_count(tiny_pipe) == 0


def test_a_region_smaller_than_half_a_grid_cell_skips_every_step_and_says_why(tiny_pipe, bank):
    speck = np.zeros(SIZE, dtype=bool)
    speck[2:5, 2:5] = True  # 9 pixels; the mid block's grid cells are 16x16 here
    image, edits = steered(tiny_pipe, bank, kind="spatial", region=speck, strength=50.0)
    assert (image == generate(tiny_pipe)).all() and not edits.edited()
    assert {s.skipped for s in edits.steps} == {
        "the region covers no position of the block's 2x2 grid (each 16x16 pixels of the "
        "image): cover at least half of one"
    }
    corner = np.zeros(SIZE, dtype=bool)
    corner[:12, :12] = True  # more than half of the top-left cell
    assert len(steered(tiny_pipe, bank, kind="spatial", region=corner)[1].edited()) == 10


def test_cond_only_edits_leave_the_uncond_branch_alone(tiny_pipe, bank):
    spec = Intervention("spatial", [3, 4], 50.0, (0.0, 1.0), region=quadrant_mask("top_left", SIZE))
    with record(tiny_pipe, [MID]) as plain:
        generate(tiny_pipe, steps=2)
    with intervene(tiny_pipe, bank, MID, spec, SIZE), record(tiny_pipe, [MID]) as steered:
        generate(tiny_pipe, steps=2)
    first = recorded_steps(plain)[0].t
    assert torch.equal(plain.at(MID, first, "uncond").delta, steered.at(MID, first, "uncond").delta)
    assert not torch.equal(plain.at(MID, first, "cond").delta, steered.at(MID, first, "cond").delta)


def test_per_t_cids_follow_the_sae_in_use(tiny_pipe, bank):
    keys = {k.t: k for k in bank}
    plain = generate(tiny_pipe)
    only_final = {keys[0.0]: [3, 4]}
    nearest = dict(cids=only_final, sae_choice="nearest")
    # t = 0.901 .. 0.401 use the t = 1.0 and t = 0.5 SAEs, which have no CIDs here.
    assert (steer(tiny_pipe, bank, window=(0.4, 1.0), **nearest) == plain).all()
    assert not (steer(tiny_pipe, bank, window=(0.0, 0.3), **nearest) == plain).all()


full = np.ones(SIZE, dtype=bool)
BAD = [
    (dict(kind="spatial", region=np.zeros(SIZE, dtype=bool)), "the mask is empty"),
    (dict(kind="spatial", region=full), "use a global edit instead"),
    (dict(kind="spatial", region=np.ones((16, 16), dtype=bool)), "draw it at image resolution"),
    (dict(kind="spatial"), "needs a region"),
    (dict(strength=math.nan), "finite number >= 0"),
    (dict(strength=math.inf), "finite number >= 0"),
    (dict(strength=-1.0), "finite number >= 0"),
    (dict(strength=1e9), "too large"),
    (dict(kind="ablate", strength=2.0), "use at most 1"),
    (dict(cids=[]), "no CIDs"),
    (dict(window=(0.7, 0.2)), "t_min <= t_max"),
    (dict(branches=("both",)), "branches must be among"),
    (dict(sae_choice="closest"), "unknown sae_choice 'closest'; choose one of stage, nearest"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_bad_input_is_refused_before_anything_is_edited(tiny_pipe, bank, fields, message):
    with pytest.raises(ValueError, match=message):
        steer(tiny_pipe, bank, **fields)
    assert hook_count(tiny_pipe) == 0


def test_an_sae_for_another_block_is_refused(tiny_pipe):
    narrow = SAEBank([random_sae(32, 64, 4, t=1.0)])
    with pytest.raises(ValueError, match="reads width 32 but the block has 64 channels"):
        steer(tiny_pipe, narrow)
    assert hook_count(tiny_pipe) == 0


def test_a_word_steers_through_each_dictionarys_cids(tiny_pipe, bank):
    from core.emergence.concepts import ConceptDictionary, concept_cids
    from core.emergence.words import load_word_vectors

    words = load_word_vectors()
    labels = {1.0: {3: ["cat"], 4: ["dog"]}, 0.5: {7: ["cat", "cat"]}, 0.0: {9: ["tree"]}}
    dictionaries = {
        key: ConceptDictionary.from_labels(key, 256, labels[key.t], words) for key in bank
    }
    cids = concept_cids(dictionaries, "cat", MID)
    assert {key.t: v for key, v in cids.items()} == {1.0: [3], 0.5: [7], 0.0: []}
    with pytest.raises(ValueError, match="labelled 'boat' at any t; try one of cat, dog, tree"):
        concept_cids(dictionaries, "boat", MID)
    plain = generate(tiny_pipe)
    image, edits = steered(tiny_pipe, bank, cids=cids, window=(0.0, 0.1), concept="'cat'")
    assert (image == plain).all()
    assert (
        edits.summary()
        == f"edited no step; skipped step 9: {MID} (t=0, cond) has no CIDs for 'cat'"
    )
    assert not (steer(tiny_pipe, bank, cids=cids, window=(0.4, 0.6)) == plain).all()


def test_an_output_sae_edits_the_block_output_and_is_never_applied_to_deltas(tiny_pipe):
    bank = SAEBank([random_sae(64, 256, 8, site="output")])
    edit = Intervention("global", [3, 4], 10.0, (0.0, 1.0))
    with record(tiny_pipe, [MID], site="output") as plain:
        generate(tiny_pipe, steps=2)
    with (
        intervene(tiny_pipe, bank, MID, edit, SIZE),
        record(tiny_pipe, [MID], site="output") as steered,
    ):
        generate(tiny_pipe, steps=2)
    t = recorded_steps(plain)[0].t
    before = plain.at(MID, t, "cond").delta
    expected = before + delta_change("global", bank.get(MID, t), before, [3, 4], 10.0, None)
    torch.testing.assert_close(steered.at(MID, t, "cond").delta, expected, rtol=1e-4, atol=1e-4)

    message = (
        r"the SAE of mid_block.attentions.0 \(any t, cond\) was trained on the block output, not "
        r"on the residual update \(block output minus block input\), so it cannot read or edit"
    )
    with (
        pytest.raises(ValueError, match=message),
        intervene(tiny_pipe, bank, MID, edit, SIZE, site="delta"),
    ):
        pass
    assert hook_count(tiny_pipe) == 0


def test_a_saeuron_sae_of_another_width_is_refused(tiny_pipe, tmp_path):
    write_saeuron(tmp_path / f"unet.{MID}", d=32)
    bank = SAEBank.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="reads width 32 but the block has 64 channels"):
        steer(tiny_pipe, bank)
    assert hook_count(tiny_pipe) == 0


def grow(codes: Codes, beta: float, inside: torch.Tensor | None) -> torch.Tensor:
    return torch.where(inside[:, None], beta * codes.z, torch.zeros_like(codes.z))


@pytest.fixture
def grow_kind():
    """A made-up kind, in the table only while a test runs: the concept's own code scaled by
    1 + beta inside the region."""
    kind = register(
        Kind(
            "grow",
            "grows the concept inside a region",
            "beta * Z_ijc inside S",
            grow,
            {"early": 2.0, "middle": 3.0, "final": 4.0},
            needs_region=True,
        )
    )
    yield kind
    del KINDS[kind.name]


def test_a_kind_added_to_the_table_alone_is_applied_and_offered(tiny_pipe, bank, grow_kind):
    sae, delta = bank[SAEKey(MID, 1.0, "cond")], torch.randn(2, 64, 4, 4)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[:2] = True
    z = sae.encode_dense(to_rows(delta)).detach()
    edited = z.clone()
    edited[:, [3, 4]] *= torch.where(inside.flatten().repeat(2)[:, None], 3.0, 1.0)
    expected = ((edited - z) @ sae.W_dec).view(2, 4, 4, 64).permute(0, 3, 1, 2)
    got = delta_change("grow", sae, delta, [3, 4], 2.0, inside)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)

    with pytest.raises(ValueError, match="a grow edit needs a region"):
        steer(tiny_pipe, bank, kind="grow", strength=None, window="early")
    top = quadrant_mask("top_left", SIZE)
    every = list(range(256))  # a random SAE's CIDs 3 and 4 may never fire
    spec = dict(kind="grow", cids=every, strength=None, window="middle", region=top)
    image, edits = steered(tiny_pipe, bank, **spec)
    assert {(s.stage, s.strength) for s in edits.edited()} == {("middle", 3.0)}
    assert np.abs(image - generate(tiny_pipe)).max() > 0

    demo = build_demo(ModelCache(), "tiny")
    types = [b for b in demo.blocks.values() if isinstance(b, gr.Radio) and b.label == "type"]
    assert [value for _, value in types[0].choices] == ["spatial", "global", "ablate", "grow"]
    assert on_default_strength("tiny", "grow", "final", 0.0, 1.0) == 4.0


def test_a_preset_may_give_its_own_stage_windows(tiny_pipe, bank):
    """A schedule whose steps sit elsewhere (few steps, flow matching) names the same three
    stages with its own t windows and SAE t."""
    late = Stages(
        {"early": (0.9, 1.0), "middle": (0.5, 0.9), "final": (0.0, 0.5)},
        {"early": 1.0, "middle": 0.5, "final": 0.0},
    )
    assert [stage_at(t, late) for t in (0.95, 0.9, 0.7, 0.5, 0.2)] == [
        "early",
        "early",
        "middle",
        "middle",
        "final",
    ]
    assert stages_in((0.6, 1.0), late) == ["early", "middle"]
    _, edits = steered(tiny_pipe, bank, window="middle", stages=late)
    ts = ddim_ts(tiny_pipe, 10)
    assert [s.t for s in edits.edited()] == [t for t in ts if 0.5 <= t <= 0.9]
    assert {s.sae.t for s in edits.edited()} == {0.5}
    with pytest.raises(ValueError, match="stages are named early, middle, final"):
        Stages({"start": (0.5, 1.0)}, {"start": 1.0})
