"""The cost of a first-use dictionary build for sdxl-turbo, measured on this machine with
random weights in the real architectures (nothing is downloaded): one SDXL U-Net call at
512 px (64x64 latents), the SDXL VAE's decode, CLIPSeg's forward pass at its 352 px, and
Grounded SAM's three models on one image (the CLIP tagger at 224 px, Grounding DINO tiny
at its 800 px with one query of 10 names, SAM ViT-B at its 1024 px with 3 boxes).

    python -m scripts.bench_first_use_build      # prints seconds per call, median of 3

The app's estimate (`core.views.dictionary_build.estimate_seconds`) scales these by a
stated GPU/CPU ratio; docs/app.md records the numbers.
"""

import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import (
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    SamConfig,
    SamModel,
)


def median_seconds(call, repeats: int = 3) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL's U-Net configuration (2.6B parameters), random weights."""
    return UNet2DConditionModel(
        sample_size=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


@torch.inference_mode()
def unet_seconds() -> float:
    unet = sdxl_unet().eval()
    latents, text = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 2048)
    added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    return median_seconds(lambda: unet(latents, 999, text, added_cond_kwargs=added))


@torch.inference_mode()
def vae_seconds() -> float:
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
    ).eval()
    latents = torch.randn(1, 4, 64, 64)
    return median_seconds(lambda: vae.decode(latents))


@torch.inference_mode()
def clipseg_seconds() -> float:
    clipseg = CLIPSegForImageSegmentation(CLIPSegConfig()).eval()
    pixels, ids = torch.randn(10, 3, 352, 352), torch.randint(0, 1000, (10, 8))
    return median_seconds(lambda: clipseg(input_ids=ids, pixel_values=pixels))


@torch.inference_mode()
def grounded_sam_seconds() -> dict[str, float]:
    """Per image: the tagger's image embedding (its vocabulary's text embeddings are made
    once), the detector's one query, SAM's image encoder and mask decoder."""
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).eval()
    dino = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval()
    sam = SamModel(SamConfig()).eval()
    ids = torch.randint(1000, 2000, (1, 30))
    return {
        "CLIP tagger": median_seconds(lambda: clip(pixel_values=torch.randn(1, 3, 224, 224))),
        "Grounding DINO": median_seconds(
            lambda: dino(
                pixel_values=torch.randn(1, 3, 800, 800),
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
            )
        ),
        "SAM": median_seconds(
            lambda: sam(
                pixel_values=torch.randn(1, 3, 1024, 1024),
                input_boxes=torch.rand(1, 3, 4) * 1024,
                multimask_output=False,
            )
        ),
    }


def main() -> None:
    torch.manual_seed(0)
    print(f"SDXL U-Net, one call at 512 px: {unet_seconds():.2f} s")
    print(f"SDXL VAE, one decode to 512 px: {vae_seconds():.2f} s")
    print(f"CLIPSeg, one image with 10 words: {clipseg_seconds():.2f} s")
    parts = grounded_sam_seconds()
    for name, seconds in parts.items():
        print(f"Grounded SAM's {name}, one image: {seconds:.2f} s")
    print(f"Grounded SAM, one image: {sum(parts.values()):.2f} s")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
