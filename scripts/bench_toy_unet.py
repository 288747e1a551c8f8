"""Cost of one training step of the toy U-Net with and without attention at the top level.

    python -m scripts.bench_toy_unet                 # CPU, batch 16
    python -m scripts.bench_toy_unet --batch 256     # on a GPU, bf16 autocast

Variants, each a forward and backward pass of the full-scale toy U-Net (random weights)
on the same noisy latents, timesteps and caption embeddings:
(a) `sd14_layout`: attention at every level but the lowest, 8 heads, as SD v1.4;
(b) `toy`: the shipped `ToyModelConfig` (no attention at the 32x32 level, 4 heads).
Timings are medians over repetitions that alternate between the variants, after one
warm-up each; the ratio (a) / (b) is what the toy layout saves per step.
"""

import sys
import tempfile
from dataclasses import dataclass, replace

import torch
from simple_parsing import field

from core.runtime import command, default_device
from core.toy.model import TOY_SCALES, build_toy_parts, parameter_count, toy_tokenizer
from scripts.bench_core import alternate


@dataclass
class BenchConfig:
    """Settings of `python -m scripts.bench_toy_unet`."""

    batch: int = 16
    """Latents per step."""
    repeats: int = 3
    """Timed repetitions of each variant."""
    device: str = field(default_factory=default_device)
    """Torch device (bf16 autocast on CUDA)."""


def bench(config: BenchConfig) -> dict[str, float]:
    """Median seconds per training step of each layout; printed with their ratio."""
    device = torch.device(config.device)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = toy_tokenizer(folder)
    toy = TOY_SCALES["full"]
    layouts = {"sd14_layout": replace(toy, attention_at_top=True, attention_heads=8), "toy": toy}
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(config.batch, 4, 32, 32, generator=generator).to(device)
    timesteps = torch.randint(1000, (config.batch,), generator=generator).to(device)
    ids = tokenizer(
        ["a red circle and a blue star on a gray striped background"] * config.batch,
        padding="max_length",
        return_tensors="pt",
    ).input_ids.to(device)

    def step_of(layout) -> tuple:
        _, text_encoder, unet = build_toy_parts(layout, tokenizer, seed=0)
        text_encoder, unet = text_encoder.to(device), unet.to(device)

        def step():
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                context = text_encoder(ids)[0]
                unet(latents, timesteps, context).sample.float().square().mean().backward()

        return step, parameter_count(unet)

    steps = {name: step_of(layout) for name, layout in layouts.items()}
    medians = alternate({name: s for name, (s, _) in steps.items()}, config.repeats, device)
    print(f"toy U-Net training step, batch {config.batch}, {device}, median of {config.repeats}")
    for name, seconds in medians.items():
        print(f"  {name:12s} {steps[name][1] / 1e6:5.2f}M parameters {seconds * 1000:9.1f} ms")
    print(f"  sd14_layout / toy: {medians['sd14_layout'] / medians['toy']:.2f}x")
    return medians


main = command(BenchConfig, bench, "python -m scripts.bench_toy_unet", __doc__)

if __name__ == "__main__":
    sys.exit(main())
