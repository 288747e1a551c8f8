"""Evidence for concept dictionaries: generate, record, encode and annotate prompts, and the
per-image latent means kept beside each dictionary for its top examples."""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from core.annotate.annotation import Annotator
from core.diffusion.hooks import record
from core.diffusion.presets import STAGE_T
from core.diffusion.sampling import generate_images
from core.emergence.composition import latent_grid
from core.emergence.concepts import ConceptDictionary
from core.emergence.dictionary_builder import IOU_THRESHOLD, DictionaryBuilder
from core.emergence.words import WordVectors
from core.sae.bank import SAEBank, SAEKey, bank_subfolder

SPATIAL_MEANS_FILE = "spatial_means.safetensors"


EXAMPLES_FILE = "examples.json"


@dataclass
class Gathered:
    """What one pass over the prompts collects, before the dictionaries are built."""

    builders: dict[SAEKey, DictionaryBuilder]
    spatial_means: dict[SAEKey, list[Tensor]] = field(default_factory=dict)
    """Per key, one [batch, n] tensor per generated batch."""
    num_objects: int = 0

    def means(self, key: SAEKey) -> Tensor:
        return torch.cat(self.spatial_means[key])


def select_keys(
    bank: SAEBank,
    blocks: Sequence[str] | None = None,
    branches: Sequence[str] | None = None,
    ts: Sequence[float] | None = None,
) -> list[SAEKey]:
    """The bank's keys for `blocks` x `branches` x `ts` (None = any); every combination asked
    for must have an SAE, or the error names the missing ones and what the bank has."""
    keys = [
        k
        for k in bank
        if (not blocks or k.block in blocks)
        and (not branches or k.branch in branches)
        and (not ts or (k.t is not None and any(abs(k.t - t) < 1e-6 for t in ts)))
    ]
    missing = [
        f"{block} (t={t}, {branch})"
        for block in blocks or [None]
        for t in ts or [None]
        for branch in branches or [None]
        if not any(_matches(k, block, t, branch) for k in keys)
    ]
    if missing or not keys:
        raise ValueError(
            f"the SAE bank has no SAE for {', '.join(missing) or 'the selection'} "
            f"(None = any); it has: {', '.join(k.describe() for k in bank)}"
        )
    return keys


def _matches(key: SAEKey, block: str | None, t: float | None, branch: str | None) -> bool:
    return (
        (block is None or key.block == block)
        and (branch is None or key.branch == branch)
        and (t is None or (key.t is not None and abs(key.t - t) < 1e-6))
    )


def gather(
    pipe,
    bank: SAEBank,
    prompts: Sequence[str],
    annotator: Annotator,
    *,
    keys: Sequence[SAEKey],
    seed: int = 0,
    gen_batch: int = 4,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    iou_threshold: float = IOU_THRESHOLD,
    shared_t: Sequence[float] = tuple(STAGE_T.values()),
) -> Gathered:
    """Generate, record, encode and annotate every prompt; return the evidence collected.

    A label joins a concept's entry where IoU(activation map, object mask) > `iou_threshold`
    (the paper's 0.5 by default). An SAE trained at one t reads the step nearest it; a
    time-shared SAE (t None) pools the evidence of the steps nearest each of `shared_t` (by
    default the three t of the paper's SAEs; with fewer steps, as SDXL-Turbo's 1 to 4, a
    step nearest two of them is read once), each (image, step) counting as one image, and
    its spatial means are averaged over those steps.
    """
    if not prompts:
        raise ValueError("no prompts to build dictionaries from")
    if not keys:
        raise ValueError("no SAEs selected to build dictionaries for")
    builders = {
        k: DictionaryBuilder(k, bank[k].cfg.num_latents, iou_threshold=iou_threshold) for k in keys
    }
    gathered = Gathered(builders)
    blocks = sorted({k.block for k in keys})
    times = {k: list(shared_t) if k.t is None else [k.t] for k in keys}
    targets = sorted({t for ts in times.values() for t in ts})
    starts = range(0, len(prompts), gen_batch)
    for start in tqdm(starts, desc="batches", unit="batch"):
        indices = list(range(start, min(start + gen_batch, len(prompts))))
        batch = [prompts[i] for i in indices]
        with record(pipe, blocks, at_t=targets, site=bank.sites(blocks)) as recording:
            images = generate_images(
                pipe,
                batch,
                [seed + i for i in indices],
                steps=steps,
                guidance_scale=guidance_scale,
                resolution=resolution,
            )
        annotations = [
            annotator.annotate(image, prompt) for image, prompt in zip(images, batch, strict=True)
        ]
        objects = [[(a.label, a.mask) for a in image_objects] for image_objects in annotations]
        gathered.num_objects += sum(len(o) for o in objects)
        for key in keys:
            sae = bank[key]
            nearest = [recording.at(key.block, t, key.branch) for t in times[key]]
            records = list({id(r): r for r in nearest}.values())  # a step read once
            grids = [latent_grid(sae, r.delta, r.site) for r in records]
            means = [grid.spatial_means(sae.cfg.num_latents).cpu() for grid in grids]
            gathered.spatial_means.setdefault(key, []).append(torch.stack(means).mean(dim=0))
            for grid in grids:
                for i, image_objects in enumerate(objects):
                    gathered.builders[key].add_codes(
                        grid.top_acts[i], grid.top_indices[i], image_objects
                    )
    return gathered


def build_dictionaries(
    pipe,
    bank: SAEBank,
    prompts: Sequence[str],
    annotator: Annotator,
    word_vectors: WordVectors,
    *,
    keys: Sequence[SAEKey] | None = None,
    seed: int = 0,
    gen_batch: int = 4,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
) -> dict[SAEKey, ConceptDictionary]:
    """One concept dictionary per SAE of `keys` (default: the whole bank)."""
    gathered = gather(
        pipe,
        bank,
        prompts,
        annotator,
        keys=bank.keys() if keys is None else keys,
        seed=seed,
        gen_batch=gen_batch,
        steps=steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
    )
    return {key: b.build(word_vectors) for key, b in gathered.builders.items()}


def save_examples(
    out: Path, gathered: Gathered, prompts: Sequence[str], seed: int, info: dict
) -> None:
    """Write each key's spatial means and out/examples.json (prompts, seeds, settings)."""
    for key in gathered.builders:
        folder = out / bank_subfolder(key)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"spatial_means": gathered.means(key).contiguous()}, folder / SPATIAL_MEANS_FILE)
    examples = {
        "prompts": list(prompts),
        "seeds": [seed + i for i in range(len(prompts))],
        **info,
    }
    (out / EXAMPLES_FILE).write_text(json.dumps(examples, indent=2) + "\n")


def load_spatial_means(root: str | Path, key: SAEKey) -> Tensor:
    """[num_images, n] spatial means saved for `key` (rows follow examples.json's prompts)."""
    path = Path(root) / bank_subfolder(key) / SPATIAL_MEANS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SPATIAL_MEANS_FILE} for {key.describe()} at {path}")
    return load_file(path)["spatial_means"]
