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
from tests.helpers import hook_count, random_sae, recorded_steps, seeded

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
