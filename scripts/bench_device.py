"""Benchmark the core engine on one device: writes OUT/bench.md and OUT/bench.json.

    python -m scripts.bench_device --scale tiny --out runs/bench-tiny   # a CPU, 10-25 s
    bash scripts/device_bench.sh OUT                                   # one GPU, --scale gpu

Measures, each as a ratio of variants timed side by side (scripts.bench_core):
(a) generation while recording the 3 paper blocks at every step / plain generation;
(b) activation collection throughput / plain generation throughput;
(c) SAE training rows/s at each of two widths, k = 10, with AuxK on (30% of latents kept
    dead): `SAETrainer` with its sparse encoder backward and with autograd through the dense
    pre-activations, against a naive dense TopK SAE and the bound of one encoder matmul;
(d) a spatial intervention on the 3 paper blocks, early stage and every step / plain, beside
    (d') a naive edit hook that replaces each update with its dense SAE reconstruction;
(e) emergence analysis / plain;
Revelio feature extraction / a plain U-Net forward (scripts.bench_features).
Each ratio is shown with its target and whether it is met. The files are rewritten after
every measurement, so a run stopped part-way keeps what it measured; a measurement that
fails is reported and the others still run, and the command then exits with status 1.

`--scale gpu`: SD v1.4's full-size U-Net with random weights, float16 on CUDA, 512 px, 50
DDIM steps, CFG 7.5, batch 1; 10 repetitions; SAE d = 1280, n = 5,120 and 20,480, batch
4,096. Estimate on one H100, where a plain generation takes about 1.5 s: each repetition
runs 9 generations (3 for (a)/(b), 4 for (d), 2 for (e)), about 14 s with the hooks'
extra cost, so 10 repetitions and one warm-up each take about 155 s; imports, building
the pipeline on the CPU and starting CUDA about 30 s; SAE training (4 variants x 21 steps
x 2 widths, at most 25 ms a step) and Revelio (batch 8, 4 variants) under 15 s: about
200 s in all, 240 s if a generation takes 1.8 s.
`--scale tiny`: the tiny U-Net, 3 steps, one repetition, SAE d = 64, n = 256 and 1,024,
batch 256: a check that everything runs, not a measurement.
"""

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Literal

import torch
from simple_parsing import field as option

from core.diffusion.tiny import build_tiny_pipeline, sd14_shaped_pipeline
from core.files import atomic_write, write_json
from core.runtime import command, counted, default_device, device_name
from scripts.bench_core import (
    TARGETS,
    EmergenceTimes,
    GenerationTimes,
    SAETimes,
    SteeringTimes,
    Target,
    measure_emergence,
    measure_generation,
    measure_sae,
    measure_steering,
)
from scripts.bench_features import measure as measure_features

PROG = "python -m scripts.bench_device"


@dataclass(frozen=True)
class Scale:
    """The sizes and repetitions of one `--scale`."""

    unet: Literal["sd14", "tiny"]
    steps: int
    batch: int
    repeats: int
    sae_d: int
    sae_latents: tuple[int, ...]
    sae_batch: int
    sae_repeats: int
    feature_batch: int
    feature_repeats: int
    sae_k: int = 10
    dead_fraction: float = 0.3


SCALES = {
    "gpu": Scale("sd14", 50, 1, 10, 1280, (5120, 20480), 4096, 20, 8, 10),
    "tiny": Scale("tiny", 3, 1, 1, 64, (256, 1024), 256, 1, 2, 1),
}


@dataclass
class DeviceBenchConfig:
    """Settings of `python -m scripts.bench_device`."""

    out: str = "runs/bench"
    """Folder for bench.md and bench.json."""
    scale: Literal["gpu", "tiny"] = "gpu"
    """gpu: SD v1.4-size U-Net, 50 steps, 10 repetitions; tiny: a quick run of everything."""
    dtype: Literal["float16", "float32"] | None = None
    """Generation's dtype (default: float16 on CUDA, float32 elsewhere); SAEs train in fp32."""
    device: str = option(default_factory=default_device)
    """Torch device."""

    def torch_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        return torch.float16 if torch.device(self.device).type == "cuda" else torch.float32

    def command_line(self) -> str:
        dtype = f" --dtype {self.dtype}" if self.dtype else ""
        return f"{PROG} --scale {self.scale} --out {self.out} --device {self.device}{dtype}"


@dataclass(frozen=True)
class Check:
    """One ratio of the report, with its target (None: shown for comparison only)."""

    measurement: str
    value: float
    target: Target | None
    percent: bool = False

    @property
    def shown(self) -> str:
        return f"{self.value:.0%}" if self.percent else f"{self.value:.3f}x"

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "reference"
        return "met" if self.target.met(self.value) else "missed"


def checks(results: dict[str, object]) -> list[Check]:
    """The ratios of every measurement in `results`, in the report's order."""
    rows: list[tuple[str, float, str | None]] = []  # (measurement, ratio, key of TARGETS)
    if isinstance(g := results.get("generation"), GenerationTimes):
        rows += [
            ("(a) recording the 3 paper blocks at every step / plain", g.record_ratio, "record"),
            ("(b) collection throughput / plain generation throughput", g.collect_ratio, "collect"),
        ]
    if isinstance(s := results.get("steering"), SteeringTimes):
        rows += [
            ("(d) spatial intervention, early stage / plain", s.ratio(s.early), "intervene"),
            ("(d) spatial intervention, every step / plain", s.ratio(s.every_step), "intervene"),
            (
                "(d') naive edit hook, dense encode + decode, every step / plain",
                s.ratio(s.naive),
                None,
            ),
        ]
    if isinstance(e := results.get("emergence"), EmergenceTimes):
        rows.append(("(e) emergence analysis / plain", e.ratio, "emergence"))
    if isinstance(f := results.get("features"), dict):
        ratio = f["plain"] / f["extraction"]
        rows.append(("Revelio extraction / plain forward, throughput", ratio, "features"))
    for sae in (r for r in results.values() if isinstance(r, SAETimes)):
        for backward in ("sparse", "dense"):
            seconds = getattr(sae, f"{backward}_backward")
            name = f"(c) SAETrainer, {backward} backward, n = {sae.n}"
            rows += [
                (f"{name}: speed-up over naive", sae.speedup(seconds), "sae_speedup"),
                (f"{name}: fraction of the bound", sae.bound_fraction(seconds), "sae_bound"),
            ]
    return [
        Check(name, value, TARGETS[key] if key else None, percent=key == "sae_bound")
        for name, value, key in rows
    ]


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def sae_rows(t: SAETimes) -> list[list[object]]:
    bound = f"one [{t.batch} x {t.d}] x [{t.d} x {t.n}] product ({t.gflops:,.0f} GFLOP/s)"
    variants = [
        ("SAETrainer, sparse backward (as it trains)", t.sparse_backward),
        ("SAETrainer, dense backward", t.dense_backward),
        ("naive dense TopK SAE", t.naive),
        (f"bound: {bound}", t.matmul),
    ]
    return [
        [
            t.d,
            t.n,
            name,
            f"{t.rows_per_s(s):,.0f}",
            f"{t.speedup(s):.2f}x",
            f"{t.bound_fraction(s):.0%}",
        ]
        for name, s in variants
    ]


def backward_choice(t: SAETimes) -> str:
    """Which encoder backward trains faster here, and by how much."""
    slow, fast = sorted((t.sparse_backward, t.dense_backward), reverse=True)
    return f"- n = {t.n}: the {t.faster_backward} backward is faster here ({slow / fast:.2f}x)."


@dataclass
class Report:
    """What a run has measured so far, written to OUT after each measurement."""

    out: Path
    environment: dict[str, str]
    results: dict[str, object] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)

    def attempt(self, name: str, run: Callable[[], object]) -> object | None:
        """run(), or None with the error kept: one failure must not cost a device run the
        other measurements, so every exception is caught here and reported."""
        try:
            value = run()
        except Exception:  # reported in the files and by the exit status
            self.errors[name] = traceback.format_exc()
            print(self.errors[name], file=sys.stderr)
            value = None
        state = "failed" if name in self.errors else "done"
        print(f"[{time.perf_counter() - self.start:6.1f} s] {name} {state}", flush=True)
        return value

    def measure(self, name: str, run: Callable[[], object]) -> None:
        value = self.attempt(name, run)
        if value is not None:
            self.results[name] = value
        self.save()

    def save(self) -> None:
        self.environment["elapsed"] = f"{time.perf_counter() - self.start:.1f} s"
        self.out.mkdir(parents=True, exist_ok=True)
        markdown = self.markdown()
        atomic_write(self.out / "bench.md", lambda tmp: tmp.write_text(markdown))
        write_json(self.out / "bench.json", self.raw())

    def raw(self) -> dict:
        results = {
            name: asdict(value) if is_dataclass(value) else value
            for name, value in self.results.items()
        }
        found = [
            {
                **asdict(c),
                "target": None if c.target is None else str(c.target),
                "verdict": c.verdict,
            }
            for c in checks(self.results)
        ]
        return {
            "environment": self.environment,
            "results": results,
            "checks": found,
            "errors": self.errors,
        }

    def markdown(self) -> str:
        lines = ["# Core engine benchmark", ""]
        lines += table(["", ""], [[k, v] for k, v in self.environment.items()])
        rows = [[c.measurement, c.shown, c.target or "", c.verdict] for c in checks(self.results)]
        lines += ["", "## Ratios and targets", ""]
        lines += table(["measurement", "value", "target", "verdict"], rows)
        saes = [r for r in self.results.values() if isinstance(r, SAETimes)]
        if saes:
            lines += [
                "",
                f"## SAE training, fp32, k = {saes[0].k}, batch {saes[0].batch}, "
                f"{saes[0].dead_fraction:.0%} of latents dead (AuxK on)",
                "",
            ]
            header = ["d", "n", "variant", "rows/s", "vs naive", "of the bound"]
            lines += table(header, [row for sae in saes for row in sae_rows(sae)])
            lines += [""] + [backward_choice(sae) for sae in saes]
        seconds = [
            [name, variant, f"{value:.4f}"]
            for name, result in self.results.items()
            if not isinstance(result, SAETimes)
            for variant, value in (asdict(result) if is_dataclass(result) else result).items()
        ]
        if seconds:
            lines += ["", "## Median seconds per batch", ""]
            lines += table(["measurement", "variant", "seconds"], seconds)
        if self.errors:
            lines += ["", "## Failed", ""]
            for name, text in self.errors.items():
                lines.append(f"- {name}: {text.strip().splitlines()[-1]}")
        return "\n".join(lines) + "\n"


def build_pipeline(scale: Scale, device: torch.device, dtype: torch.dtype):
    pipe = build_tiny_pipeline() if scale.unet == "tiny" else sd14_shaped_pipeline()
    return pipe.to(device, dtype)


def bench(config: DeviceBenchConfig) -> Report:
    """Every measurement at `config.scale`; the report is also printed."""
    scale, device, dtype = SCALES[config.scale], torch.device(config.device), config.torch_dtype()
    environment = {
        "device": device_name(device),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda or "none (CPU build)",
        "command": f"`{config.command_line()}`",
        "settings": f"{config.scale}: " + ", ".join(f"{k}={v}" for k, v in asdict(scale).items()),
    }
    report = Report(Path(config.out), environment)
    for n in scale.sae_latents:
        report.measure(
            f"sae_n{n}",
            lambda n=n: measure_sae(
                device,
                scale.sae_batch,
                scale.sae_repeats,
                d=scale.sae_d,
                n=n,
                k=scale.sae_k,
                dead_fraction=scale.dead_fraction,
            ),
        )
    pipe = report.attempt("pipeline", lambda: build_pipeline(scale, device, dtype))
    if pipe is not None:
        parameters = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        environment["generation"] = (
            f"{scale.unet} U-Net ({parameters:.1f}M parameters, random weights), "
            f"{str(dtype).removeprefix('torch.')}, {side} px, {scale.steps} DDIM steps, "
            f"CFG 7.5, batch {scale.batch}; median of {counted(scale.repeats, 'repetition')} "
            "alternating between the compared variants, after one warm-up each"
        )
        generation = (pipe, scale.batch, scale.steps, scale.repeats)
        report.measure("generation", lambda: measure_generation(*generation))
        report.measure("steering", lambda: measure_steering(*generation))
        report.measure("emergence", lambda: measure_emergence(*generation))
        report.measure(
            "features", lambda: measure_features(pipe, scale.feature_batch, scale.feature_repeats)
        )
    report.save()
    print(report.markdown())
    return report


main = command(
    DeviceBenchConfig, bench, PROG, __doc__, exit_code=lambda report: 1 if report.errors else 0
)

if __name__ == "__main__":
    sys.exit(main())
