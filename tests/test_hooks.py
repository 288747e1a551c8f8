from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from core.diffusion.hooks import edit, record
from core.diffusion.layouts import hook_points
from core.diffusion.presets import SD14_BLOCKS
from core.emergence.composition import latent_grid
from core.sae.bank import SAEBank
from core.training.activations import to_rows
from tests.helpers import dense_latents, hook_count, recorded_steps, seeded, write_saeuron

MID = "mid_block.attentions.0"
SAEURON_BLOCK = "up_blocks.1.attentions.1"
"""The block of SAeUron's object-unlearning SAE (64 channels in the tiny U-Net)."""


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
    names = hook_points(tiny_pipe.unet)
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


@contextmanager
def block_outputs(pipe, block: str) -> Iterator[list[torch.Tensor]]:
    """The outputs of `block` at every U-Net call, captured by a plain forward hook."""
    outputs = []
    module = dict(pipe.unet.named_modules())[block]
    handle = module.register_forward_hook(lambda m, args, out: outputs.append(out[0].clone()))
    try:
        yield outputs
    finally:
        handle.remove()


def test_the_output_site_reads_and_edits_the_block_output(tiny_pipe):
    with record(tiny_pipe, [MID], site="output") as outputs, record(tiny_pipe, [MID]) as deltas:
        plain = generate(tiny_pipe, ["a cat"], steps=2)
    first = recorded_steps(outputs)[0].t
    output, delta = outputs.at(MID, first, "cond"), deltas.at(MID, first, "cond")
    assert output.site == "output" and delta.site == "delta"
    assert not torch.allclose(output.delta, delta.delta)

    def halve(output, t, branch):
        return output / 2 if branch == "cond" else None

    with edit(tiny_pipe, {MID: halve}, site="output"), block_outputs(tiny_pipe, MID) as seen:
        generate(tiny_pipe, ["a cat"], steps=2)
    uncond, cond = seen[0].chunk(2)
    torch.testing.assert_close(cond, output.delta / 2)
    torch.testing.assert_close(uncond, outputs.at(MID, first, "uncond").delta)

    with edit(tiny_pipe, {MID: lambda output, t, branch: output}, site="output"):
        assert (generate(tiny_pipe, ["a cat"], steps=2) == plain).all()


def test_an_unknown_site_is_refused(tiny_pipe):
    with (
        pytest.raises(ValueError, match="unknown activation site 'input'; choose delta or output"),
        record(tiny_pipe, [MID], site="input"),
    ):
        pass
    assert hook_count(tiny_pipe) == 0


def test_a_saeuron_bank_encodes_the_block_output(tiny_pipe, tmp_path):
    write_saeuron(tmp_path / f"unet.{SAEURON_BLOCK}", d=64, expansion=4, k=8)
    bank = SAEBank.from_pretrained(tmp_path)
    blocks = [SAEURON_BLOCK]
    with (
        record(tiny_pipe, blocks, site=bank.sites(blocks)) as recording,
        record(tiny_pipe, blocks) as deltas,
        block_outputs(tiny_pipe, SAEURON_BLOCK) as outputs,
    ):
        generate(tiny_pipe, ["a red cat"], steps=3)
    records = recording.of(SAEURON_BLOCK, "cond")
    assert len(records) == len(outputs) == 3
    for record_, output in zip(records, outputs, strict=True):
        sae = bank.get(SAEURON_BLOCK, record_.step.t, "cond")  # one SAE for every t
        grid = latent_grid(sae, record_.delta, record_.site)
        cond = output.chunk(2)[1]  # diffusers' CFG batch is [uncond, cond]
        expected = sae.encode_dense(to_rows(cond)).detach()
        got = dense_latents(grid, sae.cfg.num_latents).reshape(expected.shape)
        torch.testing.assert_close(got, expected)
        delta = deltas.at(SAEURON_BLOCK, record_.step.t, "cond").delta
        assert not torch.allclose(sae.encode_dense(to_rows(delta)).detach(), expected)
    message = r"trained on the block output, not on the residual update \(block output minus"
    with pytest.raises(ValueError, match=message):
        latent_grid(sae, delta, "delta")
