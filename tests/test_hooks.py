import pytest
import torch

from core.diffusion.hooks import edit, record, transformer_blocks
from core.diffusion.presets import SD14_BLOCKS
from tests.helpers import hook_count, recorded_steps, seeded

MID = "mid_block.attentions.0"


def generate(pipe, prompts, steps=4, guidance=7.5, seeds=None):
    seeds = seeds or list(range(len(prompts)))
    return pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=seeded(*seeds),
        output_type="np",
    ).images


def test_tiny_unet_has_sd14_block_names(tiny_pipe):
    names = transformer_blocks(tiny_pipe.unet)
    assert len(names) == 16
    assert set(SD14_BLOCKS) <= set(names)


def test_recording_leaves_the_image_bit_identical(tiny_pipe):
    plain = generate(tiny_pipe, ["a red cat"])
    with record(tiny_pipe, SD14_BLOCKS) as rec:
        recorded = generate(tiny_pipe, ["a red cat"])
    assert (plain == recorded).all()
    assert len(rec.records) == 4 * 3 * 2


def test_t_comes_from_the_unet_timestep(tiny_pipe):
    with record(tiny_pipe, [MID]) as rec:
        generate(tiny_pipe, ["a dog"], steps=5)
    expected = [float(ts) / 1000 for ts in tiny_pipe.scheduler.timesteps]
    assert [s.t for s in recorded_steps(rec)] == expected
    assert [s.index for s in recorded_steps(rec)] == list(range(5))
    assert [r.delta.shape for r in rec.of(MID, "cond")] == [(1, 64, 2, 2)] * 5


def test_cfg_batch_is_split_into_uncond_and_cond(tiny_pipe):
    with record(tiny_pipe, [MID]) as rec:
        generate(tiny_pipe, ["a red cat", "a blue car"], seeds=[7, 7])
    first = recorded_steps(rec)[0]
    uncond = rec.at(MID, first.t, "uncond").delta
    cond = rec.at(MID, first.t, "cond").delta
    assert uncond.shape[0] == cond.shape[0] == 2
    # Same seed and the same null prompt: identical uncond updates; different prompts: not.
    torch.testing.assert_close(uncond[0], uncond[1])
    assert not torch.allclose(cond[0], cond[1])

    with record(tiny_pipe, [MID]) as alone:
        generate(tiny_pipe, ["a red cat"], guidance=1.0, seeds=[7])
    assert {r.branch for r in alone.records} == {"cond"}
    torch.testing.assert_close(alone.at(MID, first.t, "cond").delta[0], cond[0])


def test_at_t_records_only_the_nearest_steps(tiny_pipe):
    with record(tiny_pipe, [MID], at_t=[1.0, 0.5, 0.0]) as rec:
        generate(tiny_pipe, ["a cat"], steps=10)
    assert [s.timestep for s in recorded_steps(rec)] == [901.0, 501.0, 1.0]


def test_unknown_hook_point_lists_valid_ones(tiny_pipe):
    with (
        pytest.raises(ValueError, match="mid_block.attentions.0") as error,
        record(tiny_pipe, ["mid_block.attention.0"]),
    ):
        pass
    assert "unknown hook point 'mid_block.attention.0'" in str(error.value)
    assert hook_count(tiny_pipe) == 0


def test_hooks_are_removed_when_generation_raises(tiny_pipe):
    def broken(delta, t, branch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), edit(tiny_pipe, {MID: broken}):
        generate(tiny_pipe, ["a cat"])
    assert hook_count(tiny_pipe) == 0
    with pytest.raises(KeyError), record(tiny_pipe, SD14_BLOCKS):
        raise KeyError("inside the block")
    assert hook_count(tiny_pipe) == 0


def test_edit_returning_none_changes_nothing(tiny_pipe):
    plain = generate(tiny_pipe, ["a cat"])
    with edit(tiny_pipe, {MID: lambda delta, t, branch: None}):
        untouched = generate(tiny_pipe, ["a cat"])
    assert (plain == untouched).all()


def test_edit_replaces_the_update_of_one_branch(tiny_pipe):
    plain = generate(tiny_pipe, ["a cat"])

    def zero_cond(delta, t, branch):
        return torch.zeros_like(delta) if branch == "cond" else None

    with edit(tiny_pipe, {MID: zero_cond}), record(tiny_pipe, [MID]) as rec:
        edited = generate(tiny_pipe, ["a cat"])
    assert not (plain == edited).all()
    assert all(r.delta.abs().max() == 0 for r in rec.of(MID, "cond"))
    assert max(r.delta.abs().max() for r in rec.of(MID, "uncond")) > 0
