"""Benchmark the core engine; prints ratios measured side by side in one run.

    python -m scripts.bench_core                 # tiny preset on this machine
    python -m scripts.bench_core --unet sd14     # full-size SD v1.4 U-Net, random weights

(a) generation while recording the three paper blocks at every step / plain generation;
(b) activation collection throughput / plain generation throughput, same batch size;
(c) SAE training throughput (rows/s) for d=1280, n=5120, k=10: this project's TopK SAE
    against a naive dense TopK SAE, and as a fraction of the bound set by the one dense
    matrix product a step cannot avoid, timed on the same machine in the same run;
(d) generation with a spatial intervention on the three paper blocks / plain generation;
(e) emergence analysis (record, SAE encode and concept map of the three paper blocks at
    every step) / plain generation.
Timings are medians over repetitions that alternate between the compared variants, so
both see the same machine load.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from core.diffusion.hooks import hooked, record
from core.diffusion.presets import SD14_BLOCKS
from core.diffusion.tiny import build_tiny_pipeline, sd14_shaped_pipeline
from core.emergence.composition import concept_map
from core.emergence.concepts import ConceptDictionary
from core.emergence.steer import Intervention, intervene, quadrant_mask
from core.emergence.words import load_word_vectors
from core.sae.bank import SAEBank, SAEKey
from core.sae.model import SAEConfig, TopKSAE
from core.training.activations import GenerationSource
from core.training.trainer import SAETrainer, TrainConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(variants: dict[str, Callable[[], object]], repeats: int, device) -> dict:
    """Median seconds of each variant, run in turn `repeats` times after one warm-up."""
    for fn in variants.values():
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def plain_generation(pipe, batch: int, steps: int, **kwargs) -> Callable[[], object]:
    """Generation of `batch` images with CFG 7.5, latents out (no VAE decode), fixed seed."""
    prompts = ["a photo of a red cat on a table"] * batch

    def generate():
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=7.5,
            output_type="latent",
            generator=torch.Generator(pipe.device).manual_seed(0),
            **kwargs,
        )

    return generate


def bench_generation(pipe, batch: int, steps: int, repeats: int) -> None:
    device = pipe.device
    prompts = ["a photo of a red cat on a table"] * batch

    plain = plain_generation(pipe, batch, steps)

    def recorded():
        with record(pipe, SD14_BLOCKS, device=None):
            plain()

    keys = [SAEKey(b, t, "cond") for b in SD14_BLOCKS for t in (1.0, 0.5, 0.0)]
    source = GenerationSource(
        pipe, prompts, keys, steps=steps, guidance_scale=7.5, batch_size=batch
    )

    def collect():
        source.generate(range(batch))

    t = alternate({"plain": plain, "record": recorded, "collect": collect}, repeats, device)
    print(f"generation, batch {batch}, {steps} steps, CFG: plain {t['plain']:.3f} s")
    print(
        f"(a) recording 3 blocks at every step: {t['record']:.3f} s, "
        f"ratio {t['record'] / t['plain']:.3f}x (target <= 1.03x)"
    )
    print(
        f"(b) collection throughput / plain generation throughput: "
        f"{t['plain'] / t['collect']:.3f}x (target >= 0.95x; {batch / t['collect']:.2f} "
        f"vs {batch / t['plain']:.2f} images/s)"
    )


class DenseTopKSAE(nn.Module):
    """The naive baseline: dense latents, dense decoder matmul, plain MSE loss."""

    def __init__(self, d: int, n: int, k: int):
        super().__init__()
        self.k = k
        self.encoder = nn.Linear(d, n)
        self.decoder = nn.Linear(n, d)

    def forward(self, x):
        pre = torch.relu(self.encoder(x))
        top = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        return self.decoder(z)


def paper_bank(pipe, seed: int = 0) -> SAEBank:
    """Random TopK SAEs (n = 4d, k = 10) for the paper blocks at t in {1.0, 0.5, 0.0}."""
    modules = dict(pipe.unet.named_modules())
    torch.manual_seed(seed)
    saes = []
    for block in SD14_BLOCKS:
        d = modules[block].config.in_channels
        for t in (1.0, 0.5, 0.0):
            cfg = SAEConfig(d, 4 * d, 10, block=block, t=t)
            saes.append(TopKSAE(cfg, device=pipe.device, dtype=pipe.dtype))
    return SAEBank(saes)


def bench_steering(pipe, batch: int, steps: int, repeats: int) -> None:
    """(d) a spatial intervention on the three paper blocks / plain generation."""
    device = pipe.device
    bank = paper_bank(pipe)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    region = quadrant_mask("top_left", (side, side))

    plain = plain_generation(pipe, batch, steps, height=side, width=side)

    def steered(window):
        spec = Intervention("spatial", [1, 2, 3], 400.0, window, region=region)

        def run():
            with intervene(pipe, bank, SD14_BLOCKS, spec, (side, side)):
                plain()

        return run

    t = alternate(
        {"plain": plain, "early": steered((0.6, 1.0)), "all": steered((0.0, 1.0))},
        repeats,
        device,
    )
    print(
        f"(d) spatial intervention on the 3 paper blocks: "
        f"early stage {t['early'] / t['plain']:.3f}x, "
        f"every step {t['all'] / t['plain']:.3f}x plain generation (target <= 1.05x)"
    )


def bench_emergence(pipe, batch: int, steps: int, repeats: int) -> None:
    """(e) record + SAE encode + concept map of the 3 paper blocks at every step / plain."""
    device = pipe.device
    bank = paper_bank(pipe)
    words = load_word_vectors()
    names = ["cat", "dog", "car", "tree", "house", "sky", "table", "person"]
    dictionaries = {
        key: ConceptDictionary.from_labels(
            key, sae.cfg.num_latents, {c: [names[c % len(names)]] for c in range(0, 64, 2)}, words
        ).to(device)
        for key, sae in bank.items()
    }

    plain = plain_generation(pipe, batch, steps)

    def analysed():
        def analyse(block, step, branch, delta):
            if branch == "cond":
                sae = bank.get(block, step.t, branch)
                key = SAEKey(block, sae.cfg.t, branch)
                concept_map(sae, dictionaries[key], delta)

        with hooked(pipe, SD14_BLOCKS, on_delta=analyse):
            plain()

    t = alternate({"plain": plain, "analysed": analysed}, repeats, device)
    print(
        f"(e) emergence analysis (record + encode + concept maps, 3 blocks, every step): "
        f"{t['analysed'] / t['plain']:.3f}x plain generation (target <= 1.10x)"
    )


def bench_sae(device: torch.device, batch: int, repeats: int) -> None:
    d, n, k = 1280, 5120, 10
    x = torch.randn(batch, d, device=device)
    trainer = SAETrainer(d, TrainConfig(num_latents=n, k=k, batch_size=batch), device=device)
    dense = DenseTopKSAE(d, n, k).to(device)
    optimizer = torch.optim.Adam(dense.parameters(), lr=1e-4)

    def naive_step():
        loss = (dense(x) - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    a = torch.randn(batch, d, device=device)
    w = torch.randn(d, n, device=device)
    t = alternate(
        {"ours": lambda: trainer.step(x), "naive": naive_step, "matmul": lambda: a @ w},
        repeats,
        device,
    )
    # A TopK SAE step must at least compute every pre-activation: one [batch, d] x [d, n]
    # matrix product. Everything else (top-k, sparse decoder, sparse backward, Adam) is
    # extra, so the time of that one product bounds the step from below.
    gflops = 2 * batch * d * n / t["matmul"] / 1e9
    print(
        f"(c) SAE training, d={d} n={n} k={k}, batch {batch} on {device.type}: "
        f"{batch / t['ours']:,.0f} rows/s vs naive dense {batch / t['naive']:,.0f} rows/s "
        f"= {t['naive'] / t['ours']:.2f}x; {t['matmul'] / t['ours']:.0%} of the bound of one "
        f"encoder matmul per step ({batch / t['matmul']:,.0f} rows/s at {gflops:.0f} GFLOP/s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet", choices=["tiny", "sd14"], default="tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sae-batch", type=int, default=4096)
    p.add_argument("--sae-repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = build_tiny_pipeline() if args.unet == "tiny" else sd14_shaped_pipeline()
    pipe.to(device, dtype)
    print(
        f"device {device}, U-Net {args.unet} "
        f"({sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M parameters), {dtype}"
    )
    bench_generation(pipe, args.batch, args.steps, args.repeats)
    bench_steering(pipe, args.batch, args.steps, args.repeats)
    bench_emergence(pipe, args.batch, args.steps, args.repeats)
    bench_sae(device, args.sae_batch, args.sae_repeats)


if __name__ == "__main__":
    main()
