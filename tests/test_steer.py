import math

import numpy as np
import pytest
import torch

from core.diffusion.hooks import record
from core.emergence.steer import (
    Intervention,
    default_strength,
    delta_change,
    intervene,
    quadrant_mask,
    region_on_grid,
    stage_window,
)
from core.sae.bank import SAEBank
from core.training.activations import to_rows
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


def test_stages_and_paper_strengths():
    assert stage_window("middle") == (0.2, 0.6)
    assert default_strength("spatial", "early") == 4000
    assert default_strength("global", "middle") == 10
    assert default_strength("global", (0.3, 0.5)) == 10


def steer(pipe, bank, **fields):
    spec = dict(kind="global", cids=[3, 4], strength=10.0, window=(0.0, 1.0))
    spec.update(fields)
    with intervene(pipe, bank, MID, Intervention(**spec), SIZE):
        return generate(pipe)


def test_edits_outside_the_window_or_at_zero_strength_change_nothing(tiny_pipe, bank):
    plain = generate(tiny_pipe)
    # With 10 DDIM steps, t runs from 0.901 down to 0.001: no step lies in (0.95, 1.0).
    assert (steer(tiny_pipe, bank, window=(0.95, 1.0)) == plain).all()
    assert (steer(tiny_pipe, bank, strength=0.0) == plain).all()
    region = quadrant_mask("top_left", SIZE)
    assert (steer(tiny_pipe, bank, kind="spatial", region=region, strength=0.0) == plain).all()
    assert not (steer(tiny_pipe, bank, window=(0.0, 0.3)) == plain).all()
    assert hook_count(tiny_pipe) == 0


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
    # t = 0.901 .. 0.401 use the t = 1.0 and t = 0.5 SAEs, which have no CIDs here.
    assert (steer(tiny_pipe, bank, cids=only_final, window=(0.4, 1.0)) == plain).all()
    assert not (steer(tiny_pipe, bank, cids=only_final, window=(0.0, 0.3)) == plain).all()


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
    assert (steer(tiny_pipe, bank, cids=cids, window=(0.0, 0.1)) == plain).all()
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
