"""Randomly initialised Stable-Diffusion-shaped pipelines, small enough for CPU tests.

The `tiny` U-Net has SD v1.4's block types and layer counts, so it has the same 16
`Transformer2DModel` blocks under the same names (`down_blocks.2.attentions.1`,
`mid_block.attentions.0`, ...); only the widths are small. Images are 32x32 pixels,
latents 16x16x4. `build_tiny_sdxl_pipeline` does the same for SDXL's layout (two text
encoders, SDXL's 11 block names, its added time conditioning), standing in for SDXL-Turbo.
"""

import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from core.diffusion.tokenizer import write_clip_tokenizer

TINY_WORDS = (
    "a an the of and on in with at photo picture painting drawing style red green blue "
    "yellow black white orange purple cat dog car tree house person bird flower boat "
    "horse sky sea mountain city street table chair cup apple banana circle square"
).split()

SD14_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def tiny_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    )


def sd14_unet() -> UNet2DConditionModel:
    """SD v1.4's U-Net architecture (860M parameters) with random weights."""
    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8,
        layers_per_block=2,
    )


def tiny_vae(num_blocks: int = 2) -> AutoencoderKL:
    """A small VAE that downsamples by 2 ** (num_blocks - 1)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=(32,) * num_blocks,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_sdxl_unet(text_width: int, pooled_width: int, time_width: int = 8) -> UNet2DConditionModel:
    """SDXL's block layout (its 11 transformer blocks' names) at small widths, one
    transformer layer per block where SDXL has 1, 2 and 10."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=text_width,
        attention_head_dim=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_width,
        projection_class_embeddings_input_dim=6 * time_width + pooled_width,
    )


def tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int = 32, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int = 32) -> CLIPTextModel:
    return CLIPTextModel(tiny_text_config(tokenizer, hidden_size))


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Build the `tiny` pipeline; the same seed always gives the same weights."""
    return _random_pipeline(seed, lambda tok: (tiny_unet(), tiny_vae(), tiny_text_encoder(tok)))


def sd14_shaped_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD v1.4's U-Net with random weights, for shape and speed checks.

    Only the U-Net is full size; the VAE (8x downsampling, as SD's) and the text
    encoder (768 wide, as SD's) are small.
    """
    return _random_pipeline(
        seed, lambda tok: (sd14_unet(), tiny_vae(4), tiny_text_encoder(tok, hidden_size=768))
    )


def _random_pipeline(seed: int, build) -> StableDiffusionPipeline:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, TINY_WORDS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = build(tokenizer)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD14_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A random SDXL-layout pipeline with SDXL-Turbo's scheduler (Euler ancestral, trailing
    timesteps); the same seed always gives the same weights. Images are 32x32 pixels."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, TINY_WORDS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(tokenizer, projection_dim=32))
        unet = tiny_sdxl_unet(text_width=64, pooled_width=32)
        vae = tiny_vae()
    scheduler = EulerAncestralDiscreteScheduler(
        **{k: SD14_SCHEDULER[k] for k in ("num_train_timesteps", "beta_start", "beta_end")},
        beta_schedule="scaled_linear",
        timestep_spacing="trailing",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
