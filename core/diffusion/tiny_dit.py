"""Randomly initialised diffusion-transformer pipelines, small enough for CPU tests: the
PixArt-α/Σ, SD3 and FLUX.1 layouts, built with diffusers' own classes from small configs.

Each has its real pipeline class, denoiser class, block classes and scheduler (DDIM for
PixArt, flow matching for SD3 and FLUX), so the hooks meet the real block signatures, token
layouts and timestep conventions; only the widths and depths are small. Their T5 encoders
read the small CLIP tokenizer of `core.diffusion.tiny`, told T5's 512-token length (a real
T5 tokenizer needs a SentencePiece model that cannot be written from a word list). Images
are 32x32 pixels.
"""

import tempfile
from collections.abc import Callable

import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from core.diffusion.tiny import SD14_SCHEDULER, TINY_WORDS, tiny_text_config, tiny_vae
from core.diffusion.tokenizer import write_clip_tokenizer

TEXT_WIDTH = 32


def tiny_t5(tokenizer: CLIPTokenizer, width: int = TEXT_WIDTH) -> T5EncoderModel:
    """A small T5 encoder, in eval mode (T5's dropout would make every call differ)."""
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    return encoder.eval()


T5_LENGTH = 512
"""The text length of T5's tokenizer, which DiT pipelines' T5 slots read."""


def _seeded(seed: int, build: Callable[[CLIPTokenizer, CLIPTokenizer], object]):
    """`build(tokenizer, t5_tokenizer)` with the global RNG seeded and restored afterwards."""
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer(folder, TINY_WORDS)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        t5_tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=T5_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = build(tokenizer, t5_tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-α's layout: 4 `transformer_blocks` (self-attention, cross-attention to T5,
    adaLN-single), patch 2 on 16x16 latents (an 8x8 grid), DDIM as PixArt's DPM-Solver's
    stand-in."""
    return _seeded(
        seed,
        lambda _, t5_tokenizer: PixArtAlphaPipeline(
            tokenizer=t5_tokenizer,
            text_encoder=tiny_t5(t5_tokenizer),
            vae=tiny_vae(),
            transformer=PixArtTransformer2DModel(
                sample_size=16,
                num_layers=4,
                patch_size=2,
                attention_head_dim=8,
                num_attention_heads=4,
                in_channels=4,
                out_channels=8,
                cross_attention_dim=32,
                caption_channels=TEXT_WIDTH,
                norm_num_groups=8,
            ),
            scheduler=DDIMScheduler(**SD14_SCHEDULER),
        ),
    )


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3's layout: 4 joint `transformer_blocks` (image and text streams; the last returns
    the image stream only), patch 2 on 16x16 latents, two CLIP encoders and T5, flow
    matching."""

    def build(tokenizer: CLIPTokenizer, t5_tokenizer: CLIPTokenizer) -> StableDiffusion3Pipeline:
        clip = tiny_text_config(tokenizer, projection_dim=16)
        vae = tiny_vae()
        vae.register_to_config(shift_factor=0.0)  # SD3's and FLUX's pipelines read it
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=16,
                patch_size=2,
                in_channels=4,
                num_layers=4,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=2 * TEXT_WIDTH,
                caption_projection_dim=32,
                pooled_projection_dim=32,
                out_channels=4,
                pos_embed_max_size=16,
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=CLIPTextModelWithProjection(clip),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip),
            tokenizer_2=tokenizer,
            text_encoder_3=tiny_t5(t5_tokenizer, width=2 * TEXT_WIDTH),
            tokenizer_3=t5_tokenizer,
        )

    return _seeded(seed, build)


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1's layout: 2 dual-stream `transformer_blocks` and 2 `single_transformer_blocks`,
    2x2-packed latents (an 8x8 grid of tokens for 16x16 latents), CLIP (pooled) and T5, flow
    matching; no unconditional branch (guidance-distilled)."""

    def build(tokenizer: CLIPTokenizer, t5_tokenizer: CLIPTokenizer) -> FluxPipeline:
        vae = tiny_vae()
        vae.register_to_config(shift_factor=0.0)
        return FluxPipeline(
            transformer=FluxTransformer2DModel(
                patch_size=1,
                in_channels=16,
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=TEXT_WIDTH,
                pooled_projection_dim=TEXT_WIDTH,
                axes_dims_rope=(4, 4, 8),
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
            tokenizer=tokenizer,
            text_encoder_2=tiny_t5(t5_tokenizer),
            tokenizer_2=t5_tokenizer,
        )

    return _seeded(seed, build)
