"""Paper 1's steering evaluations, each edit's row saying which steps it edited with which SAE
and CIDs and how much it changed its image (pixel difference, whether below `NO_EFFECT`,
LPIPS where it loads):

- spatial: move an object to each quadrant with a spatial edit in each stage; success when
  the segmenter's centre of mass lands in the target quadrant (CLIPSeg in the paper).
- global: add a concept everywhere in each stage; success when the scorer's similarity with
  the concept's word rises (CLIP in the paper).
"""

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from core.annotate.clipseg import centre_of_mass
from core.annotate.labellers import PAPER_WORLD, Scorer, Segmenter
from core.diffusion.presets import (
    STAGES,
)
from core.diffusion.sampling import generate_image, image_size
from core.emergence.concepts import (
    ConceptDictionary,
    concept_cids,
)
from core.emergence.metrics import (
    NO_EFFECT,
    pixel_difference,
)
from core.emergence.results import MID, PAPER_GLOBAL, PAPER_SPATIAL, Rows, mean_by
from core.quadrants import QUADRANTS, quadrant_of
from core.sae.bank import SAEBank, SAEKey
from core.steer.intervene import Intervention, intervene
from core.steer.kinds import get_kind
from core.steer.regions import quadrant_mask


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
        j: generate_image(pipe, template.format(obj), seed + j, steps, guidance_scale, resolution)
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
            image = generate_image(
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
        before = generate_image(pipe, prompt, seed + i, steps, guidance_scale, resolution)
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
                        generate_image(pipe, prompt, seed + i, steps, guidance_scale, resolution)
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
