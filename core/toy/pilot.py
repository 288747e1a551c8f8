"""Short training runs that choose the toy model's recipe: `python -m core.toy.pilot`.

A pilot trains one recipe (a scale of `core.toy.training.TRAIN_SCALES` with some fields
changed) with a wall-clock budget for its denoiser, then scores caption following on
held-out captions of its world (`core.toy.check.caption_rows`), once per guidance scale,
split by the number of objects the caption names. It writes `<out>/pilot.json` and prints
one markdown row of the pilot table in docs/toy.md:

    python -m core.toy.pilot --out runs/pilot-1 --minutes 15 \\
        --change max_objects=2 "radius_range=(0.18, 0.3)" denoiser_lr=1e-3

`--vae-from` reuses the VAE of an earlier pilot of the same world and widths, so that pilots
of the denoiser spend their budget on it.
"""

import ast
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from simple_parsing import field

from core.files import write_json
from core.runtime import command, default_device
from core.shapes.world import Scene
from core.toy.check import (
    CheckSettings,
    caption_rows,
    caption_summary,
    heldout_scenes,
    scored_rows,
)
from core.toy.model import ToyModelConfig
from core.toy.training import TRAIN_SCALES, ToyTrainConfig, ToyTrainer
from core.training.train import stop_on_signals


@dataclass(kw_only=True)
class PilotConfig:
    """Settings of `python -m core.toy.pilot`."""

    out: str
    """Run folder (created; a rerun resumes training, then scores again)."""
    scale: str = field(default="cpu", choices=sorted(TRAIN_SCALES))
    """The recipe the changes apply to."""
    change: tuple[str, ...] = field(default=(), nargs="*")
    """Fields of the recipe to change, as name=value (Python literals), e.g. max_objects=2."""
    minutes: float = 15.0
    """Wall-clock budget of the denoiser phase."""
    vae_from: str | None = None
    """An earlier pilot folder whose trained VAE to reuse."""
    captions: int = 100
    """Held-out captions to score."""
    seed: int = 200_000
    """Seed of the scored captions and their generations; not the check's, so that choosing
    a recipe never looks at the captions the check scores."""
    steps: int = 25
    """Denoising steps when scoring."""
    guidance: tuple[float, ...] = (4.0,)
    """Guidance scales to score at (one score each)."""
    raw: bool = False
    """Also score the trained weights themselves, not only their moving average (EMA)."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""


def recipe(config: PilotConfig) -> ToyTrainConfig:
    """The scale's recipe with `config.change` applied and the denoiser fitted to the budget
    (at most the recipe's `denoiser_steps`), so that the scale's own recipe with the same
    budget scores a run of `python -m core.toy.build train` in place.

    A change names a field of `ToyTrainConfig`, or of its model as `model.<field>`."""
    training, model = {}, {}
    known = {f.name for f in fields(ToyTrainConfig)} - {"model"}
    known_model = {f"model.{f.name}" for f in fields(ToyModelConfig)}
    for item in config.change:
        name, _, text = item.partition("=")
        if name not in known | known_model or not text:
            raise ValueError(
                f"cannot apply --change {item!r}: give name=value with a field of "
                f"ToyTrainConfig ({', '.join(sorted(known))}) or model.<field of ToyModelConfig>"
            )
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if name in known:
            training[name] = value
        else:
            model[name.removeprefix("model.")] = value
    base = TRAIN_SCALES[config.scale]
    base = replace(base, model=replace(base.model, **model), **training)
    return replace(base, denoiser_budget_s=60 * config.minutes)


def run_pilot(config: PilotConfig) -> dict | None:
    """Train and score one pilot; its results, or None if training was interrupted."""
    training, out = recipe(config), Path(config.out)
    device = config.device or default_device()
    if config.vae_from and not (out / "work" / "vae.safetensors").is_file():
        (out / "work").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(config.vae_from) / "work" / "vae.safetensors", out / "work")
    trainer = ToyTrainer(out, training, device)
    started = time.perf_counter()
    with stop_on_signals() as stop:
        pipe = trainer.run(stop=lambda: stop.raised)
    train_s = time.perf_counter() - started
    if pipe is None:
        return None
    pipe.to(device)
    settings = CheckSettings(
        prompts=config.captions,
        seed=config.seed,
        steps=config.steps,
        resolution=training.model.image_size,
        max_objects=training.max_objects,
        radius_range=training.radius_range,
    )
    scenes = heldout_scenes(config.captions, settings)
    truth = caption_summary(scored_rows([scene.image for scene in scenes], scenes))
    scores = {f"EMA, guidance {g:g}": score(pipe, scenes, settings, g) for g in config.guidance}
    if config.raw:
        raw = torch.load(out / "work" / "denoiser.pt", map_location=device, weights_only=True)
        for module, weights in zip((pipe.unet, pipe.text_encoder), raw["modules"], strict=True):
            module.load_state_dict(weights)
        for guidance in config.guidance:
            scores[f"raw, guidance {guidance:g}"] = score(pipe, scenes, settings, guidance)
    log = json.loads((out / "work" / "log.json").read_text())
    result = {
        "changes": list(config.change),
        "recipe": training.to_json(),
        "vae_from": config.vae_from,
        "denoiser_steps": log["denoiser_steps"],
        "samples_per_s": log["denoiser_samples_per_s"],
        "samples_seen": log["denoiser_steps"] * training.denoiser_batch,
        "train_s": train_s,
        "threads": torch.get_num_threads(),
        "scores": scores,
        "true_renders": truth,
    }
    write_json(out / "pilot.json", result)
    print(table_row(out.name, result))
    return result


def score(pipe, scenes: list[Scene], settings: CheckSettings, guidance: float) -> dict:
    """Caption following at one guidance scale, and the seconds it took."""
    started = time.perf_counter()
    rows = caption_rows(pipe, scenes, replace(settings, guidance_scale=guidance))
    return {**caption_summary(rows), "seconds": time.perf_counter() - started}


def table_row(name: str, result: dict) -> str:
    """One markdown row per scoring (weights and guidance): changes, samples/s, samples seen,
    scores."""
    rows = []
    for scoring, s in result["scores"].items():
        by_count = s["object_rate_by_count"]
        rows.append(
            f"| {name} | {'; '.join(result['changes']) or 'none'} | "
            f"{result['samples_per_s']:.0f} | {result['samples_seen']:,} | {scoring} | "
            f"{s['colour_rate']:.0%} | {s['spurious_colour_rate']:.0%} | "
            f"{by_count.get(1, math.nan):.0%} | {by_count.get(2, math.nan):.0%} | "
            f"{s['style_rate']:.0%} |"
        )
    return "\n".join(rows)


main = command(
    PilotConfig,
    run_pilot,
    "python -m core.toy.pilot",
    __doc__,
    exit_code=lambda result: 0 if result is not None else 130,
)


if __name__ == "__main__":
    sys.exit(main())
