"""Benchmark the core engine; prints ratios measured side by side in one run.

    python -m scripts.bench_core                 # tiny preset on this machine
    python -m scripts.bench_core --unet sd14     # full-size SD v1.4 U-Net, random weights

(a) generation while recording the three paper blocks at every step / plain generation;
(b) activation collection throughput / plain generation throughput, same batch size;
(c) SAE training throughput (rows/s) for d=1280, n=5120, k=10: this project's TopK SAE
    (with its sparse encoder backward, and with autograd through the dense pre-activations
    instead) against a naive dense TopK SAE, and as a fraction of the bound set by the one
    dense matrix product a step cannot avoid, timed on the same machine in the same run;
(d) generation with a spatial intervention on the three paper blocks / plain generation,
    beside (d') a naive edit hook that replaces the whole residual update of the three
    blocks at every step with its SAE reconstruction;
(e) emergence analysis (record, SAE encode and concept map of the three paper blocks at
    every step) / plain generation.
Timings are medians over repetitions that alternate between the compared variants, so
both see the same machine load. Each `measure_*` function returns its timings, which
`scripts.bench_device` also tabulates.
"""

import argparse
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.diffusion.hooks import EditFn, edit, hooked, record
from core.diffusion.presets import SD14_BLOCKS
from core.diffusion.tiny import build_tiny_pipeline, sd14_shaped_pipeline
from core.emergence.composition import concept_map
from core.emergence.concepts import ConceptDictionary, LabelEvidence
from core.sae.bank import SAEBank, SAEKey
from core.sae.config import SAEConfig
from core.sae.model import EncoderOutput, TopKSAE
from core.steer.intervene import Intervention, intervene
from core.steer.regions import quadrant_mask
from core.training.activations import GenerationSource, to_rows
from core.training.trainer import SAETrainer, TrainConfig

PROMPT = "a photo of a red cat on a table"


@dataclass(frozen=True)
class Target:
    """What a ratio should reach: at most or at least `bound`, shown as `shown`."""

    bound: float
    at_most: bool
    shown: str

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.shown}"


TARGETS = {
    "record": Target(1.03, True, "1.03x"),
    "collect": Target(0.95, False, "0.95x"),
    "intervene": Target(1.05, True, "1.05x"),
    "emergence": Target(1.10, True, "1.10x"),
    "features": Target(0.95, False, "0.95x"),
    "sae_speedup": Target(4.0, False, "4x"),
    "sae_bound": Target(0.5, False, "50%"),
}
"""(a), (b), (d), (e), Revelio extraction (scripts.bench_features) and SAE training (c):
speed-up over the naive dense SAE and fraction of the bound."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(
    variants: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
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
    prompts = [PROMPT] * batch

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


@dataclass(frozen=True)
class GenerationTimes:
    """(a) and (b): median seconds of one generation of the batch."""

    plain: float
    record: float
    """Generation while recording the 3 paper blocks at every step."""
    collect: float
    """Activation collection (`GenerationSource.generate`) of the same batch."""

    @property
    def record_ratio(self) -> float:
        return self.record / self.plain

    @property
    def collect_ratio(self) -> float:
        """Collection throughput / plain generation throughput."""
        return self.plain / self.collect


def measure_generation(pipe, batch: int, steps: int, repeats: int) -> GenerationTimes:
    plain = plain_generation(pipe, batch, steps)

    def recorded():
        with record(pipe, SD14_BLOCKS, device=None):
            plain()

    keys = [SAEKey(b, t, "cond") for b in SD14_BLOCKS for t in (1.0, 0.5, 0.0)]
    source = GenerationSource(
        pipe, [PROMPT] * batch, keys, steps=steps, guidance_scale=7.5, batch_size=batch
    )
    variants = {
        "plain": plain,
        "record": recorded,
        "collect": lambda: source.generate(range(batch)),
    }
    return GenerationTimes(**alternate(variants, repeats, pipe.device))


class DenseTopKSAE(nn.Module):
    """The naive baseline: dense latents, dense decoder matmul, plain MSE loss, and with
    dead latents the AuxK loss computed the same dense way."""

    def __init__(self, d: int, n: int, k: int, dead: Tensor | None = None, k_aux: int = 256):
        super().__init__()
        self.k = k
        self.encoder = nn.Linear(d, n)
        self.decoder = nn.Linear(n, d)
        self.dead = dead if dead is not None and dead.any() else None
        self.k_aux = 0 if self.dead is None else min(k_aux, int(self.dead.sum()))

    def loss(self, x: Tensor, auxk_alpha: float = 1 / 32) -> Tensor:
        pre = torch.relu(self.encoder(x))
        x_hat = self.decoder(dense_topk(pre, self.k))
        loss = (x_hat - x).pow(2).mean()
        if self.dead is None:
            return loss
        aux = dense_topk(pre * self.dead, self.k_aux) @ self.decoder.weight.T
        return loss + auxk_alpha * (aux - (x - x_hat).detach()).pow(2).mean()


def dense_topk(pre: Tensor, k: int) -> Tensor:
    """[N, n]: `pre` with everything but each row's k largest entries set to 0."""
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


class DenseBackwardSAE(TopKSAE):
    """The project's SAE with autograd through the dense [N, n] pre-activations in place of
    the sparse encoder backward (core.sae.sparse_ops): the other way a device may favour."""

    def encode(self, x: Tensor) -> EncoderOutput:
        self.check_input(x)
        pre_acts = torch.relu(self.encoder(x.to(self.b_dec.dtype) - self.b_dec))
        top_acts, top_indices = pre_acts.topk(self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(top_acts, top_indices, pre_acts)

    def _with_encoder_grad(self, x: Tensor, indices: Tensor, acts: Tensor) -> Tensor:
        return acts  # the gradient already flows through the dense pre-activations


@dataclass(frozen=True)
class SAETimes:
    """(c): median seconds of one training step on `batch` rows."""

    d: int
    n: int
    k: int
    batch: int
    dead_fraction: float
    """Latents kept dead at every step, so that the AuxK loss runs (0: no AuxK)."""
    sparse_backward: float
    """This project's `SAETrainer.step`, as it trains."""
    dense_backward: float
    """The same step with `DenseBackwardSAE`."""
    naive: float
    """`DenseTopKSAE` with Adam."""
    matmul: float
    """The bound: one [batch, d] x [d, n] product, all of the encoder's pre-activations."""

    def rows_per_s(self, seconds: float) -> float:
        return self.batch / seconds

    def speedup(self, seconds: float) -> float:
        """Speed-up of a step taking `seconds` over the naive dense SAE."""
        return self.naive / seconds

    def bound_fraction(self, seconds: float) -> float:
        return self.matmul / seconds

    @property
    def gflops(self) -> float:
        """Throughput of the bound's matrix product."""
        return 2 * self.batch * self.d * self.n / self.matmul / 1e9

    @property
    def faster_backward(self) -> str:
        return "sparse" if self.sparse_backward <= self.dense_backward else "dense"


def step_with_dead(trainer: SAETrainer, x: Tensor, dead: Tensor) -> dict[str, float]:
    """`trainer.step(x)` with the `dead` latents marked dead first, so that the AuxK loss runs
    at every step whichever latents fired in the steps before."""
    trainer.samples_since_fired.masked_fill_(dead, trainer.cfg.dead_after)
    return trainer.step(x)


def measure_sae(
    device: torch.device,
    batch: int,
    repeats: int,
    *,
    d: int = 1280,
    n: int = 5120,
    k: int = 10,
    dead_fraction: float = 0.0,
) -> SAETimes:
    """Training steps in fp32 (the trainer has no mixed-precision option) on random rows."""
    x = torch.randn(batch, d, device=device)
    dead = torch.arange(n, device=device) < round(dead_fraction * n)
    config = TrainConfig(num_latents=n, k=k, batch_size=batch)
    trainers = {name: SAETrainer(d, config, device=device) for name in ("sparse", "dense")}
    trainers["dense"].sae.__class__ = DenseBackwardSAE  # same weights and state, other backward
    naive = DenseTopKSAE(d, n, k, dead, config.k_aux).to(device)
    optimizer = torch.optim.Adam(naive.parameters(), lr=config.lr)

    def naive_step():
        loss = naive.loss(x, config.auxk_alpha)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    a = torch.randn(batch, d, device=device)
    w = torch.randn(d, n, device=device)
    variants = {
        "sparse_backward": lambda: step_with_dead(trainers["sparse"], x, dead),
        "dense_backward": lambda: step_with_dead(trainers["dense"], x, dead),
        "naive": naive_step,
        "matmul": lambda: a @ w,
    }
    return SAETimes(d, n, k, batch, dead_fraction, **alternate(variants, repeats, device))


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


def naive_edits(bank: SAEBank, blocks: Iterable[str]) -> dict[str, EditFn]:
    """Edit hooks that do what a naive SAE edit does at every step: encode the whole residual
    update of the cond branch to a dense [positions, n] code, decode it with a dense matrix
    product and put the reconstruction in the update's place (no latent is changed, so only
    the cost of the round trip is measured; the intervention in core.steer.intervene instead
    adds |C| concept vectors to the update)."""

    def replace(block: str) -> EditFn:
        def apply(delta: Tensor, t: float, branch: str) -> Tensor | None:
            if branch != "cond":
                return None
            sae = bank.get(block, t, branch)
            with torch.no_grad():
                rows = sae.encode_dense(to_rows(delta)) @ sae.W_dec + sae.b_dec
            batch, channels, height, width = delta.shape
            return rows.view(batch, height, width, channels).permute(0, 3, 1, 2)

        return apply

    return {block: replace(block) for block in blocks}


@dataclass(frozen=True)
class SteeringTimes:
    """(d): median seconds of one generation of the batch, at image size."""

    plain: float
    early: float
    """Spatial intervention in the early stage (t in [0.6, 1])."""
    every_step: float
    """The same at every step."""
    naive: float
    """`naive_edits` on the 3 paper blocks at every step."""

    def ratio(self, seconds: float) -> float:
        return seconds / self.plain


def measure_steering(pipe, batch: int, steps: int, repeats: int) -> SteeringTimes:
    """(d) a spatial intervention on the three paper blocks and (d') the naive hook / plain."""
    bank = paper_bank(pipe)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    region = quadrant_mask("top_left", (side, side))
    plain = plain_generation(pipe, batch, steps, height=side, width=side)

    def steered(window: tuple[float, float]) -> Callable[[], None]:
        spec = Intervention("spatial", [1, 2, 3], 400.0, window, region=region)

        def run():
            with intervene(pipe, bank, SD14_BLOCKS, spec, (side, side)):
                plain()

        return run

    def naive():
        with edit(pipe, naive_edits(bank, SD14_BLOCKS)):
            plain()

    variants = {
        "plain": plain,
        "early": steered((0.6, 1.0)),
        "every_step": steered((0.0, 1.0)),
        "naive": naive,
    }
    return SteeringTimes(**alternate(variants, repeats, pipe.device))


def labelled_dictionary(key: SAEKey, num_latents: int, dim: int = 50) -> ConceptDictionary:
    """A dictionary labelling every other CID among the first 64 with one of 8 names, whose
    embeddings are random `dim`-wide vectors: concept maps cost what they cost with GloVe 6B
    50d, without loading any word vectors."""
    names = ["cat", "dog", "car", "tree", "house", "sky", "table", "person"]
    cids = range(0, min(64, num_latents), 2)
    evidence = {c: {names[c % len(names)]: LabelEvidence(1, None)} for c in cids}
    has_embedding = torch.zeros(num_latents, dtype=torch.bool)
    has_embedding[list(cids)] = True
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(num_latents, dim, generator=generator) * has_embedding[:, None]
    return ConceptDictionary(key, num_latents, evidence, embeddings, has_embedding, "random")


@dataclass(frozen=True)
class EmergenceTimes:
    """(e): median seconds of one generation of the batch."""

    plain: float
    analysed: float
    """Record + SAE encode + concept map of the 3 paper blocks at every step."""

    @property
    def ratio(self) -> float:
        return self.analysed / self.plain


def measure_emergence(pipe, batch: int, steps: int, repeats: int) -> EmergenceTimes:
    bank = paper_bank(pipe)
    dictionaries = {
        key: labelled_dictionary(key, sae.cfg.num_latents).to(pipe.device)
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

    return EmergenceTimes(**alternate({"plain": plain, "analysed": analysed}, repeats, pipe.device))


def print_generation(t: GenerationTimes, batch: int, steps: int) -> None:
    print(f"generation, batch {batch}, {steps} steps, CFG: plain {t.plain:.3f} s")
    print(
        f"(a) recording 3 blocks at every step: {t.record:.3f} s, "
        f"ratio {t.record_ratio:.3f}x (target {TARGETS['record']})"
    )
    print(
        f"(b) collection throughput / plain generation throughput: "
        f"{t.collect_ratio:.3f}x (target {TARGETS['collect']}; {batch / t.collect:.2f} "
        f"vs {batch / t.plain:.2f} images/s)"
    )


def print_steering(t: SteeringTimes) -> None:
    print(
        f"(d) spatial intervention on the 3 paper blocks: "
        f"early stage {t.ratio(t.early):.3f}x, "
        f"every step {t.ratio(t.every_step):.3f}x plain generation (target {TARGETS['intervene']})"
    )
    print(
        f"(d') naive edit hook (dense SAE encode + decode replacing the whole update, 3 blocks, "
        f"every step): {t.ratio(t.naive):.3f}x plain generation"
    )


def print_emergence(t: EmergenceTimes) -> None:
    print(
        f"(e) emergence analysis (record + encode + concept maps, 3 blocks, every step): "
        f"{t.ratio:.3f}x plain generation (target {TARGETS['emergence']})"
    )


def print_sae(t: SAETimes, device: torch.device) -> None:
    print(
        f"(c) SAE training, d={t.d} n={t.n} k={t.k}, batch {t.batch} on {device.type}: "
        f"{t.rows_per_s(t.sparse_backward):,.0f} rows/s vs naive dense "
        f"{t.rows_per_s(t.naive):,.0f} rows/s = {t.speedup(t.sparse_backward):.2f}x; "
        f"{t.bound_fraction(t.sparse_backward):.0%} of the bound of one encoder matmul per step "
        f"({t.rows_per_s(t.matmul):,.0f} rows/s at {t.gflops:.0f} GFLOP/s)"
    )
    print(
        f"    with autograd through the dense pre-activations instead of the sparse backward: "
        f"{t.rows_per_s(t.dense_backward):,.0f} rows/s = {t.speedup(t.dense_backward):.2f}x, "
        f"{t.bound_fraction(t.dense_backward):.0%} of the bound"
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
    generation = (pipe, args.batch, args.steps, args.repeats)
    print_generation(measure_generation(*generation), args.batch, args.steps)
    print_steering(measure_steering(*generation))
    print_emergence(measure_emergence(*generation))
    print_sae(measure_sae(device, args.sae_batch, args.sae_repeats), device)


if __name__ == "__main__":
    main()
