"""Generate images from prompts, each from its own seed, so that any image can be made again."""

from collections.abc import Callable, Sequence

import torch


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    resolution: int | None = None,
    output_type: str = "pil",
    callback_on_step_end: Callable | None = None,
):
    """One image per prompt, prompt i from a generator seeded with `seeds[i]` on the
    pipeline's device: the same image whatever the batch it is generated in.

    `resolution` is the side in pixels (None: the pipeline's default); `output_type` and
    `callback_on_step_end` are passed to the pipeline as they are. Returns its `images`.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    return pipe(
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator(pipe.device).manual_seed(seed) for seed in seeds],
        height=resolution,
        width=resolution,
        output_type=output_type,
        callback_on_step_end=callback_on_step_end,
    ).images


def image_size(pipe, resolution: int | None = None) -> tuple[int, int]:
    """(H, W) of the pipeline's images at side `resolution` (None: the pipeline's default)."""
    side = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def on_each_step(on_step: Callable[[int, int], None], steps: int) -> Callable:
    """A `callback_on_step_end` that calls `on_step(done, steps)` after each step."""

    def step_end(pipe, index: int, timestep, callback_kwargs: dict) -> dict:
        on_step(index + 1, steps)
        return callback_kwargs

    return step_end


def generate_image(
    pipe, prompt: str, seed: int, steps: int, guidance_scale: float, resolution: int | None
):
    """One image as PIL, from seed `seed` (`generate_images` of one prompt)."""
    return generate_images(
        pipe, [prompt], [seed], steps=steps, guidance_scale=guidance_scale, resolution=resolution
    )[0]
