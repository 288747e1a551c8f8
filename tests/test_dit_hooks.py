"""The hooks on diffusion transformers: PixArt-α, SD3 and FLUX.1 layouts, each a small
random pipeline built with diffusers' own classes (`core.diffusion.tiny_dit`). A block's
residual update reads as feature maps on the patch grid, t comes from the denoiser's own
timestep argument, and an edit moves the block's output by exactly what it adds."""

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from core.diffusion.hooks import edit, record, step_index
from core.diffusion.layouts import Block, block_width, denoiser_of, hook_points, layout_of
from core.diffusion.sampling import generate_images
from core.diffusion.tiny_dit import (
    build_tiny_flux_pipeline,
    build_tiny_pixart_pipeline,
    build_tiny_sd3_pipeline,
)
from tests.helpers import hook_count

BUILDS = {
    "PixArt": build_tiny_pixart_pipeline,
    "SD3": build_tiny_sd3_pipeline,
    "FLUX": build_tiny_flux_pipeline,
}
GUIDANCE = {"PixArt": 4.5, "SD3": 7.0, "FLUX": 3.5}  # FLUX's is distilled: no uncond branch
BLOCKS = {
    "PixArt": ["transformer_blocks.0", "transformer_blocks.3"],
    "SD3": ["transformer_blocks.0", "transformer_blocks.3"],
    "FLUX": ["transformer_blocks.1", "single_transformer_blocks.0"],
}


@pytest.fixture(scope="module", params=list(BUILDS))
def dit(request):
    return request.param, BUILDS[request.param]()


def generate(pipe, name: str, steps: int = 3):
    return generate_images(
        pipe,
        ["a red circle"],
        [0],
        steps=steps,
        guidance_scale=GUIDANCE[name],
        resolution=32,
        output_type="np",
    )[0]


def test_blocks_are_named_as_in_the_model(dit):
    name, pipe = dit
    denoiser = denoiser_of(pipe)
    assert layout_of(denoiser).name == name
    points = hook_points(denoiser)
    if name == "FLUX":
        assert points == [f"transformer_blocks.{i}" for i in range(2)] + [
            f"single_transformer_blocks.{i}" for i in range(2)
        ]
    else:
        assert points == [f"transformer_blocks.{i}" for i in range(4)]
    unknown = "unknown hook point 'mid_block.attentions.0'; valid"
    with pytest.raises(ValueError, match=unknown), record(pipe, ["mid_block.attentions.0"]):
        pass


def test_records_are_maps_on_the_patch_grid_at_the_schedules_t(dit):
    name, pipe = dit
    plain = generate(pipe, name)
    with record(pipe, BLOCKS[name]) as rec:
        recorded = generate(pipe, name)
    assert (plain == recorded).all()
    branches = ("cond",) if name == "FLUX" else ("uncond", "cond")
    assert {r.branch for r in rec.records} == set(branches)
    width = block_width(dict(denoiser_of(pipe).named_modules())[BLOCKS[name][0]])
    for block in BLOCKS[name]:
        records = rec.of(block, "cond")
        assert [r.delta.shape for r in records] == [(1, width, 8, 8)] * 3  # 16x16 latents
        ts = [
            float(ts) / pipe.scheduler.config.num_train_timesteps for ts in pipe.scheduler.timesteps
        ]
        assert [r.step.t for r in records] == ts and [r.step.index for r in records] == [0, 1, 2]
    assert records[0].step.t == (1.0 if name != "PixArt" else 0.667)
    assert hook_count(pipe) == 0


def test_an_edit_of_zero_changes_nothing_and_a_direction_moves_the_output_by_itself(dit):
    name, pipe = dit
    block = BLOCKS[name][0]
    module = dict(denoiser_of(pipe).named_modules())[block]
    view = Block(type(module).__name__)
    width = block_width(module)
    direction = torch.randn(width)
    outputs = []

    def keep(module, args, kwargs, output):  # after the edit's hook: the output as edited
        outputs.append(view.output(output).detach().clone())

    def run(edit_fn=None):
        outputs.clear()
        with edit(pipe, {block: edit_fn or (lambda delta, t, branch: None)}):
            handle = module.register_forward_hook(keep, with_kwargs=True)  # runs after the edit
            try:
                image = generate(pipe, name)
            finally:
                handle.remove()
        return image, outputs[0]  # the first step's call, whose input no edit has changed

    plain, before = run()
    unchanged, _ = run(lambda delta, t, branch: None)  # as a strength-0 intervention returns
    assert (unchanged == plain).all()

    def add(delta, t, branch):
        return delta + direction[:, None, None] if branch == "cond" else None

    image, after = run(add)
    moved = after - before  # [batch, tokens, channels]
    cond = moved[-1]
    assert torch.allclose(cond, direction.expand_as(cond), atol=1e-5)
    if name != "FLUX":
        assert moved[0].abs().max() == 0  # the uncond half is left alone
    assert not (image == plain).all()


def test_a_joint_blocks_text_stream_is_recorded_on_request(dit):
    name, pipe = dit
    block = BLOCKS[name][0]
    if name == "PixArt":
        no_text = "a BasicTransformerBlock has no text stream"
        with pytest.raises(ValueError, match=no_text), record(pipe, [block], stream="text"):
            pass
        return
    with record(pipe, [block], stream="text") as rec:
        generate(pipe, name, steps=1)
    delta = rec.of(block, "cond")[0].delta
    width = block_width(dict(denoiser_of(pipe).named_modules())[block], "text")
    assert delta.shape[:2] == (1, width) and delta.shape[3] == 1  # [batch, C, text tokens, 1]
    if name == "SD3":  # its last joint block returns no text stream
        last = ["transformer_blocks.3"]
        refused = pytest.raises(ValueError, match="returns no text stream")
        with refused, record(pipe, last, stream="text"):
            generate(pipe, name, steps=1)


def test_a_layout_the_hooks_do_not_know_is_named_with_those_they_do():
    unconditional = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    )
    with pytest.raises(ValueError) as refused:
        hook_points(unconditional)
    assert str(refused.value).startswith(
        "The hooks do not know the denoiser UNet2DModel; they know "
    )
    for known in (
        "UNet2DConditionModel (U-Net)",
        "PixArtTransformer2DModel (PixArt)",
        "FluxTransformer2DModel (FLUX)",
    ):
        assert known in str(refused.value)


def test_a_timestep_in_lower_precision_finds_its_step():
    ts = [1.0, 0.667, 0.333]
    bf16 = float(torch.tensor(0.667 * 1000, dtype=torch.bfloat16)) / 1000  # 0.668
    assert step_index(ts, bf16) == 1
    assert step_index(ts, 0.5) == -1  # between two steps: none of them
    assert step_index([], 0.5) == -1


def test_a_class_conditioned_dit_called_directly_is_recorded_on_its_grid():
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    latents, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad(), record(dit, ["transformer_blocks.1"], cfg=False) as rec:
        dit(latents, timestep=torch.tensor([500, 500]), class_labels=labels)
    (only,) = rec.records
    assert only.delta.shape == (2, 16, 4, 4) and only.step.t == 0.5  # 8x8 latents, patch 2
