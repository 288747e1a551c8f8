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

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from core.diffusion.checksums import CARD, SHIPPED, checksum_block, shipped_files
from core.diffusion.presets import SD14_BLOCKS, get_preset, load_pipeline
from core.emergence import build_dictionary
from core.emergence.concepts import CONCEPTS_FILE, load_dictionaries
from core.emergence.words import load_word_vectors
from core.runtime import default_device, one_line_errors
from core.sae.model import SAEBank
from core.shapes.world import dataset
from core.toy.check import CheckSettings, report, run_check
from core.toy.model import parameter_count
from core.toy.training import TRAIN_SCALES, ToyTrainConfig, ToyTrainer
from core.training import train as sae_train
from core.training.train import stop_on_signals

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
    "full": AnalysisSettings(),
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
    """The folder of one toy build and the settings of its scale."""

    def __init__(self, out: str | Path, scale: str, device: str | None):
        self.out, self.scale = Path(out), scale
        self.device = device or default_device()
        self.training: ToyTrainConfig = TRAIN_SCALES[scale]
        self.analysis = ANALYSIS_SCALES[scale]
        self.check_settings = replace(
            self.analysis.check, resolution=self.training.model.image_size
        )

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
            scenes = dataset(
                count,
                self.training.seed + offset,
                self.training.model.image_size,
                self.training.max_objects,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(scene.caption for scene in scenes) + "\n")
        return path

    def training_captions(self) -> set[str]:
        return {
            scene.caption
            for scene in dataset(
                self.training.scenes,
                self.training.seed,
                self.training.model.image_size,
                self.training.max_objects,
            )
        }

    def common_args(self) -> list[str]:
        a = self.analysis
        return [
            "--preset",
            "toy",
            "--model",
            str(self.pipeline),
            "--device",
            self.device,
            "--steps",
            str(a.steps),
            "--guidance",
            str(a.guidance_scale),
        ]


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
    argv = [
        *run.common_args(),
        "--prompts",
        str(run.prompts("sae")),
        "--out",
        str(work),
        "--t",
        "1.0",
        "0.5",
        "0.0",
        "--blocks",
        *SD14_BLOCKS,
        "--branches",
        "cond",
        "--gen-batch",
        str(a.gen_batch),
        "--batch-size",
        str(a.sae_batch),
        "--buffer-size",
        str(a.buffer_size),
        "--lr",
        str(a.sae_lr),
        "--resolution",
        str(run.training.model.image_size),
    ]
    if (work / "checkpoints" / "latest").is_file():
        argv.append("--resume")
    elif work.exists():
        argv.append("--overwrite")
    if sae_train.train(sae_train.parse_args(argv)) is None:
        return False
    shutil.copytree(work / "saes", run.saes, dirs_exist_ok=True)
    shutil.copy(work / "metrics.json", run.saes / "metrics.json")
    return True


def _has_saes(folder: Path) -> bool:
    return folder.is_dir() and any(folder.rglob("sae.safetensors"))


def build_dictionaries(run: ToyRun) -> bool:
    if any(run.saes.rglob(CONCEPTS_FILE)):
        print(f"{run.saes} holds dictionaries already")
        return True
    argv = [
        *run.common_args(),
        "--saes",
        str(run.saes),
        "--prompts",
        str(run.prompts("dictionary")),
        "--out",
        str(run.saes),
        "--annotator",
        "toy",
        "--gen-batch",
        str(run.analysis.gen_batch),
    ]
    build_dictionary.run(build_dictionary.parse_args(argv))
    return True


def check(run: ToyRun) -> bool:
    if not (run.pipeline / "model_index.json").is_file():
        raise ValueError(
            f"no trained toy model in {run.pipeline}; run `python -m core.toy.build train --out "
            f"{run.out}` (and saes, dictionary) first"
        )
    preset = get_preset("toy", model=str(run.pipeline), guidance_scale=run.analysis.guidance_scale)
    pipe = load_pipeline(preset, device=run.device)
    dictionaries = load_dictionaries(run.saes, branches=["cond"])
    bank = SAEBank.from_pretrained(run.saes, branches=["cond"], device=pipe.device)
    words = load_word_vectors(next(iter(dictionaries.values())).word_vectors)
    out = run.out / "check"
    out.mkdir(parents=True, exist_ok=True)
    results = run_check(
        pipe,
        bank,
        dictionaries,
        words,
        run.training_captions(),
        run.check_settings,
        SD14_BLOCKS,
        out,
    )
    (out / "report.md").write_text(report(results))
    print(report(results))
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
    log_path = run.out / "work" / "log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    check_path = run.out / "check" / "report.md"
    check_text = check_path.read_text() if check_path.is_file() else "Not run.\n"
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
            f"--ship <assets folder>` on {run.device}; every step is seeded.",
            "",
            f"- model: `{json.dumps(run.training.model.to_dict())}`",
            f"- training: `{json.dumps(asdict(run.training))}`",
            f"- SAEs, dictionaries and check: `{json.dumps(asdict(run.analysis))}`",
            f"- final losses: `{json.dumps(log)}`",
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m core.toy.build",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("step", choices=[*STEPS, "all"])
    p.add_argument("--out", required=True, help="run folder (created; reruns resume)")
    p.add_argument("--scale", default="full", choices=sorted(TRAIN_SCALES))
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--to", "--ship", dest="to", help="assets folder to ship to (ship, all)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    args = p.parse_args(argv)
    if args.step == "ship" and not args.to:
        p.error("ship needs --to, e.g. --to assets/toy")
    return args


def run_steps(args: argparse.Namespace) -> int:
    if args.overwrite:
        shutil.rmtree(args.out, ignore_errors=True)
    run = ToyRun(args.out, args.scale, args.device)
    steps = STEPS if args.step == "all" else (args.step,)
    work = {
        "train": train_model,
        "saes": train_saes,
        "dictionary": build_dictionaries,
        "check": check,
    }
    for step in steps:
        if step == "ship":
            if args.to:
                ship(run, Path(args.to))
        elif not work[step](run):
            return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return one_line_errors(lambda: run_steps(args))


if __name__ == "__main__":
    sys.exit(main())
