"""Generate images from prompts, each from its own seed, so that any image can be made again."""

import inspect
from collections.abc import Callable, Sequence

import torch

from core.diffusion.layouts import denoiser_of

EXACT_OPTIONS = {"use_resolution_binning": False, "clean_caption": False}
"""Options of some pipelines (PixArt's), off where a pipeline takes them: binning would
generate at the nearest of its trained sizes instead of the size asked for, and caption
cleaning needs beautifulsoup4 and ftfy (not installed), without which the pipeline turns it
off itself with a warning on every call."""


def call_options(pipe) -> dict[str, object]:
    """The `EXACT_OPTIONS` that this pipeline's call takes, and its `text_length`."""
    parameters = inspect.signature(pipe.__call__).parameters
    options = {name: value for name, value in EXACT_OPTIONS.items() if name in parameters}
    if "max_sequence_length" in parameters:
        default = parameters["max_sequence_length"].default
        options["max_sequence_length"] = text_length(pipe, default)
    return options


def text_length(pipe, default: int) -> int:
    """The text tokens a DiT pipeline asks its T5 tokenizer for (its last one: PixArt's
    `tokenizer`, FLUX's `tokenizer_2`, SD3's `tokenizer_3`): the pipeline's default, or
    fewer where that tokenizer reads fewer (the toy DiT twin reads the toy's CLIP tokens,
    77, where PixArt's pipeline asks for 120)."""
    names = ("tokenizer_3", "tokenizer_2", "tokenizer")
    tokenizer = next(getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None)
    return min(default, tokenizer.model_max_length)


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
        **call_options(pipe),
    ).images


def image_size(pipe, resolution: int | None = None) -> tuple[int, int]:
    """(H, W) of the pipeline's images at side `resolution` (None: the pipeline's default,
    its `default_sample_size` where it has one, as SD3's and FLUX's, else its denoiser's)."""
    latent_side = getattr(pipe, "default_sample_size", None)
    side = (
        resolution or (latent_side or denoiser_of(pipe).config.sample_size) * pipe.vae_scale_factor
    )
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
