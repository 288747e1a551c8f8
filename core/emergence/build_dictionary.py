"""Build concept dictionaries for an SAE bank: `python -m core.emergence.build_dictionary --help`.

For each prompt (prompt i from seed + i, as in `core.training.train`) an image is generated while
the residual updates of the SAEs' blocks are recorded at the steps nearest each SAE's t.
Each update is encoded with its SAE, the final image is annotated (tags -> Grounding DINO
-> SAM, vision only) and every (block, t, branch) gets the image's IoU evidence
(`DictionaryBuilder.add_codes`). The dictionaries are written with `save_dictionaries`,
i.e. in the SAE bank's layout (out/{block}/t{t:.2f}/{branch}/concepts.json), so the output
folder can also hold the SAEs; they are not copied: pass the SAE folder and the dictionary
folder separately to the tools that need both, or build into the SAE folder itself.

Beside each dictionary, `spatial_means.safetensors` holds every image's latents averaged
over the grid ([num_images, n]), and out/examples.json the prompts and seeds, so
`top_examples` and `context_free_concepts` can be computed later without generating again.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from core.annotate.grounded_sam import (
    CLIP_ID,
    DINO_ID,
    SAM_ID,
    Annotator,
    ClipTagger,
    GroundedSamAnnotator,
    PromptNounTagger,
    UnionTagger,
)
from core.diffusion.hooks import BRANCHES, record
from core.diffusion.presets import PRESETS, get_preset, load_pipeline
from core.emergence.composition import latent_grid
from core.emergence.concepts import (
    IOU_THRESHOLD,
    ConceptDictionary,
    DictionaryBuilder,
    cohesion,
    save_dictionaries,
    separability,
)
from core.emergence.words import BUNDLED_GLOVE, WordVectors, load_word_vectors
from core.runtime import one_line_errors
from core.sae.model import SAEBank, SAEKey, bank_subfolder
from core.shapes.annotate import ToyAnnotator
from core.training.activations import read_prompts

SPATIAL_MEANS_FILE = "spatial_means.safetensors"
EXAMPLES_FILE = "examples.json"
ANNOTATORS = ("grounded-sam", "grounded-sam-image-tags", "toy")
"""`toy` labels shapes-world images from their pixels (`core.shapes.annotate`), needing no model."""


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
            f"(None = any); it has: {', '.join(_describe(k) for k in bank)}"
        )
    untimed = [_describe(k) for k in keys if k.t is None]
    if untimed:
        raise ValueError(
            f"the SAEs {untimed} were trained on all t; dictionaries need SAEs trained at one t"
        )
    return keys


def _describe(key: SAEKey) -> str:
    return f"{key.block} (t={key.t}, {key.branch})"


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
) -> Gathered:
    """Generate, record, encode and annotate every prompt; return the evidence collected.

    A label joins a concept's entry where IoU(activation map, object mask) > `iou_threshold`
    (the paper's 0.5 by default).
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
    targets = sorted({k.t for k in keys})
    starts = range(0, len(prompts), gen_batch)
    for start in tqdm(starts, desc="batches", unit="batch"):
        indices = list(range(start, min(start + gen_batch, len(prompts))))
        batch = [prompts[i] for i in indices]
        generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in indices]
        with record(pipe, blocks, at_t=targets) as recording:
            images = pipe(
                batch,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                height=resolution,
                width=resolution,
                output_type="pil",
            ).images
        annotations = [
            annotator.annotate(image, prompt) for image, prompt in zip(images, batch, strict=True)
        ]
        objects = [[(a.label, a.mask) for a in image_objects] for image_objects in annotations]
        gathered.num_objects += sum(len(o) for o in objects)
        for key in keys:
            sae = bank[key]
            grid = latent_grid(sae, recording.at(key.block, key.t, key.branch).delta)
            gathered.spatial_means.setdefault(key, []).append(
                grid.spatial_means(sae.cfg.num_latents).cpu()
            )
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
        raise FileNotFoundError(f"no {SPATIAL_MEANS_FILE} for {_describe(key)} at {path}")
    return load_file(path)["spatial_means"]


def quality_lines(
    dictionaries: dict[SAEKey, ConceptDictionary], word_vectors: WordVectors
) -> list[str]:
    """A table of cohesion and separability per SAE ("n/a" where undefined)."""
    lines = [f"{'SAE':50s} {'concepts':>8s} {'cohesion':>9s} {'separab.':>9s}"]
    for key, dictionary in dictionaries.items():
        values = []
        for metric in (lambda d: cohesion(d, word_vectors), separability):
            try:
                values.append(f"{metric(dictionary):9.3f}")
            except ValueError:
                values.append(f"{'n/a':>9s}")
        count = int(dictionary.has_embedding.sum())
        lines.append(f"{_describe(key):50s} {count:8d} {values[0]} {values[1]}")
    lines.append(
        "paper (SD v1.4, cond): cohesion 0.588/0.639/0.664, separability 0.433/0.363/0.344"
    )
    lines.append("                       at t = 1.0/0.5/0.0 (Word2Vec; GloVe runs higher)")
    return lines


def make_annotator(name: str, args: argparse.Namespace) -> Annotator:
    """The named annotator with the given (or core.annotate.grounded_sam's default) model ids."""
    if name not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; choose one of {', '.join(ANNOTATORS)}")
    if name == "toy":
        return ToyAnnotator(with_background=True)
    clip = ClipTagger(args.clip_model or CLIP_ID, device=args.device)
    tagger = clip if name == "grounded-sam-image-tags" else UnionTagger(PromptNounTagger(), clip)
    dino, sam = args.dino_model or DINO_ID, args.sam_model or SAM_ID
    return GroundedSamAnnotator(tagger, dino, sam, device=args.device)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m core.emergence.build_dictionary",
        description="Label SAE latents with object names from annotated generated images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="sd14", choices=sorted(PRESETS))
    p.add_argument("--model", help="pipeline Hub id or local folder (default: the preset's)")
    p.add_argument("--saes", required=True, help="SAE bank: local folder or Hub repo")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output folder (bank layout)")
    p.add_argument("--blocks", nargs="+", help="blocks (default: every block of the bank)")
    p.add_argument("--branches", nargs="+", default=["cond"], choices=BRANCHES)
    p.add_argument("--t", nargs="+", type=float, help="SAE times to use (default: all)")
    p.add_argument(
        "--annotator",
        default="grounded-sam",
        choices=ANNOTATORS,
        help="grounded-sam tags with CLIP and the prompt's nouns; -image-tags with CLIP only",
    )
    p.add_argument(
        "--clip-model", help="CLIP tagger id or folder (default: core.annotate.grounded_sam's)"
    )
    p.add_argument("--dino-model", help="Grounding DINO id or folder")
    p.add_argument("--sam-model", help="SAM id or folder")
    p.add_argument(
        "--word-vectors",
        default=BUNDLED_GLOVE,
        help="word vectors (the paper: word2vec-google-news-300, a 1.6 GB download)",
    )
    p.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    p.add_argument("--gen-batch", type=int, default=4, help="prompts generated at once")
    p.add_argument("--limit", type=int, help="use at most this many prompts")
    p.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the preset's)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[SAEKey, ConceptDictionary]:
    prompts = read_prompts(args.prompts)[: args.limit]
    preset = get_preset(args.preset, **({"model": args.model} if args.model else {}))
    bank = SAEBank.from_pretrained(args.saes, args.blocks, args.branches, device="cpu")
    keys = select_keys(bank, args.blocks, args.branches, args.t)
    word_vectors = load_word_vectors(args.word_vectors)
    pipe = load_pipeline(preset, device=args.device)
    bank = SAEBank(bank[k].to(pipe.device) for k in keys)
    annotator = make_annotator(args.annotator, args)
    steps = args.steps or preset.steps
    guidance = preset.guidance_scale if args.guidance is None else args.guidance
    gathered = gather(
        pipe,
        bank,
        prompts,
        annotator,
        keys=keys,
        seed=args.seed,
        gen_batch=args.gen_batch,
        steps=steps,
        guidance_scale=guidance,
        resolution=preset.resolution,
    )
    dictionaries = {key: b.build(word_vectors) for key, b in gathered.builders.items()}
    out = Path(args.out)
    save_dictionaries(dictionaries.values(), out)
    info = {
        "model": preset.model,
        "steps": steps,
        "guidance_scale": guidance,
        "annotator": args.annotator,
        "word_vectors": args.word_vectors,
    }
    save_examples(out, gathered, prompts, args.seed, info)
    print("\n".join(quality_lines(dictionaries, word_vectors)))
    print(f"{len(prompts)} images, {gathered.num_objects} annotated objects")
    print(f"saved {len(dictionaries)} dictionaries to {out}")
    return dictionaries


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        run(args)
        return 0

    return one_line_errors(work)


if __name__ == "__main__":
    sys.exit(main())
