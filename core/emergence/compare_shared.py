"""Compare time-shared SAEs with per-time SAEs: `python -m core.emergence.compare_shared --help`.

    python -m core.training.train --preset tiny --prompts P --out runs/per-time
    python -m core.training.train --preset tiny --prompts P --out runs/shared --shared-t 0 1
    python -m core.emergence.compare_shared --preset tiny --per-time runs/per-time/saes \
        --shared runs/shared/saes --prompts held-out.txt --out runs/compare

Both banks are evaluated on the same held-out generations (prompt i from seed + i, by default
far from the training seeds) at each --t: explained variance and dead fraction always;
composition IoU and spatial-edit success per stage when concept dictionaries exist for both
banks (build the shared one's with `python -m core.emergence.build_dictionary`). Writes
comparison.csv (one row per measure, block and t or stage, both kinds side by side), the raw
rows of each task (reconstruction.csv, composition.csv, spatial.csv) and summary.txt, which
it also prints. See `core.emergence.shared_vs_per_time` for the measures.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from simple_parsing import field

from core.annotate.labellers import PAPER_OBJECTS, AnnotatorConfig
from core.diffusion.hooks import BRANCHES
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import PRESETS, STAGES, get_preset
from core.emergence.composition import DEFAULT_THRESHOLD
from core.emergence.concepts import DictionaryLoadError, load_dictionaries
from core.emergence.evaluate_composition import target_choice
from core.emergence.results import MID, Rows, format_table
from core.emergence.shared_vs_per_time import (
    KINDS,
    Dictionaries,
    check_banks,
    comparison_rows,
    composition_iou_rows,
    reconstruction_rows,
    spatial_rows,
)
from core.emergence.words import load_word_vectors
from core.files import write_csv
from core.quadrants import QUADRANTS
from core.runtime import command
from core.sae.bank import SAEBank
from core.training.activations import read_prompts

TASKS = ("reconstruction", "composition", "spatial")
PAPER_LIMIT = (
    'paper 1 (limitations): per-time SAEs "preclude direct cross-timestep concept comparison"'
)


@dataclass(kw_only=True)
class CompareConfig:
    """Settings of `python -m core.emergence.compare_shared`."""

    per_time: str
    """Bank of per-time SAEs (folder or Hub repo), e.g. a training run's saes/."""
    shared: str
    """Bank of time-shared SAEs, from `python -m core.training.train --shared-t LOW HIGH`."""
    prompts: str
    """Held-out prompts, one a line."""
    out: str
    """Output folder."""
    preset: str = field(default="sd14", choices=sorted(PRESETS))
    """Preset: pipeline, sampling and hook points."""
    model: str | None = None
    """Pipeline Hub id or local folder (default: the preset's)."""
    blocks: tuple[str, ...] | None = None
    """Blocks compared (default: the preset's)."""
    branch: str = field(default="cond", choices=BRANCHES)
    """CFG branch of the SAEs."""
    t: tuple[float, ...] = (1.0, 0.5, 0.0)
    """Times each measure is taken at (the recorded step nearest each)."""
    tasks: tuple[str, ...] = field(default=TASKS, choices=TASKS, nargs="*")
    """Measures to run; composition and spatial need dictionaries for both banks."""
    per_time_dictionaries: str | None = None
    """Concept dictionaries of the per-time SAEs (default: --per-time)."""
    shared_dictionaries: str | None = None
    """Concept dictionaries of the time-shared SAEs (default: --shared)."""
    annotation: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    """Which annotator labels the generated images (composition), and its models."""
    targets: str = "nouns"
    """Composition words: nouns, labels, or a comma list."""
    threshold: float = DEFAULT_THRESHOLD
    """Composition cosine threshold."""
    word_vectors: str | None = None
    """Word vectors (default: the source the dictionaries were built with)."""
    edit_block: str = MID
    """Block moved by the spatial edits."""
    objects: tuple[str, ...] = PAPER_OBJECTS
    """Spatial-edit objects (those labelled in both banks' dictionaries are used)."""
    quadrants: tuple[str, ...] = field(default=QUADRANTS, choices=QUADRANTS, nargs="*")
    """Spatial-edit target quadrants."""
    stages: tuple[str, ...] = field(default=tuple(STAGES), choices=tuple(STAGES), nargs="*")
    """Stages the spatial edits act in."""
    seed: int = 100_000
    """Prompt/object i uses seed + i: by default far from training's (0 + i), so held out."""
    limit: int | None = None
    """Use at most this many prompts."""
    gen_batch: int = 4
    """Prompts generated at once (reconstruction)."""
    steps: int | None = None
    """Denoising steps (default: the preset's)."""
    guidance: float | None = None
    """CFG scale (default: the preset's)."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""


def compare(config: CompareConfig) -> Rows:
    """Run the tasks `config` names on both banks; write and return the comparison rows."""
    prompts = read_prompts(config.prompts)[: config.limit]
    preset = get_preset(config.preset, **({"model": config.model} if config.model else {}))
    blocks = list(config.blocks or preset.hook_points)
    pipe = load_pipeline(preset, device=config.device)
    edit_blocks = [config.edit_block] if "spatial" in config.tasks else []
    loaded = list(dict.fromkeys([*blocks, *edit_blocks]))
    banks = {
        kind: SAEBank.from_pretrained(source, loaded, [config.branch], device=pipe.device)
        for kind, source in zip(KINDS, (config.per_time, config.shared), strict=True)
    }
    check_banks(banks, loaded, config.branch)
    common = dict(
        seed=config.seed,
        steps=config.steps or preset.steps,
        guidance_scale=preset.guidance_scale if config.guidance is None else config.guidance,
        resolution=preset.resolution,
    )
    notes = []
    raw: dict[str, Rows] = {task: [] for task in TASKS}
    if "reconstruction" in config.tasks:
        raw["reconstruction"] = reconstruction_rows(
            pipe,
            banks,
            prompts,
            blocks=blocks,
            branch=config.branch,
            ts=config.t,
            gen_batch=config.gen_batch,
            **common,
        )
    dictionaries = None
    if {"composition", "spatial"} & set(config.tasks):
        dictionaries = load_both(config, loaded, notes)
    if dictionaries and "composition" in config.tasks:
        source = config.word_vectors or next(iter(dictionaries["per_time"].values())).word_vectors
        raw["composition"] = composition_iou_rows(
            pipe,
            banks,
            dictionaries,
            prompts,
            config.annotation.load_annotator(config.device),
            load_word_vectors(source),
            blocks=blocks,
            branch=config.branch,
            targets=target_choice(config.targets),
            threshold=config.threshold,
            **common,
        )
    if dictionaries and "spatial" in config.tasks:
        raw["spatial"] = spatial_rows(
            pipe,
            banks,
            dictionaries,
            config.objects,
            config.annotation.load_segmenter(config.device),
            block=config.edit_block,
            branch=config.branch,
            stages=config.stages,
            quadrants=config.quadrants,
            **common,
        )
    rows = comparison_rows(raw["reconstruction"], raw["composition"], raw["spatial"], config.t)
    write_results(Path(config.out), rows, raw, notes, len(prompts))
    return rows


def load_both(config: CompareConfig, blocks: list[str], notes: list[str]) -> Dictionaries | None:
    """Both banks' dictionaries, or None (with a note why) if either has none."""
    sources = (
        config.per_time_dictionaries or config.per_time,
        config.shared_dictionaries or config.shared,
    )
    try:
        return {
            kind: load_dictionaries(source, blocks, [config.branch])
            for kind, source in zip(KINDS, sources, strict=True)
        }
    except DictionaryLoadError as error:
        notes.append(f"composition and spatial edits skipped: {error.args[0]}")
        return None


def write_results(
    out: Path, rows: Rows, raw: dict[str, Rows], notes: list[str], images: int
) -> None:
    write_csv(out / "comparison.csv", rows)
    for task, task_rows in raw.items():
        if task_rows:
            write_csv(out / f"{task}.csv", task_rows)
    title = f"time-shared vs per-time SAEs on {images} held-out generations ({PAPER_LIMIT})"
    summary = "\n".join([format_table(rows, title), *notes])
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    print(f"wrote results to {out}")


main = command(CompareConfig, compare, "python -m core.emergence.compare_shared", __doc__)


if __name__ == "__main__":
    sys.exit(main())
