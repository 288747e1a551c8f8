"""The toy text-to-image model of the shapes world: a small Stable Diffusion, built from configs.

Every part is the real diffusers/transformers class a Stable Diffusion pipeline uses, so
`StableDiffusionPipeline.from_pretrained(folder)` loads the trained model and the core's
hooks, SAEs and interventions work on it unchanged:

- `AutoencoderKL` with 2 blocks: images <-> latents of half their side, 4 channels;
- `CLIPTextModel` (2 layers) with a `CLIPTokenizer` whose vocabulary the project writes
  from the world's words (`core.shapes.world.VOCABULARY`);
- `UNet2DConditionModel` with SD v1.4's block types and two layers per block, so the
  paper's three hook points exist under their SD v1.4 names (but no attention at the
  latent resolution, see `ToyModelConfig.attention_at_top`);
- DDIM with SD v1.4's noise schedule.

Its DiT twin (`TwinConfig`) keeps that VAE, tokenizer and text encoder and replaces the
U-Net with a `PixArtTransformer2DModel` of about as many parameters (PixArt-α's layout:
self-attention, cross-attention to the text, adaLN-single; no skip connections), assembled
as a `PixArtAlphaPipeline`.

`TOY_SCALES["cpu"]` is what the shipped weights use: a 32x32 world (16x16 latents) whose
2.5M-parameter U-Net trains on a 2-core CPU; `TOY_SCALES["full"]` is a 64x64 one for a GPU
(about 11M parameters, 22 MB in fp16, which leaves room for its SAEs under 30 MB);
`TOY_SCALES["smoke"]` is small enough to train in the CPU tests.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from core.diffusion.tiny import SD14_SCHEDULER
from core.diffusion.tokenizer import write_clip_tokenizer
from core.shapes.world import VOCABULARY


@dataclass(frozen=True)
class ToyModelConfig:
    image_size: int = 64
    """Image side in pixels; latents are half of it."""
    vae_widths: tuple[int, ...] = (32, 64)
    """Channels of the VAE's blocks; 2 blocks downsample by 2."""
    text_width: int = 128
    """Hidden size of the text encoder, also the U-Net's cross-attention width."""
    text_layers: int = 2
    unet_widths: tuple[int, int, int, int] = (64, 64, 128, 128)
    """Channels of the U-Net's 4 levels (SD v1.4: 320, 640, 1280, 1280)."""
    attention_heads: int = 4
    """Heads per attention layer (diffusers' `attention_head_dim`); SD v1.4 has 8."""
    attention_at_top: bool = False
    """Attention layers also at the latent resolution, as SD v1.4 has them. That level's
    attention over 1,024 positions with 8-wide heads took most of a training step's time on
    an H200, so the toy U-Net starts attending one level down; the paper's hook points are
    all further down and keep their SD v1.4 names."""
    norm_groups: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ToyModelConfig":
        tuples = {k: tuple(v) for k, v in values.items() if isinstance(v, list)}
        return cls(**{**values, **tuples})


TOY_SCALES: dict[str, ToyModelConfig] = {
    "full": ToyModelConfig(),
    "cpu": ToyModelConfig(
        image_size=32,
        vae_widths=(32, 32),
        text_width=64,
        unet_widths=(32, 32, 64, 64),
        attention_heads=4,
        norm_groups=16,
    ),
    "smoke": ToyModelConfig(
        image_size=32,
        vae_widths=(16, 16),
        text_width=32,
        unet_widths=(16, 16, 32, 32),
        attention_heads=4,
        norm_groups=8,
    ),
}


def toy_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write the world's tokenizer into `folder` and load it as any CLIP tokenizer."""
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, VOCABULARY))


def toy_vae(config: ToyModelConfig) -> AutoencoderKL:
    blocks = len(config.vae_widths)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=config.vae_widths,
        latent_channels=4,
        norm_num_groups=min(config.norm_groups, min(config.vae_widths)),
        sample_size=config.image_size,
    )


def toy_text_encoder(config: ToyModelConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=max(1, config.text_width // 32),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def toy_unet(config: ToyModelConfig) -> UNet2DConditionModel:
    """SD v1.4's U-Net layout (block types, 2 layers per block) at the config's widths,
    with attention at the top level only if `config.attention_at_top`."""
    top = "CrossAttn" if config.attention_at_top else ""
    return UNet2DConditionModel(
        sample_size=config.image_size // 2 ** (len(config.vae_widths) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=(
            f"{top}DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", f"{top}UpBlock2D"),
        block_out_channels=config.unet_widths,
        layers_per_block=2,
        norm_num_groups=config.norm_groups,
        cross_attention_dim=config.text_width,
        attention_head_dim=config.attention_heads,
    )


@dataclass(frozen=True)
class TwinConfig:
    """The DiT twin's transformer: PixArt-α's layout at the toy U-Net's size (2.3M against
    its 2.4M parameters at the `cpu` scale)."""

    width: int = 128
    depth: int = 8
    heads: int = 4
    patch_size: int = 2
    """Latent pixels per token side: 16x16 latents make an 8x8 grid of tokens."""

    def to_dict(self) -> dict:
        return asdict(self)


TWIN_BLOCKS = ("transformer_blocks.2", "transformer_blocks.4", "transformer_blocks.6")
"""The twin's early, middle and late blocks (a quarter, half and three quarters of its 8),
standing in for the U-Net's down, mid and up hook points; the middle one is steered."""


def toy_transformer(twin: TwinConfig, model: ToyModelConfig) -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        sample_size=model.image_size // 2 ** (len(model.vae_widths) - 1),
        num_layers=twin.depth,
        patch_size=twin.patch_size,
        attention_head_dim=twin.width // twin.heads,
        num_attention_heads=twin.heads,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=twin.width,
        caption_channels=model.text_width,
        norm_num_groups=min(model.norm_groups, twin.width),
    )


def assemble_twin(vae, text_encoder, tokenizer, transformer) -> PixArtAlphaPipeline:
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=toy_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def toy_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD14_SCHEDULER)


def build_toy_parts(config: ToyModelConfig, tokenizer: CLIPTokenizer, seed: int):
    """(vae, text_encoder, unet) with weights drawn from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return toy_vae(config), toy_text_encoder(config, tokenizer), toy_unet(config)


def assemble_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=toy_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
