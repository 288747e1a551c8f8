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
`top_examples` can be computed later without generating again.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.annotate.grounded_sam import (
    DINO_ID,
    SAM_ID,
    Annotator,
    ClipTagger,
    GroundedSamAnnotator,
    PromptNounTagger,
    UnionTagger,
)
from core.annotate.tags import CLIP_ID
from core.diffusion.hooks import BRANCHES
from core.diffusion.presets import PRESETS, get_preset, load_pipeline
from core.emergence.concepts import (
    ConceptDictionary,
    cohesion,
    save_dictionaries,
    separability,
)
from core.emergence.gathering import gather, save_examples, select_keys
from core.emergence.words import BUNDLED_GLOVE, WordVectors, load_word_vectors
from core.runtime import one_line_errors
from core.sae.model import SAEBank, SAEKey
from core.shapes.annotate import ToyAnnotator
from core.training.activations import read_prompts

ANNOTATORS = ("grounded-sam", "grounded-sam-image-tags", "toy")
"""`toy` labels shapes-world images from their pixels (`core.shapes.annotate`), needing no model."""


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
        lines.append(f"{key.describe():50s} {count:8d} {values[0]} {values[1]}")
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
