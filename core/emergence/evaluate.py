"""Reproduce paper 1's evaluations: `python -m core.emergence.evaluate --help`.

Four tasks, each writing a CSV of raw rows (and a summary) plus a plot into --out:

- composition: IoU of the mask predicted at every step (`predict_over_steps`) with the
  annotation mask of the final image, per block; two baselines that ignore the model:
  the mean annotation mask of the word over the other images, and a centred box.
- quality: concept cohesion and separability per SAE, from saved dictionaries.
- spatial: move an object to each quadrant with a spatial edit of mid_block (cond) in
  each stage; success when CLIPSeg's centre of mass lands in the target quadrant.
- global: add a concept everywhere in each stage; success when CLIP similarity with the
  concept's word rises.

Both edit tasks also report how much each edit changed its image: the mean absolute pixel
difference, whether it had no effect (below one grey level, `NO_EFFECT`) and, where the
`lpips` package can load its weights, LPIPS.

Spatial and global edits use the stage's SAE at every step, as the paper does (early
t = 1.0, middle 0.5, final 0.0; `--sae-choice nearest`: each step's nearest). Each edit's
row (`edits`) says which steps it edited with which SAE and CIDs, and which it skipped and why.

By default everything comes from the preset: its SAEs and dictionaries, its prompt file, its
steering block, its annotator, and the objects and concepts of its world (the paper's for
grounded-sam, shapes and background styles for the shapes world). The default preset is the
offline one, so `python -m core.emergence.evaluate --out DIR` runs as shipped, offline.

The functions below take built objects (pipeline, bank, dictionaries, annotators), so
tests and the app call them directly; the CLI only loads things and writes files.
"""

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from simple_parsing import field

from core.annotate.labellers import AnnotatorConfig, World
from core.diffusion.hooks import BRANCHES
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import (
    PRESETS,
    STAGES,
    default_preset_name,
    get_preset,
)
from core.emergence.composition import (
    DEFAULT_THRESHOLD,
    READINGS,
)
from core.emergence.concepts import (
    ConceptDictionary,
    load_dictionaries,
)
from core.emergence.evaluate_composition import (
    check_words,
    composition_rows,
    plot_composition,
    target_choice,
)
from core.emergence.evaluate_edits import (
    global_edit_rows,
    global_summary,
    object_cids,
    spatial_edit_rows,
    spatial_summary,
)
from core.emergence.evaluate_quality import plot_quality, quality_rows
from core.emergence.metrics import (
    load_lpips,
)
from core.emergence.results import PAPER_COMPOSITION, format_table, mean_by, plot_stage_rates
from core.emergence.words import WordVectors, load_word_vectors
from core.files import write_csv
from core.quadrants import QUADRANTS
from core.runtime import command
from core.sae.bank import SAEBank, SAEKey
from core.steer.windows import SAE_CHOICES
from core.training.activations import read_prompts

TASKS = ("composition", "quality", "spatial", "global")


@dataclass(kw_only=True)
class EvaluateConfig:
    """Settings of `python -m core.emergence.evaluate`."""

    out: str
    """Output folder for CSVs and plots."""
    tasks: tuple[str, ...] = field(default=TASKS, choices=TASKS, nargs="*")
    """Evaluations to run."""
    preset: str | None = field(default=None, choices=sorted(PRESETS))
    """Preset: pipeline, sampling, hook points, SAEs, prompts and annotator (default: toy if
    its weights are here, else tiny)."""
    model: str | None = None
    """Pipeline Hub id or local folder (default: the preset's)."""
    saes: str | None = None
    """SAE bank folder or Hub repo, for all tasks but quality (default: the preset's)."""
    dictionaries: str | None = None
    """Concept dictionaries (default: --saes)."""
    prompts: str | None = None
    """Text file, one prompt per line, for composition and global (default: the preset's)."""
    blocks: tuple[str, ...] | None = None
    """Composition blocks (default: the preset's)."""
    branch: str = field(default="cond", choices=BRANCHES)
    """CFG branch of the SAEs and edits."""
    targets: str | None = None
    """Composition words: nouns, labels, or a comma list (default: nouns; labels with the
    toy annotator)."""
    threshold: float = DEFAULT_THRESHOLD
    """Composition cosine threshold."""
    concept_map: str = field(default="top", choices=READINGS)
    """A position's concept in composition: top (the paper's: its most active latent, which
    predicts nothing there if unlabelled) or labelled (its most active labelled latent)."""
    objects: tuple[str, ...] | None = None
    """Spatial-edit objects (default: ten everyday objects; the shapes with the toy
    annotator)."""
    quadrants: tuple[str, ...] = field(default=QUADRANTS, choices=QUADRANTS, nargs="*")
    """Spatial-edit target quadrants."""
    concepts: tuple[str, ...] | None = None
    """Global-edit concepts (default: snow, painting, flower; the background styles with the
    toy annotator)."""
    stages: tuple[str, ...] = field(default=tuple(STAGES), choices=tuple(STAGES), nargs="*")
    """Stages the edits act in."""
    edit_block: str | None = None
    """Block edited by spatial/global edits (default: the preset's steering block)."""
    sae_choice: str = field(default="stage", choices=SAE_CHOICES)
    """SAE of each edited step: the stage's t (1.0, 0.5, 0.0), or the t nearest the step's."""
    annotation: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    """Which annotator labels the generated images (composition), and its models."""
    word_vectors: str | None = None
    """Word vectors (default: the source the dictionaries were built with)."""
    seed: int = 0
    """Prompt/object i uses seed + i."""
    limit: int | None = None
    """Use at most this many prompts."""
    steps: int | None = None
    """Denoising steps (default: the preset's)."""
    guidance: float | None = None
    """CFG scale (default: the preset's)."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""

    def __post_init__(self) -> None:
        """Fill in the preset's defaults, then check that the tasks have what they need."""
        self.preset = self.preset or default_preset_name()
        preset = get_preset(self.preset)
        self.saes = self.saes or preset.sae_source
        self.prompts = self.prompts or preset.prompts
        self.edit_block = self.edit_block or preset.app.steer_block
        self.annotation = self.annotation.for_preset(preset)
        self.targets = self.targets or self.world.targets
        self.objects = self.objects or self.world.objects
        self.concepts = self.concepts or self.world.concepts
        needs_model = set(self.tasks) - {"quality"}
        if needs_model and not self.saes:
            raise ValueError(
                f"--saes is needed for {', '.join(sorted(needs_model))}: the preset "
                f"{self.preset!r} has no SAEs of its own"
            )
        if not (self.dictionaries or self.saes):
            raise ValueError("give --dictionaries (or --saes holding them)")
        if {"composition", "global"} & set(self.tasks) and not self.prompts:
            raise ValueError(
                f"--prompts is needed for composition and global: the preset {self.preset!r} "
                "ships none"
            )

    @property
    def world(self) -> World:
        """What the evaluations ask of the images, by the annotator that labels them."""
        return self.annotation.labeller.world


def evaluate(config: EvaluateConfig) -> None:
    """Run the tasks `config` names, writing their CSVs and plots and printing summaries."""
    out = Path(config.out)
    prompts = read_prompts(config.prompts)[: config.limit] if config.prompts else []
    dictionaries = load_dictionaries(config.dictionaries or config.saes, branches=[config.branch])
    source = config.word_vectors or next(iter(dictionaries.values())).word_vectors
    word_vectors = load_word_vectors(source)
    targets = target_choice(config.targets)
    if not isinstance(targets, str):
        check_words(targets, word_vectors)
    if "quality" in config.tasks:
        rows = quality_rows(dictionaries, word_vectors)
        write_csv(out / "quality.csv", rows)
        plot_quality(rows, out / "quality.png")
        print(format_table(rows, "concept cohesion / separability per SAE"))
    if set(config.tasks) == {"quality"}:
        return
    preset = get_preset(config.preset, **({"model": config.model} if config.model else {}))
    pipe = load_pipeline(preset, device=config.device)
    bank = SAEBank.from_pretrained(config.saes, branches=[config.branch], device=pipe.device)
    common = dict(
        seed=config.seed,
        steps=config.steps or preset.steps,
        resolution=preset.resolution,
        guidance_scale=preset.guidance_scale if config.guidance is None else config.guidance,
    )
    if "composition" in config.tasks:
        blocks = config.blocks or list(preset.hook_points)
        composition_task(
            config, pipe, bank, dictionaries, prompts, word_vectors, targets, blocks, common
        )
    edit = dict(
        block=config.edit_block,
        branch=config.branch,
        stages=config.stages,
        sae_choice=config.sae_choice,
        **common,
    )
    if {"spatial", "global"} & set(config.tasks):
        edit["lpips_distance"], why = load_lpips(pipe.device)
        if why:
            print(why)
    if "spatial" in config.tasks:
        spatial_task(config, pipe, bank, dictionaries, edit)
    if "global" in config.tasks:
        global_task(config, pipe, bank, dictionaries, prompts, edit)
    print(f"wrote results to {out}")


def composition_task(
    config: EvaluateConfig,
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    prompts: Sequence[str],
    word_vectors: WordVectors,
    targets: str | Sequence[str],
    blocks: Sequence[str],
    common: dict,
) -> None:
    """(a) IoU of predicted masks against the annotation, per block and step."""
    rows = composition_rows(
        pipe,
        bank,
        dictionaries,
        prompts,
        config.annotation.load_annotator(config.device),
        word_vectors,
        blocks=blocks,
        branch=config.branch,
        targets=targets,
        threshold=config.threshold,
        reading=config.concept_map,
        **common,
    )
    out = Path(config.out)
    write_csv(out / "composition.csv", rows)
    summary = [
        {"block": b, "t": t, "mean_iou": v}
        for (b, t), v in mean_by(rows, ("block", "t"), "iou").items()
    ]
    write_csv(out / "composition_summary.csv", summary)
    plot_composition(rows, out / "composition.png")
    labeller = config.annotation.describe()
    print(format_table(summary, f"composition IoU, labelled by {labeller} ({PAPER_COMPOSITION})"))


def spatial_task(
    config: EvaluateConfig,
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    edit: dict,
) -> None:
    """(b) Spatial edits: does the object's centre of mass move to the target quadrant?"""
    _, skipped = object_cids(dictionaries, config.objects, config.edit_block, config.branch)
    if skipped:
        print(f"spatial: skipping {skipped}: no concept of {config.edit_block} has those labels")
    rows = spatial_edit_rows(
        pipe,
        bank,
        dictionaries,
        config.objects,
        config.annotation.load_segmenter(config.device),
        quadrants=config.quadrants,
        template=config.world.template,
        **edit,
    )
    out = Path(config.out)
    summary = spatial_summary(rows)
    write_csv(out / "spatial.csv", rows)
    write_csv(out / "spatial_summary.csv", summary)
    plot_stage_rates(
        summary, "success_rate", "paper", "spatial edits: success", out / "spatial.png"
    )
    print(format_table(summary, "spatial edits: CLIPSeg centre of mass in the target quadrant"))


def global_task(
    config: EvaluateConfig,
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    prompts: Sequence[str],
    edit: dict,
) -> None:
    """(c) Global edits: does the image's CLIP similarity to the concept rise?"""
    _, skipped = object_cids(dictionaries, config.concepts, config.edit_block, config.branch)
    if skipped:
        print(f"global: skipping {skipped}: no concept of {config.edit_block} has those labels")
    rows = global_edit_rows(
        pipe,
        bank,
        dictionaries,
        config.concepts,
        prompts,
        config.annotation.load_scorer(config.device),
        **edit,
    )
    out = Path(config.out)
    summary = global_summary(rows)
    write_csv(out / "global.csv", rows)
    write_csv(out / "global_summary.csv", summary)
    plot_stage_rates(
        summary, "success_rate", "paper_success", "global edits: success", out / "global.png"
    )
    print(format_table(summary, "global edits: CLIP similarity to the concept rises"))


main = command(EvaluateConfig, evaluate, "python -m core.emergence.evaluate", __doc__)


if __name__ == "__main__":
    sys.exit(main())
