"""Build the embedded toy preset from nothing: `python -m core.toy.build all --out runs/toy`.

Steps, each a subcommand that skips or resumes what an earlier run in `--out` finished:

    train       the toy model (VAE, text encoder, U-Net) on rendered scenes   -> pipeline/
    saes        TopK SAEs at t in {1.0, 0.5, 0.0} for the 3 hook points      -> saes/
    dictionary  concept dictionaries with the shapes-world annotator         -> saes/
    strengths   steering strengths calibrated on the model's own activations -> saes/
    check       captions followed? the paper's claims on this world?         -> check/
    ship        pipeline/, saes/ and the check's report to --to, with a recorded part
                of the check, a model card and checksums

`--scale cpu` is the recipe of the shipped weights: a 32x32 world, 86 minutes in all on a
2-core CPU; `--scale full` a larger 64x64 one for a GPU; `--scale smoke`
runs every step in 20 s (the tests use it).

`--denoiser pixart` builds the DiT twin instead: a PixArt-layout transformer trained on the
same world, reusing the VAE, tokenizer and text encoder of a trained toy (`--reuse`, the
shipped one by default), with SAEs on its `TWIN_BLOCKS` and its middle block steered.
"""

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from simple_parsing import field

from core.annotate.labellers import TOY_WORLD
from core.diffusion.checksums import CARD, SHIPPED, checksum_block, shipped_files
from core.diffusion.layouts import denoiser_of
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import SD14_BLOCKS, TOY_ASSETS, TOY_PROMPTS, get_preset
from core.emergence import build_dictionary
from core.emergence.concepts import CONCEPTS_FILE, load_dictionaries
from core.emergence.strengths import CalibrationEdits, calibrate
from core.emergence.words import load_word_vectors
from core.runtime import command, default_device, device_name
from core.sae.bank import SAEBank
from core.steer.strength import STRENGTHS_FILE, load_strengths
from core.toy.check import CheckSettings, heldout_scenes, labelled, report, run_check
from core.toy.model import TWIN_BLOCKS, parameter_count
from core.toy.reproduce import SUBSET_FILE, record, subset_rows
from core.toy.training import TRAIN_SCALES, ToyTrainConfig, ToyTrainer
from core.training.activations import read_prompts
from core.training.train import RunConfig, stop_on_signals, train

STEPS = ("train", "saes", "dictionary", "strengths", "check", "ship")
MAX_SHIPPED_MB = 30.0
PROMPTS = 64
"""Held-out captions shipped as the preset's prompt file (`TOY_PROMPTS`)."""
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
    calibration_prompts: int = 2
    """Captions each global edit is calibrated on (spatial edits use the world's template)."""
    check: CheckSettings = CheckSettings()


ANALYSIS_SCALES: dict[str, AnalysisSettings] = {
    "full": AnalysisSettings(gen_batch=500),
    "cpu": AnalysisSettings(
        steps=25,
        guidance_scale=7.5,
        sae_prompts=4_000,
        sae_batch=64,
        buffer_size=4_096,
        sae_lr=1e-3,
        dictionary_prompts=500,
        check=CheckSettings(prompts=120, edit_prompts=8),
    ),
    "smoke": AnalysisSettings(
        steps=6,
        sae_prompts=16,
        gen_batch=8,
        sae_batch=64,
        buffer_size=256,
        sae_lr=1e-3,
        dictionary_prompts=8,
        check=CheckSettings(prompts=3, edit_prompts=1),
    ),
}


class ToyRun:
    """The folder of one toy build, the settings of its scale, and the check's report once
    the check step made it."""

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
            steps=self.analysis.steps,
            guidance_scale=self.analysis.guidance_scale,
            resolution=self.training.model.image_size,
            max_objects=self.training.max_objects,
            radius_range=self.training.radius_range,
        )
        self.check_report: str | None = None
        """Set by the check step."""

    @property
    def pipeline(self) -> Path:
        return self.out / "pipeline"

    @property
    def blocks(self) -> tuple[str, ...]:
        """The hook points: SD v1.4's for the U-Net, the twin's early, middle and late."""
        return TWIN_BLOCKS if self.training.denoiser == "pixart" else SD14_BLOCKS

    @property
    def steer_block(self) -> str:
        """The block the check edits: the U-Net's mid block, the twin's middle one."""
        return self.blocks[1]

    @property
    def saes(self) -> Path:
        return self.out / "saes"

    def prompts(self, name: str) -> Path:
        """Captions for SAE training (`sae`) or dictionaries (`dictionary`), written once."""
        path = self.out / "prompts" / f"{name}.txt"
        if not path.is_file():
            a = self.analysis
            count = {
                "sae": a.sae_prompts,
                "dictionary": a.dictionary_prompts,
                "calibration": a.calibration_prompts,
            }[name]
            offset = {"sae": 1, "dictionary": 2, "calibration": 3}[name]
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
    denoiser = denoiser_of(pipe)
    print(
        f"saved the toy pipeline ({parameter_count(denoiser) / 1e6:.1f}M-parameter "
        f"{type(denoiser).__name__}) to {run.pipeline}"
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
        blocks=run.blocks,
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
    build_dictionary.build(config)
    return True


def calibrate_strengths(run: ToyRun) -> bool:
    """Each edit kind's and stage's strength from the model's own activations (see
    `core.emergence.strengths`), on captions the check does not use."""
    if (run.saes / STRENGTHS_FILE).is_file():
        print(f"{run.saes} holds strengths already")
        return True
    pipe, bank, dictionaries = trained(run)
    world, block = TOY_WORLD, run.steer_block
    edits = CalibrationEdits(
        objects=labelled(dictionaries, world.objects, block),
        template=world.template,
        concepts=labelled(dictionaries, world.concepts, block),
        prompts=read_prompts(run.prompts("calibration")),
    )
    a = run.analysis
    calibration = calibrate(
        pipe,
        bank,
        dictionaries,
        edits,
        block=block,
        seed=run.check_settings.seed - 1000,
        steps=a.steps,
        guidance_scale=a.guidance_scale,
        resolution=run.training.model.image_size,
    )
    print(f"wrote {calibration.save(run.saes)}: {json.dumps(calibration.strengths)}")
    print("\n".join(calibration.notes))
    return True


def trained(run: ToyRun, root: Path | None = None) -> tuple:
    """(pipeline, SAE bank, dictionaries) in `root` (default: the run's folder), or one
    sentence on what to run first."""
    root = root or run.out
    pipeline, saes = root / "pipeline", root / "saes"
    if not (pipeline / "model_index.json").is_file() or not _has_saes(saes):
        raise ValueError(
            f"no trained toy model with SAEs in {root}; run `python -m core.toy.build train "
            f"--out {run.out}` (then saes and dictionary) first"
        )
    preset = get_preset(
        "toy",
        model=str(pipeline),
        guidance_scale=run.analysis.guidance_scale,
        assets=None,
        hook_points=run.blocks,
    )
    pipe = load_pipeline(preset, device=run.device)
    dictionaries = load_dictionaries(saes, branches=["cond"])
    bank = SAEBank.from_pretrained(saes, branches=["cond"], device=pipe.device)
    return pipe, bank, dictionaries


def check(run: ToyRun) -> bool:
    pipe, bank, dictionaries = trained(run)
    words = load_word_vectors(next(iter(dictionaries.values())).word_vectors)
    out = run.out / "check"
    out.mkdir(parents=True, exist_ok=True)
    results = run_check(
        pipe,
        bank,
        dictionaries,
        words,
        run.check_settings,
        run.blocks,
        out,
        load_strengths(run.saes),
        run.steer_block,
    )
    run.check_report = report(results)
    (out / "report.md").write_text(run.check_report)
    print(run.check_report)
    return True


def ship(run: ToyRun, to: Path) -> bool:
    """Copy the pipeline and SAEs to `to`, record the check's fixed subset on the shipped
    weights (`core.toy.reproduce`) beside the check's report, and write the model card with
    checksums."""
    to.mkdir(parents=True, exist_ok=True)
    for folder in SHIPPED:
        shutil.rmtree(to / folder, ignore_errors=True)
    for folder in ("pipeline", "saes"):
        shutil.copytree(run.out / folder, to / folder, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    (to / "check").mkdir()
    if (run.out / "check" / "report.md").is_file():
        shutil.copy(run.out / "check" / "report.md", to / "check")
    write_prompts(to / TOY_PROMPTS, run.check_settings)
    pipe, bank, dictionaries = trained(run, to)
    strengths = load_strengths(to / "saes")
    rows = subset_rows(pipe, bank, dictionaries, strengths, run.check_settings, run.steer_block)
    record(to / "check" / SUBSET_FILE, rows, run.check_settings)
    size = sum((to / p).stat().st_size for p in shipped_files(to)) / 1e6
    if size > MAX_SHIPPED_MB:
        raise ValueError(
            f"the toy assets take {size:.1f} MB, over the {MAX_SHIPPED_MB:.0f} MB budget; "
            "use a smaller ToyModelConfig or fewer SAE latents"
        )
    (to / CARD).write_text(model_card(run, size) + checksum_block(to))
    print(f"shipped {size:.1f} MB to {to}")
    return True


def write_prompts(path: Path, settings: CheckSettings) -> None:
    """`PROMPTS` distinct held-out captions of the checked world, other than the check's."""
    scenes = heldout_scenes(4 * PROMPTS, replace(settings, seed=settings.seed + 3000))
    captions = list(dict.fromkeys(scene.caption for scene in scenes))[:PROMPTS]
    path.write_text("".join(f"{caption}\n" for caption in captions))


TITLES = {"unet": "Toy shapes-world model", "pixart": "Toy shapes-world model: its DiT twin"}
KINDS = {
    "unet": "A small Stable-Diffusion-shaped text-to-image model (trained from scratch)",
    "pixart": "A PixArt-layout diffusion transformer (trained from scratch beside the toy "
    "model's VAE, tokenizer and text encoder, which it reuses)",
}


def model_card(run: ToyRun, size_mb: float) -> str:
    log, timings = (
        json.loads(path.read_text()) if path.is_file() else {}
        for path in (run.out / "work" / "log.json", run.out / "timings.json")
    )
    sae_settings = {k: v for k, v in asdict(run.analysis).items() if k != "check"}
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
            f"# {TITLES[run.training.denoiser]}",
            "",
            f"{KINDS[run.training.denoiser]} trained on rendered scenes of "
            f"`core.shapes.world` (1 to {run.training.max_objects} coloured shapes on a styled "
            f"background), with TopK SAEs on its {', '.join(f'`{b}`' for b in run.blocks)} "
            "residual updates (t = 1.0, 0.5, 0.0, cond branch) and their concept dictionaries, "
            "built with the shapes-world annotator.",
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
            f"- SAEs and dictionaries: `{json.dumps(sae_settings)}`",
            f"- check: `{json.dumps(asdict(run.check_settings))}`",
            f"- final losses and step counts: `{json.dumps(log)}`",
            f"- wall time of each step in seconds: `{json.dumps(timings)}`",
            f"- shipped size: {size_mb:.1f} MB (pipeline in fp16)",
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
    scale: str = field(default="cpu", choices=sorted(TRAIN_SCALES))
    """cpu: the shipped recipe (32x32, a 2-core CPU); full: 64x64 for a GPU; smoke: 20 s."""
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
    denoiser: str = field(default="unet", choices=("unet", "pixart"))
    """unet: the toy model; pixart: its DiT twin (given twice the U-Net's budget)."""
    reuse: str = str(TOY_ASSETS / "pipeline")
    """The DiT twin's VAE, tokenizer and text encoder: a trained toy pipeline folder."""
    twin_budget: float = 2.0
    """The DiT twin's denoiser budget, in multiples of the U-Net recipe's."""

    def __post_init__(self) -> None:
        if self.step == "ship" and not self.to:
            raise ValueError("ship needs --to, e.g. --to assets/toy")


def build_toy(config: BuildConfig) -> bool:
    """Run the step (or all steps) `config` names; False if training was interrupted."""
    if config.overwrite:
        shutil.rmtree(config.out, ignore_errors=True)
    training = TRAIN_SCALES[config.scale]
    if config.denoiser == "pixart":
        training = twin_training(training, config.reuse, config.twin_budget)
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
        "strengths": calibrate_strengths,
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


def twin_training(unet: ToyTrainConfig, reuse: str, budget_scale: float) -> ToyTrainConfig:
    """The twin's training: the U-Net recipe's world, batches and learning rate, for
    `budget_scale` times its denoiser budget, reusing the toy pipeline at `reuse`."""
    budget = unet.denoiser_budget_s and budget_scale * unet.denoiser_budget_s
    return replace(unet, denoiser="pixart", reuse=reuse, denoiser_budget_s=budget)


def record_timing(run: ToyRun, step: str, seconds: float) -> None:
    """Add the wall time of `step` (and the device's name) to `<out>/timings.json`."""
    path = run.out / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings["device"] = f"{device_name(torch.device(run.device))}, torch {torch.__version__}"
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
