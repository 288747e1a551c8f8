"""One time-shared SAE against per-time SAEs, measured on the same held-out generations.

The emergence paper trains one SAE per (block, t, branch) and names as a limit that per-time
SAEs "preclude direct cross-timestep concept comparison": latent 12 of the t = 1.0 SAE and
latent 12 of the t = 0.0 SAE share only an index. A time-shared SAE (`python -m
core.training.train --shared-t 0 1`) has one set of concept vectors for every t. What that
costs is measured here per block and evaluation t, against per-time SAEs with the same latent
count. Each kind picks its SAE as `SAEBank.get` does: per-time, the one trained nearest the
step's t; time-shared, its one SAE.

- explained variance: 1 - squared error / squared deviation from the mean, each summed over
  every held-out row of the step nearest t (all images pooled);
- dead fraction: the share of latents that fire on no held-out row of that step;
- composition IoU (needs concept dictionaries for both kinds): the mean IoU at the step
  nearest t, as `evaluate_composition.composition_rows` scores it;
- spatial-edit success per stage (needs dictionaries): `evaluate_edits.spatial_edit_rows`, on the
  objects that both kinds' dictionaries label.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from core.annotate.annotation import Annotator
from core.annotate.clipseg import ClipSegSegmenter
from core.annotate.shapes import ToySegmenter
from core.diffusion.hooks import record
from core.diffusion.presets import STAGES
from core.diffusion.sampling import generate_images
from core.emergence.composition import DEFAULT_THRESHOLD
from core.emergence.concepts import ConceptDictionary
from core.emergence.evaluate_composition import composition_rows
from core.emergence.evaluate_edits import object_cids, spatial_edit_rows
from core.emergence.results import Rows, mean_by
from core.emergence.words import WordVectors
from core.quadrants import QUADRANTS
from core.sae.bank import SAEBank, SAEKey
from core.sae.config import SITES
from core.sae.model import TopKSAE
from core.training.activations import to_rows

KINDS = ("per_time", "shared")
Banks = Mapping[str, SAEBank]
"""Kind ("per_time" or "shared") -> its bank."""
Dictionaries = Mapping[str, Mapping[SAEKey, ConceptDictionary]]
"""Kind -> the concept dictionaries of its bank."""


def check_banks(banks: Banks, blocks: Sequence[str], branch: str) -> None:
    """Refuse, in one sentence, banks that cannot be compared on `blocks`: the per-time bank
    needs SAEs trained at one t, the shared bank a time-shared SAE, all with one latent count
    and reading one activation site."""
    per_time, shared = banks["per_time"], banks["shared"]
    for block in blocks:
        timed = [k for k in per_time if (k.block, k.branch) == (block, branch) and k.t is not None]
        if not timed:
            raise ValueError(f"the per-time bank has no SAE of {block} ({branch}) at one t")
        key = SAEKey(block, None, branch)
        if key not in shared:
            raise ValueError(
                f"the shared bank has no time-shared SAE of {block} ({branch}); train one with "
                "python -m core.training.train --shared-t 0 1"
            )
        counts = sorted(
            {per_time[k].cfg.num_latents for k in timed} | {shared[key].cfg.num_latents}
        )
        if len(counts) > 1:
            raise ValueError(
                f"the SAEs of {block} have {' and '.join(map(str, counts))} latents; compare SAEs "
                "with one latent count (train both with the same --num-latents)"
            )
        if per_time.site(block) != shared.site(block):
            raise ValueError(
                f"the per-time SAEs of {block} read the {SITES[per_time.site(block)]} but the "
                f"shared one reads the {SITES[shared.site(block)]}; compare SAEs of one site"
            )


@dataclass
class Reconstruction:
    """Running sums over the rows one kind's SAEs encode at one block and t."""

    num_latents: int
    rows: int = 0
    squared_error: float = 0.0
    squared_norm: float = 0.0
    total: Tensor | None = None
    """Sum of the rows (float64), for the variance around their mean."""
    fired: Tensor | None = None
    """[num_latents] bool: latents active on some row."""

    @torch.no_grad()
    def add(self, sae: TopKSAE, x: Tensor) -> None:
        x = x.to(sae.b_dec.device, sae.b_dec.dtype)
        acts, indices, _ = sae.encode(x)
        x_hat = sae.decode(acts, indices)
        self.squared_error += float((x - x_hat).double().pow(2).sum())
        self.squared_norm += float(x.double().pow(2).sum())
        total = x.double().sum(dim=0).cpu()
        self.total = total if self.total is None else self.total + total
        fired = torch.zeros(self.num_latents, dtype=torch.bool)
        fired[indices[acts > 0].cpu()] = True
        self.fired = fired if self.fired is None else self.fired | fired
        self.rows += len(x)

    def explained_variance(self) -> float:
        """1 - squared error / squared deviation from the rows' mean (NaN without variance)."""
        variance = self.squared_norm - float(self.total.pow(2).sum()) / self.rows
        return 1.0 - self.squared_error / variance if variance > 0 else math.nan

    def dead_fraction(self) -> float:
        return 1.0 - float(self.fired.float().mean())


def reconstruction_rows(
    pipe,
    banks: Banks,
    prompts: Sequence[str],
    *,
    blocks: Sequence[str],
    branch: str = "cond",
    ts: Sequence[float] = (1.0, 0.5, 0.0),
    seed: int = 0,
    gen_batch: int = 4,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> Rows:
    """One row per (kind, block, t): explained variance and dead fraction over the rows of
    the step nearest t of every prompt (prompt i from seed + i), with the SAE each kind used."""
    check_banks(banks, blocks, branch)
    scores: dict[tuple[str, str, float], Reconstruction] = {}
    chosen: dict[tuple[str, str, float], tuple[float, SAEKey]] = {}
    """(kind, block, t) -> the t of the step nearest t, and the SAE the kind uses there."""
    sites = banks["per_time"].sites(blocks)
    for start in tqdm(range(0, len(prompts), gen_batch), desc="reconstruction"):
        indices = range(start, min(start + gen_batch, len(prompts)))
        with record(pipe, blocks, at_t=ts, device=None, site=sites) as recording:
            generate_images(
                pipe,
                [prompts[i] for i in indices],
                [seed + i for i in indices],
                steps=steps,
                guidance_scale=guidance_scale,
                resolution=resolution,
                output_type="latent",
            )
        for block in blocks:
            for t in ts:
                step = recording.at(block, t, branch)
                rows = to_rows(step.delta)
                for kind, bank in banks.items():
                    if (kind, block, t) not in chosen:
                        key = bank.nearest_key(block, step.step.t, branch)
                        chosen[kind, block, t] = (step.step.t, key)
                        scores[kind, block, t] = Reconstruction(bank[key].cfg.num_latents)
                    scores[kind, block, t].add(bank[chosen[kind, block, t][1]], rows)
    return [
        {
            "kind": kind,
            "block": block,
            "branch": branch,
            "t": t,
            "step_t": round(step_t, 4),
            "sae_t": "all" if key.t is None else key.t,
            "rows": scores[kind, block, t].rows,
            "explained_variance": scores[kind, block, t].explained_variance(),
            "dead_fraction": scores[kind, block, t].dead_fraction(),
        }
        for (kind, block, t), (step_t, key) in chosen.items()
    ]


def composition_iou_rows(
    pipe,
    banks: Banks,
    dictionaries: Dictionaries,
    prompts: Sequence[str],
    annotator: Annotator,
    word_vectors: WordVectors,
    *,
    blocks: Sequence[str],
    branch: str = "cond",
    targets: str | Sequence[str] = "nouns",
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> Rows:
    """`evaluate_composition.composition_rows` of each kind on the same prompts and seeds (so
    the same images and annotations), each row with its `kind`. A word is scored only where
    both dictionaries label it (`composition_rows` skips words a dictionary lacks), so both
    kinds' means are over the same (image, word) pairs."""
    rows = []
    for kind, bank in banks.items():
        scored = composition_rows(
            pipe,
            bank,
            dictionaries[kind],
            prompts,
            annotator,
            word_vectors,
            blocks=blocks,
            branch=branch,
            targets=targets,
            threshold=threshold,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            resolution=resolution,
        )
        rows += [{"kind": kind, **row} for row in scored]
    pairs = [{(r["image"], r["word"]) for r in rows if r["kind"] == kind} for kind in banks]
    both = set.intersection(*pairs)
    return [row for row in rows if (row["image"], row["word"]) in both]


def common_objects(
    dictionaries: Dictionaries, objects: Sequence[str], block: str, branch: str = "cond"
) -> list[str]:
    """The objects that label a concept of `block` in every kind's dictionaries, so that the
    spatial edits of both kinds move the same objects."""
    found = [object_cids(d, objects, block, branch)[0] for d in dictionaries.values()]
    common = [o for o in objects if all(o in cids for cids in found)]
    if not common:
        raise ValueError(
            f"no object of {list(objects)} labels a concept of {block} ({branch}) in both "
            "banks' dictionaries; pick objects that both label"
        )
    return common


def spatial_rows(
    pipe,
    banks: Banks,
    dictionaries: Dictionaries,
    objects: Sequence[str],
    segmenter: ClipSegSegmenter | ToySegmenter,
    *,
    block: str,
    branch: str = "cond",
    stages: Sequence[str] = tuple(STAGES),
    quadrants: Sequence[str] = QUADRANTS,
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> Rows:
    """`evaluate_edits.spatial_edit_rows` of each kind on the objects both label (object j from seed
    + j), with the paper's strengths and the stage's SAE; each row with its kind and block."""
    common = common_objects(dictionaries, objects, block, branch)
    rows = []
    for kind, bank in banks.items():
        edits = spatial_edit_rows(
            pipe,
            bank,
            dictionaries[kind],
            common,
            segmenter,
            block=block,
            branch=branch,
            stages=stages,
            quadrants=quadrants,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            resolution=resolution,
        )
        rows += [{"kind": kind, "block": block, **row} for row in edits]
    return rows


def comparison_rows(
    reconstruction: Rows, composition: Rows, spatial: Rows, ts: Sequence[float]
) -> Rows:
    """One row per (measure, block, t or stage) with both kinds' values side by side.

    Composition IoU is taken at the recorded step nearest each t; a measure with no rows
    (its task not run) has none.
    """
    rows = []
    for measure in ("explained_variance", "dead_fraction"):
        values = mean_by(reconstruction, ("kind", "block", "t"), measure)
        blocks = dict.fromkeys(row["block"] for row in reconstruction)
        rows += [
            _pair(measure, block, f"t={t:g}", values, (block, t)) for block in blocks for t in ts
        ]
    iou = mean_by(composition, ("kind", "block", "t"), "iou")
    for block in dict.fromkeys(row["block"] for row in composition):
        step_ts = sorted({row["t"] for row in composition if row["block"] == block})
        for t in ts:
            nearest = min(step_ts, key=lambda step_t: abs(step_t - t))
            rows.append(_pair("composition_iou", block, f"t={t:g}", iou, (block, nearest)))
    success = mean_by(spatial, ("kind", "block", "stage"), "success")
    for block, stage in dict.fromkeys((row["block"], row["stage"]) for row in spatial):
        rows.append(_pair("spatial_success", block, stage, success, (block, stage)))
    return rows


def _pair(measure: str, block: str, at: str, values: Mapping[tuple, float], group: tuple) -> dict:
    per_time = values.get(("per_time", *group), math.nan)
    shared = values.get(("shared", *group), math.nan)
    return {
        "measure": measure,
        "block": block,
        "at": at,
        "per_time": per_time,
        "shared": shared,
        "shared_minus_per_time": shared - per_time,
    }
