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

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from simple_parsing import field  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from core.annotate.annotation import Annotator
from core.annotate.clipseg import centre_of_mass
from core.annotate.labellers import PAPER_WORLD, AnnotatorConfig, Scorer, Segmenter, World
from core.annotate.tags import PromptNounTagger
from core.diffusion.hooks import BRANCHES, record  # noqa: E402
from core.diffusion.pipelines import load_pipeline  # noqa: E402
from core.diffusion.presets import (  # noqa: E402
    PRESETS,
    STAGES,
    default_preset_name,
    get_preset,
)
from core.diffusion.sampling import generate_images  # noqa: E402
from core.emergence.composition import (  # noqa: E402
    DEFAULT_THRESHOLD,
    READINGS,
    iou,
    predict_over_steps,
)
from core.emergence.concepts import (  # noqa: E402
    ConceptDictionary,
    cohesion,
    concept_cids,
    load_dictionaries,
    separability,
)
from core.emergence.metrics import (  # noqa: E402
    NO_EFFECT,
    label_masks,
    load_lpips,
    pixel_difference,
)
from core.emergence.words import WordVectors, load_word_vectors  # noqa: E402
from core.files import write_csv  # noqa: E402
from core.quadrants import QUADRANTS, quadrant_of
from core.runtime import command  # noqa: E402
from core.sae.bank import SAEBank, SAEKey
from core.steer.intervene import Intervention, intervene  # noqa: E402
from core.steer.kinds import get_kind
from core.steer.regions import quadrant_mask
from core.steer.windows import SAE_CHOICES
from core.training.activations import read_prompts  # noqa: E402

MID = "mid_block.attentions.0"
TASKS = ("composition", "quality", "spatial", "global")
PAPER_COHESION = {1.0: 0.588, 0.5: 0.639, 0.0: 0.664}
PAPER_SEPARABILITY = {1.0: 0.433, 0.5: 0.363, 0.0: 0.344}
PAPER_SPATIAL = {"early": 0.80, "middle": 0.35, "final": 0.23}
PAPER_GLOBAL = {
    "early": {"success": 0.69, "delta_clip": 0.007, "lpips": 0.653},
    "middle": {"success": 0.93, "delta_clip": 0.021, "lpips": 0.385},
    "final": {"success": 0.78, "delta_clip": 0.006, "lpips": 0.114},
}
PAPER_COMPOSITION = "paper (SD v1.4): mid_block IoU ~0.26 at t=1.0, saturating by t=0.5; up best"
Rows = list[dict]


# generation helpers


def generate(pipe, prompt: str, seed: int, steps: int, guidance: float, resolution: int | None):
    """One image as PIL, from seed `seed`."""
    return generate_images(
        pipe, [prompt], [seed], steps=steps, guidance_scale=guidance, resolution=resolution
    )[0]


def image_size(pipe, resolution: int | None) -> tuple[int, int]:
    """(H, W) of the pipeline's images."""
    side = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


# (a) composition


def target_words(
    prompt: str,
    masks: Mapping[str, np.ndarray],
    word_vectors: WordVectors,
    labelled: set[str],
    targets: str | Sequence[str],
) -> list[str]:
    """The words scored for one image: annotated, with a word vector and with CIDs.

    targets: "nouns" (the prompt's object nouns), "labels" (every annotation label) or an
    explicit list of words.
    """
    if targets == "nouns":
        candidates = PromptNounTagger().tag(None, prompt)
    elif targets == "labels":
        candidates = list(masks)
    else:
        candidates = list(targets)
    return [w for w in candidates if w in masks and w in labelled and w in word_vectors]


def target_choice(text: str) -> str | list[str]:
    """A --targets option as `composition_rows` takes it: "nouns", "labels" or a comma list."""
    return text if text in ("nouns", "labels") else text.split(",")


def check_words(words: Sequence[str], word_vectors: WordVectors) -> None:
    missing = [w for w in words if w not in word_vectors]
    if missing:
        raise ValueError(
            f"no word vector for {missing} in {word_vectors.source!r}; pick other words"
        )


def composition_rows(
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    prompts: Sequence[str],
    annotator: Annotator,
    word_vectors: WordVectors,
    *,
    blocks: Sequence[str],
    branch: str = "cond",
    targets: str | Sequence[str] = "nouns",
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    reading: str = "top",
) -> Rows:
    """One row per (prompt, block, step, word): IoU of the predicted mask with the final
    image's annotation mask, and the two baselines' IoU (same for every step). `reading`:
    how a position's concept is picked (`core.emergence.composition.concept_map`)."""
    if not isinstance(targets, str):
        check_words(targets, word_vectors)
    labelled = {label for d in dictionaries.values() for label in d.vocabulary()}
    rows, masks_by_image = [], []
    for i, prompt in enumerate(tqdm(prompts, desc="composition")):
        with record(pipe, blocks, site=bank.sites(blocks)) as recording:
            image = generate(pipe, prompt, seed + i, steps, guidance_scale, resolution)
        masks = label_masks(annotator.annotate(image, prompt))
        masks_by_image.append(masks)
        words = target_words(prompt, masks, word_vectors, labelled, targets)
        if not words:
            continue
        for block in blocks:
            predictions = predict_over_steps(
                recording,
                bank,
                dictionaries,
                words,
                word_vectors,
                block=block,
                branch=branch,
                threshold=threshold,
                reading=reading,
            )
            for step in predictions:
                for word in words:
                    score = iou(step.predictions[word].mask[0], masks[word])
                    rows.append(
                        {
                            "prompt": prompt,
                            "seed": seed + i,
                            "image": i,
                            "block": block,
                            "branch": branch,
                            "step": step.step.index,
                            "t": round(step.step.t, 4),
                            "word": word,
                            "iou": float(score),
                        }
                    )
    add_baselines(rows, masks_by_image)
    return rows


def centred_box(shape: tuple[int, int]) -> np.ndarray:
    """The middle half of the image in each direction (a quarter of its area)."""
    height, width = shape
    box = np.zeros(shape, dtype=bool)
    box[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return box


def add_baselines(rows: Rows, masks_by_image: Sequence[Mapping[str, np.ndarray]]) -> None:
    """baseline_mean_iou: the word's mean mask over the other images (> 0.5), NaN if no other
    image has it; baseline_centre_iou: a centred box."""
    cache: dict[tuple[int, str], tuple[float, float]] = {}
    for row in rows:
        key = (row["image"], row["word"])
        if key not in cache:
            target = masks_by_image[row["image"]][row["word"]]
            others = [
                m[row["word"]]
                for j, m in enumerate(masks_by_image)
                if j != row["image"] and row["word"] in m and m[row["word"]].shape == target.shape
            ]
            mean_iou = math.nan
            if others:
                mean_mask = torch.as_tensor(np.mean(others, axis=0) > 0.5)
                mean_iou = float(iou(mean_mask, target))
            centre_iou = float(iou(torch.as_tensor(centred_box(target.shape)), target))
            cache[key] = (mean_iou, centre_iou)
        row["baseline_mean_iou"], row["baseline_centre_iou"] = cache[key]


def mean_by(rows: Rows, keys: Sequence[str], value: str) -> dict[tuple, float]:
    """Mean of `value` over rows grouped by `keys` (NaN values left out)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if not math.isnan(float(row[value])):
            groups.setdefault(tuple(row[k] for k in keys), []).append(float(row[value]))
    return {group: float(np.mean(values)) for group, values in groups.items()}


def plot_composition(rows: Rows, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    means = mean_by(rows, ("block", "t"), "iou")
    for block in sorted({row["block"] for row in rows}):
        points = sorted((t, v) for (b, t), v in means.items() if b == block)
        ax.plot(*zip(*points, strict=True), marker="o", label=block)
    for name, style in (("baseline_mean_iou", ":"), ("baseline_centre_iou", "--")):
        value = mean_by(rows, (), name).get((), math.nan)
        if not math.isnan(value):
            ax.axhline(value, color="grey", linestyle=style, label=name.removesuffix("_iou"))
    ax.set(xlabel="t (1 = noise)", ylabel="mean IoU", xlim=(1.02, -0.02))
    ax.set_title(f"composition IoU\n{PAPER_COMPOSITION}", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path)


# (d) quality


def quality_rows(
    dictionaries: Mapping[SAEKey, ConceptDictionary], word_vectors: WordVectors
) -> Rows:
    """Cohesion and separability of each dictionary (NaN where undefined), with the paper's."""
    rows = []
    for key, dictionary in sorted(dictionaries.items(), key=lambda kv: (kv[0].block, -kv[0].t)):
        rows.append(
            {
                "block": key.block,
                "branch": key.branch,
                "t": key.t,
                "concepts": int(dictionary.has_embedding.sum()),
                "cohesion": _or_nan(cohesion, dictionary, word_vectors),
                "separability": _or_nan(separability, dictionary),
                "paper_cohesion": PAPER_COHESION.get(key.t, math.nan),
                "paper_separability": PAPER_SEPARABILITY.get(key.t, math.nan),
            }
        )
    return rows


def _or_nan(metric: Callable[..., float], *args) -> float:
    try:
        return metric(*args)
    except ValueError:  # too few concepts for the metric
        return math.nan


def plot_quality(rows: Rows, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("cohesion", "separability"), strict=True):
        for block, branch in sorted({(r["block"], r["branch"]) for r in rows}):
            points = sorted(
                (r["t"], r[metric]) for r in rows if (r["block"], r["branch"]) == (block, branch)
            )
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{block} ({branch})")
        paper = PAPER_COHESION if metric == "cohesion" else PAPER_SEPARABILITY
        ax.plot(list(paper), list(paper.values()), "k--", label="paper (SD v1.4)")
        ax.set(xlabel="t (1 = noise)", title=metric, xlim=(1.05, -0.05))
        ax.legend(fontsize=6)
    save_figure(fig, path)


# (b) spatial edits


def object_cids(
    dictionaries: Mapping[SAEKey, ConceptDictionary], words: Sequence[str], block: str, branch: str
) -> tuple[dict[str, dict[SAEKey, list[int]]], list[str]]:
    """(word -> CIDs per SAE for the words that have some, words skipped for having none)."""
    found, skipped = {}, []
    for word in words:
        try:
            found[word] = concept_cids(dictionaries, word, block, branch)
        except ValueError:
            skipped.append(word)
    if not found:
        raise ValueError(
            f"none of {list(words)} labels a concept of {block} ({branch}); pick words from "
            "the dictionaries' labels"
        )
    return found, skipped


def strength_for(kind: str, stage: str, strengths: Mapping[str, float] | None) -> float:
    return (
        float(strengths[stage])
        if strengths and stage in strengths
        else get_kind(kind).default_strength[stage]
    )


def spatial_edit_rows(
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    objects: Sequence[str],
    segmenter: Segmenter,
    *,
    block: str = MID,
    branch: str = "cond",
    stages: Sequence[str] = tuple(STAGES),
    quadrants: Sequence[str] = QUADRANTS,
    strengths: Mapping[str, float] | None = None,
    template: str = PAPER_WORLD.template,
    lpips_distance: Callable | None = None,
    sae_choice: str = "stage",
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> Rows:
    """One row per (object, quadrant, stage). Object j is generated from seed + j; `edits`
    says which steps were edited with which SAE (`sae_choice`) and which were skipped;
    `pixel_diff` how much the edit changed the image (`no_effect` below `NO_EFFECT`)."""
    cids, _ = object_cids(dictionaries, objects, block, branch)
    size = image_size(pipe, resolution)
    rows = []
    jobs = [
        (j, o, q, s) for j, o in enumerate(objects) if o in cids for q in quadrants for s in stages
    ]
    before = {
        j: generate(pipe, template.format(obj), seed + j, steps, guidance_scale, resolution)
        for j, obj in enumerate(objects)
        if obj in cids
    }
    for j, obj, quadrant, stage in tqdm(jobs, desc="spatial edits"):
        strength = strength_for("spatial", stage, strengths)
        region = quadrant_mask(quadrant, size)
        edit = Intervention(
            "spatial",
            cids[obj],
            strength,
            stage,
            (branch,),
            region,
            sae_choice=sae_choice,
            concept=repr(obj),
        )
        with intervene(pipe, bank, block, edit, size) as record:
            image = generate(
                pipe, template.format(obj), seed + j, steps, guidance_scale, resolution
            )
        point = centre_of_mass(segmenter.segment(image, [obj])[obj])
        found = quadrant_of(point, image.size) if point else ""
        change = pixel_difference(before[j], image)
        rows.append(
            {
                "object": obj,
                "quadrant": quadrant,
                "stage": stage,
                "strength": strength,
                "seed": seed + j,
                "com_x": point[0] if point else math.nan,
                "com_y": point[1] if point else math.nan,
                "found_quadrant": found,
                "success": int(found == quadrant),
                "pixel_diff": change,
                "no_effect": int(change < NO_EFFECT),
                "lpips": lpips_distance(before[j], image) if lpips_distance else math.nan,
                "edits": record.summary(),
            }
        )
    return rows


def spatial_summary(rows: Rows) -> Rows:
    rates = mean_by(rows, ("stage",), "success")
    summary = []
    for (stage,), rate in rates.items():
        mine = [r for r in rows if r["stage"] == stage]
        summary.append(
            {
                "stage": stage,
                "success_rate": rate,
                "n": len(mine),
                **effect_summary(mine),
                "paper": PAPER_SPATIAL.get(stage, math.nan),
                "random": 0.25,
            }
        )
    return summary


def effect_summary(rows: Rows) -> dict[str, float]:
    """How much a stage's edits changed their images: the mean pixel change and the share of
    edits with no effect (`NO_EFFECT`)."""
    lpips_values = [r["lpips"] for r in rows if not math.isnan(r["lpips"])]
    return {
        "mean_pixel_diff": float(np.mean([r["pixel_diff"] for r in rows])),
        "no_effect_share": float(np.mean([r["no_effect"] for r in rows])),
        "mean_lpips": float(np.mean(lpips_values)) if lpips_values else math.nan,
    }


# (c) global edits


def global_edit_rows(
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    concepts: Sequence[str],
    prompts: Sequence[str],
    scorer: Scorer,
    *,
    block: str = MID,
    branch: str = "cond",
    stages: Sequence[str] = tuple(STAGES),
    strengths: Mapping[str, float] | None = None,
    lpips_distance: Callable | None = None,
    sae_choice: str = "stage",
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> Rows:
    """One row per (concept, prompt, stage): CLIP similarity with the concept's word before
    and after the edit, their difference, how much the image changed, and which steps were
    edited with which SAE (`sae_choice`) and which were skipped."""
    cids, _ = object_cids(dictionaries, concepts, block, branch)
    size = image_size(pipe, resolution)
    rows = []
    for i, prompt in enumerate(tqdm(prompts, desc="global edits")):
        before = generate(pipe, prompt, seed + i, steps, guidance_scale, resolution)
        for concept in cids:
            edited, records = [], []
            for stage in stages:
                strength = strength_for("global", stage, strengths)
                edit = Intervention(
                    "global",
                    cids[concept],
                    strength,
                    stage,
                    (branch,),
                    sae_choice=sae_choice,
                    concept=repr(concept),
                )
                with intervene(pipe, bank, block, edit, size) as record:
                    edited.append(
                        generate(pipe, prompt, seed + i, steps, guidance_scale, resolution)
                    )
                records.append(record)
            scores = scorer.similarity([before, *edited], concept)
            results = zip(stages, edited, scores[1:], records, strict=True)
            for stage, after, score, record in results:
                change = pixel_difference(before, after)
                rows.append(
                    {
                        "concept": concept,
                        "prompt": prompt,
                        "seed": seed + i,
                        "stage": stage,
                        "strength": strength_for("global", stage, strengths),
                        "clip_before": scores[0],
                        "clip_after": score,
                        "delta_clip": score - scores[0],
                        "success": int(score > scores[0]),
                        "pixel_diff": change,
                        "no_effect": int(change < NO_EFFECT),
                        "lpips": lpips_distance(before, after) if lpips_distance else math.nan,
                        "edits": record.summary(),
                    }
                )
    return rows


def global_summary(rows: Rows) -> Rows:
    summary = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        paper = PAPER_GLOBAL.get(stage, {})
        summary.append(
            {
                "stage": stage,
                "n": len(mine),
                "success_rate": float(np.mean([r["success"] for r in mine])),
                "mean_delta_clip": float(np.mean([r["delta_clip"] for r in mine])),
                **effect_summary(mine),
                "paper_success": paper.get("success", math.nan),
                "paper_delta_clip": paper.get("delta_clip", math.nan),
                "paper_lpips": paper.get("lpips", math.nan),
            }
        )
    return summary


def plot_stage_rates(summary: Rows, column: str, paper_column: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    stages = [r["stage"] for r in summary]
    x = np.arange(len(stages))
    ax.bar(x - 0.2, [r[column] for r in summary], 0.4, label="this run")
    ax.bar(x + 0.2, [r[paper_column] for r in summary], 0.4, label="paper (SD v1.4)")
    ax.set_xticks(x, stages)
    ax.set(ylabel=column, title=title, ylim=(0, 1))
    ax.legend(fontsize=7)
    save_figure(fig, path)


# output


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: Rows, title: str) -> str:
    """Rows as an aligned text table (floats to 3 decimals)."""
    if not rows:
        return f"{title}: no rows"
    columns = list(rows[0])
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


# CLI


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
