"""Check the toy model and the emergence paper's claims on it, with the truth known.

On held-out captions (`core.toy.training.held_out`: training never sees them):

1. Caption following: the shapes-world annotator looks for every object the caption names
   (colour and shape) and for the background style.
2. Composition (`core.emergence.evaluate_composition.composition_rows`): IoU of the mask
   predicted from SAE features at every step with the final image's object masks, beside
   the mean-mask and centred-box baselines that ignore the model. Claims: IoU rises with
   the steps; at t = 1 it beats the better baseline.
3. Spatial edits (`core.emergence.evaluate_edits.spatial_edit_rows`): move a shape to each
   quadrant in each stage. Claim: success is higher early than in the middle or final stage.
4. Global edits (`core.emergence.evaluate_edits.global_edit_rows`): add a background-style
   concept everywhere. Claim: the style changes most often in the middle stage.

Every number comes from generations; nothing is tuned to make a claim hold.
"""

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.annotate.labellers import TOY_WORLD
from core.annotate.shapes import StyleScorer, ToyAnnotator, ToySegmenter
from core.diffusion.sampling import generate_image
from core.emergence.concepts import ConceptDictionary
from core.emergence.evaluate_composition import composition_rows
from core.emergence.evaluate_edits import (
    global_edit_rows,
    global_summary,
    spatial_edit_rows,
    spatial_summary,
)
from core.emergence.metrics import load_lpips
from core.emergence.results import MID, PAPER_GLOBAL, PAPER_SPATIAL, Rows, mean_by
from core.emergence.words import WordVectors
from core.files import write_csv
from core.sae.bank import SAEBank, SAEKey
from core.shapes.world import RADIUS_RANGE, SHAPES, STYLES, Scene, dataset
from core.toy.training import held_out

PAPER_COMPOSITION_MID_T1 = 0.26
"""Paper: mid_block IoU at t = 1.0 on SD v1.4 (saturating by t = 0.5; up_block best)."""


@dataclass(frozen=True)
class CheckSettings:
    prompts: int = 200
    """Held-out captions for caption following and composition."""
    edit_prompts: int = 20
    """Held-out captions edited by each style concept in each stage."""
    seed: int = 100_000
    steps: int = 50
    guidance_scale: float = 4.0
    resolution: int = 64
    max_objects: int = 3
    radius_range: tuple[float, float] = RADIUS_RANGE
    """The world the model was trained on: at most this many objects, of these sizes."""


def heldout_scenes(n: int, s: CheckSettings, tries: int = 100) -> list[Scene]:
    """`n` scenes of the checked world whose captions training never sees
    (`core.toy.training.held_out`), drawn from one seeded generator (`s.seed`)."""
    scenes = []
    drawn = dataset(n * tries, s.seed, s.resolution, s.max_objects, radius_range=s.radius_range)
    for scene in drawn:
        if held_out(scene.caption):
            scenes.append(scene)
            if len(scenes) == n:
                return scenes
    raise ValueError(f"found only {len(scenes)} held-out captions in {n * tries} scenes")


def caption_rows(pipe, scenes: Sequence[Scene], s: CheckSettings) -> Rows:
    """One row per named object of each caption's generated image (`scored_rows`)."""
    images = [
        generate_image(pipe, scene.caption, s.seed + i, s.steps, s.guidance_scale, s.resolution)
        for i, scene in enumerate(scenes)
    ]
    return scored_rows(images, scenes)


def scored_rows(images: Sequence, scenes: Sequence[Scene]) -> Rows:
    """One row per named object: was it found in the image (colour and shape), was the
    style right. On the scenes' own renders it measures the annotator itself."""
    annotator, rows = ToyAnnotator(), []
    for i, (image, scene) in enumerate(zip(images, scenes, strict=True)):
        found = annotator.colour_shapes(image)
        style_right = annotator.background_style(image) == scene.background.style
        named = {obj.colour for obj in scene.objects}
        for obj in scene.objects:
            rows.append(
                {
                    "image": i,
                    "caption": scene.caption,
                    "objects_named": len(scene.objects),
                    "colour": obj.colour,
                    "shape": obj.shape,
                    "object_found": int((obj.colour, obj.shape) in found),
                    "colour_found": int(any(c == obj.colour for c, _ in found)),
                    "style_right": int(style_right),
                    "objects_found": len(found),
                    "spurious_colours": len({c for c, _ in found} - named),
                }
            )
    return rows


def caption_summary(rows: Rows) -> dict:
    """Rates over every named object, and the object rate per count of named objects
    (`object_rate_by_count`: {1: rate in one-object scenes, 2: ...})."""
    per_image = {r["image"]: r for r in rows}.values()
    counts = sorted({r["objects_named"] for r in rows})
    return {
        "object_rate": float(np.mean([r["object_found"] for r in rows])),
        "colour_rate": float(np.mean([r["colour_found"] for r in rows])),
        "style_rate": float(np.mean([r["style_right"] for r in per_image])),
        "spurious_colour_rate": float(np.mean([r["spurious_colours"] > 0 for r in per_image])),
        "object_rate_by_count": {
            n: float(np.mean([r["object_found"] for r in rows if r["objects_named"] == n]))
            for n in counts
        },
        "images_by_count": {n: sum(r["objects_named"] == n for r in per_image) for n in counts},
        "objects": len(rows),
        "images": len(per_image),
    }


def composition_summary(rows: Rows) -> Rows:
    """Per block: mean IoU at the first (t = 1) and last step, and the two baselines."""
    summary = []
    for block in dict.fromkeys(r["block"] for r in rows):
        mine = [r for r in rows if r["block"] == block]
        by_t = mean_by(mine, ("t",), "iou")
        first, last = max(by_t), min(by_t)
        summary.append(
            {
                "block": block,
                "t_first": first[0],
                "iou_first": by_t[first],
                "t_last": last[0],
                "iou_last": by_t[last],
                "baseline_mean_iou": _nanmean([r["baseline_mean_iou"] for r in mine]),
                "baseline_centre_iou": _nanmean([r["baseline_centre_iou"] for r in mine]),
                "n": len({(r["image"], r["word"]) for r in mine}),
            }
        )
    return summary


def _nanmax(*values: float) -> float:
    """The largest value that is not NaN (the centred-box baseline is never NaN)."""
    return max(v for v in values if not math.isnan(v))


def _nanmean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def labelled(
    dictionaries: Mapping[SAEKey, ConceptDictionary], words: Sequence[str], block: str
) -> list[str]:
    """The words that label some concept of `block` (edits need CIDs)."""
    found = {
        label for key, d in dictionaries.items() if key.block == block for label in d.vocabulary()
    }
    return [w for w in words if w in found]


def run_check(
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    word_vectors: WordVectors,
    settings: CheckSettings,
    blocks: Sequence[str],
    out: Path,
    strengths: Mapping[str, Mapping[str, float]] | None = None,
    steer_block: str = MID,
) -> dict:
    """Run all four parts, write their CSV files into `out` and return the summary. Edits of
    `steer_block` use `strengths` (kind -> stage -> strength, e.g. calibrated by
    `core.emergence.strengths`), else the paper's."""
    strengths = strengths or {}
    lpips_distance, _ = load_lpips(pipe.device)
    s = settings
    scenes = heldout_scenes(s.prompts + s.edit_prompts, s)
    checked, edited = scenes[: s.prompts], [sc.caption for sc in scenes[s.prompts :]]
    common = dict(
        seed=s.seed, steps=s.steps, guidance_scale=s.guidance_scale, resolution=s.resolution
    )
    results: dict = {"settings": asdict(s), "strengths": strengths}
    rows = caption_rows(pipe, checked, s)
    write_csv(out / "captions.csv", rows)
    results["captions"] = caption_summary(rows)
    results["captions_true_renders"] = caption_summary(
        scored_rows([scene.image for scene in checked], checked)
    )
    rows = composition_rows(
        pipe,
        bank,
        dictionaries,
        [sc.caption for sc in checked],
        ToyAnnotator(),
        word_vectors,
        blocks=blocks,
        targets="labels",
        **common,
    )
    write_csv(out / "composition.csv", rows)
    results["composition"] = composition_summary(rows)
    shapes = labelled(dictionaries, SHAPES, steer_block)
    results["spatial"] = []
    if shapes:
        rows = spatial_edit_rows(
            pipe,
            bank,
            dictionaries,
            shapes,
            ToySegmenter(),
            block=steer_block,
            template=TOY_WORLD.template,
            strengths=strengths.get("spatial"),
            lpips_distance=lpips_distance,
            **common,
        )
        write_csv(out / "spatial.csv", rows)
        results["spatial"] = spatial_summary(rows)
    styles = labelled(dictionaries, STYLES, steer_block)
    results["global"] = []
    if styles:
        rows = global_edit_rows(
            pipe,
            bank,
            dictionaries,
            styles,
            edited,
            StyleScorer(),
            block=steer_block,
            strengths=strengths.get("global"),
            lpips_distance=lpips_distance,
            **common,
        )
        write_csv(out / "global.csv", rows)
        results["global"] = global_summary(rows)
    results["labelled"] = {"shapes": shapes, "styles": styles}
    results["claims"] = claims(results)
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


def claims(results: dict) -> list[dict]:
    """Each claim with whether it holds here; None where it could not be tested."""
    out = []
    for row in results["composition"]:
        out.append(
            _claim(
                f"composition IoU rises with the steps ({row['block']})",
                row["iou_last"] > row["iou_first"],
                f"{row['iou_first']:.3f} at t={row['t_first']:.2f} -> {row['iou_last']:.3f}",
            )
        )
        baseline = _nanmax(row["baseline_mean_iou"], row["baseline_centre_iou"])
        out.append(
            _claim(
                f"composition at t=1 beats both baselines that ignore the model ({row['block']})",
                row["iou_first"] > baseline,
                f"{row['iou_first']:.3f} vs {baseline:.3f}",
            )
        )
    out.append(
        _stage_claim(
            "spatial edits succeed more often early than in the middle or final stage",
            results["spatial"],
            "early",
        )
    )
    out.append(
        _stage_claim(
            "global style edits change the background style most in the middle stage",
            results["global"],
            "middle",
        )
    )
    return out


def _stage_claim(text: str, summary: Rows, best: str) -> dict:
    """Whether `best` has the highest success rate of the stages; untested (None) when the
    edits of some stage mostly had no effect, since their "successes" say nothing."""
    rates = {r["stage"]: r["success_rate"] for r in summary}
    idle = [r["stage"] for r in summary if r["no_effect_share"] > 0.5]
    numbers = _rates(rates)
    if idle:
        numbers += f"; most edits changed nothing (mean pixel change < 1/255) in: {', '.join(idle)}"
    return _claim(text, None if idle else _stage_highest(rates, best), numbers)


def _claim(text: str, holds: bool | None, numbers: str) -> dict:
    return {"claim": text, "holds": None if holds is None else bool(holds), "numbers": numbers}


def _stage_highest(rates: Mapping[str, float], stage: str) -> bool | None:
    if stage not in rates or len(rates) < 2:
        return None
    return all(rates[stage] > v for k, v in rates.items() if k != stage)


def _rates(rates: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in rates.items()) or "no concept has those labels"


def report(results: dict) -> str:
    """A markdown report of the check, beside the paper's numbers."""
    c, truth = results["captions"], results["captions_true_renders"]
    lines = [
        "## Caption following (held-out captions)",
        "",
        f"- objects found with the right colour and shape: {c['object_rate']:.1%} "
        f"of {c['objects']} named objects in {c['images']} images (on the captions' true "
        f"renders the same check finds {truth['object_rate']:.1%})",
        *(
            f"- in scenes of {n} object{'s' if int(n) > 1 else ''}: {rate:.1%} of objects found "
            f"({c['images_by_count'][n]} images; true renders "
            f"{truth['object_rate_by_count'][n]:.1%})"
            for n, rate in c["object_rate_by_count"].items()
        ),
        f"- colour found: {c['colour_rate']:.1%}; images with a colour the caption does not "
        f"name: {c['spurious_colour_rate']:.1%}; background style right: {c['style_rate']:.1%}",
        "",
        "## Composition from SAE features (mean IoU with the final image's object masks)",
        "",
        "The paper's concept map: each position's most active concept (none where it has no "
        "label).",
        "",
        "| block | IoU at t=1 | IoU at the last step | mean-mask baseline | centred box |",
        "|---|---|---|---|---|",
    ]
    for r in results["composition"]:
        lines.append(
            f"| `{r['block']}` | {r['iou_first']:.3f} | {r['iou_last']:.3f} | "
            f"{r['baseline_mean_iou']:.3f} | {r['baseline_centre_iou']:.3f} |"
        )
    lines += [f"\nPaper (SD v1.4): mid_block ~{PAPER_COMPOSITION_MID_T1} at t = 1.0.", ""]
    lines += [
        "## Edits by stage",
        "",
        "Success rate (paper in brackets), strength, mean absolute pixel change (of 1), LPIPS "
        "where it loads, and the share of edits with no effect (a change below 1/255).",
        "",
        "| stage | spatial | global style |",
        "|---|---|---|",
    ]
    spatial = {r["stage"]: r for r in results["spatial"]}
    style = {r["stage"]: r for r in results["global"]}
    strengths = results.get("strengths", {})
    for stage in PAPER_SPATIAL:
        lines.append(
            f"| {stage} | {_edits(spatial, stage, PAPER_SPATIAL[stage], strengths, 'spatial')} | "
            f"{_edits(style, stage, PAPER_GLOBAL[stage]['success'], strengths, 'global')} |"
        )
    lines += ["", "## Claims", ""]
    for claim in results["claims"]:
        verdict = {True: "holds", False: "does not hold", None: "not tested"}[claim["holds"]]
        lines.append(f"- {claim['claim']}: **{verdict}** ({claim['numbers']})")
    return "\n".join(lines) + "\n"


def _edits(
    summary: Mapping[str, dict], stage: str, paper: float, strengths: Mapping, kind: str
) -> str:
    if stage not in summary:
        return f"n/a ({paper:.2f})"
    row, strength = summary[stage], strengths.get(kind, {}).get(stage, "paper's")
    lpips = "" if math.isnan(row["mean_lpips"]) else f", LPIPS {row['mean_lpips']:.3f}"
    return (
        f"{row['success_rate']:.2f} ({paper:.2f}), strength {strength}, change "
        f"{row['mean_pixel_diff']:.4f}{lpips}, no effect {row['no_effect_share']:.0%}"
    )
