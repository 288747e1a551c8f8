"""Benchmark Revelio feature extraction against a plain U-Net forward at the same batch.

    python -m scripts.bench_features --threads 1                              # tiny U-Net
    python -m scripts.bench_features --threads 1 --unet sd14 --batch 2 --repeats 3

Variants, each on the same batch of latents at timestep 25 (VAE encode excluded, since
the plain forward has none; it is timed on its own):
(a) plain: one U-Net forward on noisy latents with the empty prompt's embedding;
(b) extraction: per-image noise, `add_noise`, one forward with the block-output hooks that
    stops after the last requested layer, spatial pooling and writing the pooled features
    of every layer to a feature cache (`FeatureExtractor.features_at` + `save_features`);
(c) the same with the whole forward run (no early stop), to show what the hooks cost.
Throughput is images/s; the target is (b) / (a) >= 0.95. Timings are medians over
repetitions that alternate between the variants, after one warm-up each.
"""

import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

import torch
from simple_parsing import field

from core.diffusion.tiny import build_tiny_pipeline, sd14_shaped_pipeline
from core.revelio.block_outputs import block_outputs
from core.revelio.feature_cache import save_features
from core.revelio.features import UNET_LAYERS, FeatureExtractor, image_noise, pool
from core.runtime import command, default_device
from scripts.bench_core import alternate

TIMESTEP = 25


def variants(extractor: FeatureExtractor, latents: torch.Tensor, cache: str) -> dict:
    unet, embedding = extractor.denoiser, extractor.condition.expand(len(latents), -1, -1)
    layers = extractor.layers(UNET_LAYERS)
    t = torch.full((len(latents),), TIMESTEP, device=latents.device)
    noise = image_noise(latents.shape[1:], 0, range(len(latents))).to(latents)
    noisy = extractor.scheduler.add_noise(latents, noise, t)

    @torch.no_grad()
    def plain():
        unet(noisy, t, encoder_hidden_states=embedding)

    def extraction():
        found = extractor.features_at(latents, TIMESTEP, layers, batch_size=len(latents))
        for layer in layers:
            save_features(cache, layer, TIMESTEP, found[layer]["pooled"])

    @torch.no_grad()
    def full_forward():
        with block_outputs(unet, layers) as maps:
            unet(
                extractor.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=embedding
            )
        for layer in layers:
            save_features(cache, layer, TIMESTEP, pool(maps[layer]).cpu())

    return {"plain": plain, "extraction": extraction, "full_forward": full_forward}


@dataclass
class BenchConfig:
    """Settings of `python -m scripts.bench_features`."""

    unet: Literal["tiny", "sd14"] = "tiny"
    """The tiny test U-Net or an SD v1.4-shaped one (random weights)."""
    batch: int = 8
    """Images per batch."""
    repeats: int = 15
    """Timed repetitions of each variant."""
    threads: int | None = None
    """Torch CPU threads (default: torch's)."""
    device: str = field(default_factory=default_device)
    """Torch device."""


def measure(pipe, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per batch of each variant, and of the VAE encode ("vae")."""
    device = pipe.device
    extractor = FeatureExtractor.from_pipeline(pipe)
    side = extractor.resolution
    pixels = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    pixels = (pixels * 2 - 1).to(device, pipe.vae.dtype)

    @torch.no_grad()
    def encode() -> torch.Tensor:
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor

    latents = encode()
    with tempfile.TemporaryDirectory() as cache:
        medians = alternate(variants(extractor, latents, cache), repeats, device)
    vae = alternate({"vae": encode}, max(1, repeats // 3), device)["vae"]
    return {**medians, "vae": vae}


def bench(config: BenchConfig) -> dict[str, float]:
    """`measure` on the configured U-Net, printed as a table."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    pipe = (build_tiny_pipeline() if config.unet == "tiny" else sd14_shaped_pipeline()).to(device)
    medians = measure(pipe, config.batch, config.repeats)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    print(
        f"{config.unet} U-Net, {side}x{side} images, batch {config.batch}, device {device}, "
        f"{torch.get_num_threads()} threads, median of {config.repeats}"
    )
    timed_variants = {name: seconds for name, seconds in medians.items() if name != "vae"}
    rate = {name: config.batch / seconds for name, seconds in timed_variants.items()}
    for name, seconds in timed_variants.items():
        ratio = rate[name] / rate["plain"]
        print(
            f"  {name:13s} {seconds * 1000:9.1f} ms/batch {rate[name]:8.2f} images/s  {ratio:.3f}x"
        )
    print(f"  VAE encode    {medians['vae'] * 1000:9.1f} ms/batch (not in the figures above)")
    return medians


main = command(BenchConfig, bench, "python -m scripts.bench_features", __doc__)

if __name__ == "__main__":
    sys.exit(main())
