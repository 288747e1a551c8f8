"""Build the embedded toy preset from nothing: `python -m core.toy.build all --out runs/toy`.

Steps, each a subcommand that skips or resumes what an earlier run in `--out` finished:

    train       the toy model (VAE, text encoder, U-Net) on rendered scenes -> pipeline/
    saes        TopK SAEs at t in {1.0, 0.5, 0.0} for the 3 hook points    -> saes/
    dictionary  concept dictionaries with the shapes-world annotator       -> saes/
    check       captions followed? the paper's claims on this world?       -> check/
    ship        copy pipeline/ and saes/ to --to with a model card and checksums

`--scale full` is the recipe of the shipped weights, meant for one GPU; `--scale cpu` is
a 32x32 version for a 2-core CPU (about 40 minutes in all); `--scale smoke` runs every
step in 20 s (the tests use it).
"""

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from simple_parsing import field

from core.diffusion.checksums import CARD, SHIPPED, checksum_block, shipped_files
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import SD14_BLOCKS, get_preset
from core.emergence import build_dictionary
from core.emergence.concepts import CONCEPTS_FILE, ConceptDictionary, load_dictionaries
from core.emergence.words import load_word_vectors
from core.runtime import command, default_device
from core.sae.bank import SAEBank, SAEKey
from core.toy.check import CheckSettings, report, run_check
from core.toy.model import parameter_count
from core.toy.training import TRAIN_SCALES, ToyTrainConfig, ToyTrainer
from core.training.train import RunConfig, stop_on_signals, train

STEPS = ("train", "saes", "dictionary", "check", "ship")
MAX_SHIPPED_MB = 30.0
NOT_SHIPPED = ("spatial_means.safetensors", "examples.json")
"""Top-example indexes: too large for the size budget; the app builds them on demand."""


@dataclass(frozen=True)
class AnalysisSettings:
    """How the SAEs, dictionaries and the check are made from a trained toy model."""

    steps: int = 50
    guidance_scale: float = 4.0
    sae_prompts: int = 20_000
    gen_batch: int = 64
    sae_batch: int = 1024
    buffer_size: int = 65_536
    sae_lr: float = 4e-4
    dictionary_prompts: int = 2_000
    check: CheckSettings = CheckSettings()


ANALYSIS_SCALES: dict[str, AnalysisSettings] = {
    "full": AnalysisSettings(gen_batch=500),
    "cpu": AnalysisSettings(
        steps=25,
        sae_prompts=1_000,
        sae_batch=256,
        buffer_size=4_096,
        sae_lr=1e-3,
        dictionary_prompts=300,
        check=CheckSettings(prompts=60, edit_prompts=6, steps=25),
    ),
    "smoke": AnalysisSettings(
        steps=6,
        sae_prompts=16,
        gen_batch=8,
        sae_batch=64,
        buffer_size=256,
        sae_lr=1e-3,
        dictionary_prompts=8,
        check=CheckSettings(prompts=3, edit_prompts=1, steps=6),
    ),
}


class ToyRun:
    """The folder of one toy build, the settings of its scale, and what its steps made in
    this process (so that a later step need not read it back)."""

    def __init__(
        self,
        out: str | Path,
        scale: str,
        device: str | None,
        training: ToyTrainConfig | None = None,
    ):
        self.out, self.scale = Path(out), scale
        self.device = device or default_device()
        self.training: ToyTrainConfig = training or TRAIN_SCALES[scale]
        self.analysis = ANALYSIS_SCALES[scale]
        self.check_settings = replace(
            self.analysis.check,
            resolution=self.training.model.image_size,
            max_objects=self.training.max_objects,
            radius_range=self.training.radius_range,
        )
        self.dictionaries: dict[SAEKey, ConceptDictionary] | None = None
        """Set by the dictionary step."""
        self.check_report: str | None = None
        """Set by the check step."""

    @property
    def pipeline(self) -> Path:
        return self.out / "pipeline"

    @property
    def saes(self) -> Path:
        return self.out / "saes"

    def prompts(self, name: str) -> Path:
        """Captions for SAE training (`sae`) or dictionaries (`dictionary`), written once."""
        path = self.out / "prompts" / f"{name}.txt"
        if not path.is_file():
            a = self.analysis
            count = {"sae": a.sae_prompts, "dictionary": a.dictionary_prompts}[name]
            offset = {"sae": 1, "dictionary": 2}[name]
            scenes = self.training.draw_scenes(count, self.training.seed + offset)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(scene.caption for scene in scenes) + "\n")
        return path

    def generation(self) -> dict:
        """The pipeline and sampling settings shared by the SAE and dictionary configs."""
        a = self.analysis
        return dict(
            preset="toy",
            model=str(self.pipeline),
            device=self.device,
            steps=a.steps,
            guidance=a.guidance_scale,
        )


def train_model(run: ToyRun) -> bool:
    if (run.pipeline / "model_index.json").is_file():
        print(f"{run.pipeline} exists: model already trained")
        return True
    trainer = ToyTrainer(run.out, run.training, run.device)
    with stop_on_signals() as stop:
        pipe = trainer.run(stop=lambda: stop.raised)
    if pipe is None:
        print("interrupted: saved a checkpoint; run the same command again to resume")
        return False
    pipe.to(torch.float16).save_pretrained(run.pipeline)
    print(
        f"saved the toy pipeline ({parameter_count(pipe.unet) / 1e6:.1f}M-parameter U-Net) "
        f"to {run.pipeline}"
    )
    return True


def train_saes(run: ToyRun) -> bool:
    if _has_saes(run.saes):
        print(f"{run.saes} holds SAEs already")
        return True
    work = run.out / "sae_run"
    a = run.analysis
    resume = (work / "checkpoints" / "latest").is_file()
    config = RunConfig(
        **run.generation(),
        prompts=str(run.prompts("sae")),
        out=str(work),
        t=(1.0, 0.5, 0.0),
        blocks=SD14_BLOCKS,
        branches=("cond",),
        gen_batch=a.gen_batch,
        batch_size=a.sae_batch,
        buffer_size=a.buffer_size,
        lr=a.sae_lr,
        resolution=run.training.model.image_size,
        resume=resume,
        overwrite=not resume and work.exists(),
    )
    bank = train(config)
    if bank is None:
        return False
    bank.save_pretrained(run.saes)
    shutil.copy(work / "metrics.json", run.saes / "metrics.json")
    return True


def _has_saes(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("sae.safetensors"))


def build_dictionaries(run: ToyRun) -> bool:
    if any(run.saes.rglob(CONCEPTS_FILE)):
        print(f"{run.saes} holds dictionaries already")
        return True
    config = build_dictionary.DictionaryConfig(
        **run.generation(),
        saes=str(run.saes),
        prompts=str(run.prompts("dictionary")),
        out=str(run.saes),
        annotation=build_dictionary.AnnotatorConfig(annotator="toy"),
        gen_batch=run.analysis.gen_batch,
    )
    run.dictionaries = build_dictionary.build(config)
    return True


def check(run: ToyRun) -> bool:
    if not (run.pipeline / "model_index.json").is_file():
        raise ValueError(
            f"no trained toy model in {run.pipeline}; run `python -m core.toy.build train --out "
            f"{run.out}` (and saes, dictionary) first"
        )
    preset = get_preset("toy", model=str(run.pipeline), guidance_scale=run.analysis.guidance_scale)
    pipe = load_pipeline(preset, device=run.device)
    dictionaries = run.dictionaries or load_dictionaries(run.saes, branches=["cond"])
    bank = SAEBank.from_pretrained(run.saes, branches=["cond"], device=pipe.device)
    words = load_word_vectors(next(iter(dictionaries.values())).word_vectors)
    out = run.out / "check"
    out.mkdir(parents=True, exist_ok=True)
    results = run_check(
        pipe,
        bank,
        dictionaries,
        words,
        run.check_settings,
        SD14_BLOCKS,
        out,
    )
    run.check_report = report(results)
    (out / "report.md").write_text(run.check_report)
    print(run.check_report)
    return True


def ship(run: ToyRun, to: Path) -> bool:
    """Copy the shipped folders to `to` and write its model card with checksums."""
    to.mkdir(parents=True, exist_ok=True)
    for folder in SHIPPED:
        shutil.rmtree(to / folder, ignore_errors=True)
        shutil.copytree(run.out / folder, to / folder, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    size = sum((to / p).stat().st_size for p in shipped_files(to)) / 1e6
    if size > MAX_SHIPPED_MB:
        raise ValueError(
            f"the toy assets take {size:.1f} MB, over the {MAX_SHIPPED_MB:.0f} MB budget; "
            "use a smaller ToyModelConfig or fewer SAE latents"
        )
    (to / CARD).write_text(model_card(run, size) + checksum_block(to))
    print(f"shipped {size:.1f} MB to {to}")
    return True


def model_card(run: ToyRun, size_mb: float) -> str:
    log, timings = (
        json.loads(path.read_text()) if path.is_file() else {}
        for path in (run.out / "work" / "log.json", run.out / "timings.json")
    )
    check_path = run.out / "check" / "report.md"
    check_text = run.check_report or (
        check_path.read_text() if check_path.is_file() else "Not run.\n"
    )
    return "\n".join(
        [
            "---",
            "library_name: diffusers",
            "pipeline_tag: text-to-image",
            "tags: [stable-diffusion, sparse-autoencoder, interpretability, synthetic]",
            "---",
            "",
            "# Toy shapes-world model",
            "",
            "A small Stable-Diffusion-shaped text-to-image model trained from scratch on rendered "
            "scenes of `core.shapes.world` (1 to 3 coloured shapes on a styled background), with "
            "TopK SAEs on its `down_blocks.2.attentions.1`, `mid_block.attentions.0` and "
            "`up_blocks.1.attentions.0` residual updates (t = 1.0, 0.5, 0.0, cond branch) and "
            "their concept dictionaries, built with the shapes-world annotator.",
            "",
            "## How it was made",
            "",
            f"`python -m core.toy.build all --scale {run.scale} --out <folder> "
            f"--ship <assets folder>` on {timings.get('device', run.device)}; every step is "
            "seeded. The step counts below (`vae_steps`, `denoiser_steps` in the losses line) "
            "were fitted to the recipe's wall-clock budget; `--vae-steps N --denoiser-steps M` "
            "reproduces them on any machine.",
            "",
            f"- training (the model's sizes included): `{json.dumps(asdict(run.training))}`",
            f"- SAEs, dictionaries and check: `{json.dumps(asdict(run.analysis))}`",
            f"- final losses and step counts: `{json.dumps(log)}`",
            f"- wall time of each step in seconds: `{json.dumps(timings)}`",
            f"- shipped size: {size_mb:.1f} MB (pipeline in fp16)",
            "",
            "## Check (held-out captions)",
            "",
            check_text,
            "## Files and SHA-256 checksums",
            "",
            "Checked before loading; a mismatch names the file.",
            "",
        ]
    )


@dataclass(kw_only=True)
class BuildConfig:
    """Settings of `python -m core.toy.build`."""

    step: str = field(positional=True, choices=(*STEPS, "all"))
    """The step to run, or all of them in order."""
    out: str
    """Run folder (created; reruns resume)."""
    scale: str = field(default="full", choices=sorted(TRAIN_SCALES))
    """full: the shipped recipe (one GPU); cpu: 32x32 for a 2-core CPU; smoke: 20 s."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""
    to: str | None = field(default=None, alias="--ship")
    """Assets folder to ship to (ship, all)."""
    overwrite: bool = False
    """Delete --out first."""
    vae_steps: int | None = None
    """Train the VAE this many steps instead of fitting the scale's wall-clock budget."""
    denoiser_steps: int | None = None
    """Train the denoiser this many steps instead of fitting the scale's wall-clock budget
    (the model card records the count of the shipped run)."""

    def __post_init__(self) -> None:
        if self.step == "ship" and not self.to:
            raise ValueError("ship needs --to, e.g. --to assets/toy")


def build_toy(config: BuildConfig) -> bool:
    """Run the step (or all steps) `config` names; False if training was interrupted."""
    if config.overwrite:
        shutil.rmtree(config.out, ignore_errors=True)
    training = TRAIN_SCALES[config.scale]
    if config.vae_steps is not None:
        training = replace(training, vae_steps=config.vae_steps, vae_budget_s=None)
    if config.denoiser_steps is not None:
        training = replace(training, denoiser_steps=config.denoiser_steps, denoiser_budget_s=None)
    run = ToyRun(config.out, config.scale, config.device, training)
    steps = STEPS if config.step == "all" else (config.step,)
    work = {
        "train": train_model,
        "saes": train_saes,
        "dictionary": build_dictionaries,
        "check": check,
    }
    for step in steps:
        if step == "ship":
            if config.to:
                ship(run, Path(config.to))
            continue
        started = time.perf_counter()
        finished = work[step](run)
        record_timing(run, step, time.perf_counter() - started)
        if not finished:
            return False
    return True


def record_timing(run: ToyRun, step: str, seconds: float) -> None:
    """Add the wall time of `step` (and the device's name) to `<out>/timings.json`."""
    path = run.out / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    device = torch.device(run.device)
    if device.type == "cuda":
        timings["device"] = torch.cuda.get_device_name(device)
    timings.setdefault("device", str(device))
    timings[f"{step}_s"] = round(timings.get(f"{step}_s", 0.0) + seconds, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timings, indent=2))


main = command(
    BuildConfig,
    build_toy,
    "python -m core.toy.build",
    __doc__,
    exit_code=lambda finished: 0 if finished else 130,
)


if __name__ == "__main__":
    sys.exit(main())
