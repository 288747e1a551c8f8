"""Build concept dictionaries for an SAE bank: `python -m core.emergence.build_dictionary --help`.

For each prompt (prompt i from seed + i, as in `core.training.train`) an image is generated while
the residual updates of the SAEs' blocks are recorded at the steps nearest each SAE's t.
Each update is encoded with its SAE, the final image is annotated (tags -> Grounding DINO
-> SAM; by default the tags are zero-shot CLIP's over a fixed vocabulary, vision only, as
the paper's RAM tags) and every (block, t, branch) gets the image's IoU evidence
(`DictionaryBuilder.add_codes`); a time-shared SAE (t None) gathers it at the steps nearest t =
1.0, 0.5 and 0.0. The dictionaries are written with `save_dictionaries`,
i.e. in the SAE bank's layout (out/{block}/t{t:.2f}/{branch}/concepts.json), so the output
folder can also hold the SAEs; they are not copied: pass the SAE folder and the dictionary
folder separately to the tools that need both, or build into the SAE folder itself.

Beside each dictionary, `spatial_means.safetensors` holds every image's latents averaged
over the grid ([num_images, n]), and out/examples.json the prompts and seeds, so
`top_examples` can be computed later without generating again; out/README.md is a card
saying what they were built from (`core.emergence.parts.dictionary_card`).

The prompts are built in parts of `--part-size`, each kept in out/parts/ when done: a build
interrupted and run again with the same settings goes on from the parts it finds (other
settings are refused, not mixed in). `--push-to-hub REPO` then uploads the folder.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from simple_parsing import field
from tqdm.auto import tqdm

from core.annotate.labellers import AnnotatorConfig
from core.diffusion.hooks import BRANCHES
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import PRESETS, get_preset
from core.emergence.concept_measures import cohesion, separability
from core.emergence.concepts import ConceptDictionary
from core.emergence.dictionary_builder import IOU_THRESHOLD
from core.emergence.gathering import select_keys
from core.emergence.parts import PARTS_DIR, PartedBuild, Plan
from core.emergence.words import BUNDLED_GLOVE, WordVectors, load_word_vectors
from core.runtime import command
from core.sae.bank import SAEBank, SAEKey
from core.training.activations import read_prompts


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


@dataclass(kw_only=True)
class DictionaryConfig:
    """Settings of `python -m core.emergence.build_dictionary`."""

    saes: str
    """SAE bank: local folder or Hub repo."""
    prompts: str
    """Text file, one prompt per line."""
    out: str
    """Output folder (bank layout)."""
    preset: str = field(default="sd14", choices=sorted(PRESETS))
    """Preset: pipeline and sampling."""
    model: str | None = None
    """Pipeline Hub id or local folder (default: the preset's)."""
    blocks: tuple[str, ...] | None = None
    """Blocks (default: every block of the bank)."""
    branches: tuple[str, ...] = field(default=("cond",), choices=BRANCHES, nargs="*")
    """CFG branches whose SAEs get dictionaries."""
    t: tuple[float, ...] | None = None
    """SAE times to use (default: all)."""
    annotation: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    """Which annotator labels the generated images, and its models."""
    iou_threshold: float = IOU_THRESHOLD
    """A label joins a concept where IoU(activation map, object mask) exceeds this (the
    paper's 0.5; small objects on coarse grids, as the tiny preset's, need less)."""
    word_vectors: str = BUNDLED_GLOVE
    """Word vectors (the paper: word2vec-google-news-300, a 1.6 GB download)."""
    seed: int = 0
    """Prompt i uses seed + i (as in `core.training.train`)."""
    gen_batch: int = 4
    """Prompts generated at once."""
    limit: int | None = None
    """Use at most this many prompts."""
    steps: int | None = None
    """Denoising steps (default: the preset's)."""
    guidance: float | None = None
    """CFG scale (default: the preset's)."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""
    part_size: int = 16
    """Prompts per part: each part is kept in out/parts/ as it is done, and a build run again
    with the same settings goes on from the parts it finds."""
    push_to_hub: str | None = field(default=None, metavar="REPO")
    """Also upload the dictionaries, their example index and card to this Hub model repo
    (created if needed), so that the app can load them beside the SAEs."""


def push_dictionaries(folder: Path, repo_id: str) -> str:
    """Upload a folder of built dictionaries to `repo_id`; returns the commit's URL."""
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            ignore_patterns=[f"{PARTS_DIR}/*"],
            commit_message="Concept dictionaries built with core.emergence.build_dictionary",
        )
    except (huggingface_hub.errors.HfHubHTTPError, OSError, ValueError) as error:
        raise ValueError(
            f"could not push to the Hub repo {repo_id!r} ({error}); the dictionaries are kept "
            f"in {folder}: log in (`hf auth login`) or name a repo you can write, then upload "
            f"that folder (`hf upload {repo_id} {folder}`)"
        ) from error
    return str(commit.commit_url)


def build(config: DictionaryConfig) -> dict[SAEKey, ConceptDictionary]:
    """Build, save and return the dictionaries `config` asks for, printing their quality;
    resumes from the parts an interrupted build of the same settings left in out/parts/."""
    prompts = read_prompts(config.prompts)[: config.limit]
    if not prompts:
        raise ValueError(f"{config.prompts} holds no prompts to build dictionaries from")
    preset = get_preset(config.preset, **({"model": config.model} if config.model else {}))
    bank = SAEBank.from_pretrained(config.saes, config.blocks, config.branches, device="cpu")
    keys = select_keys(bank, config.blocks, config.branches, config.t)
    word_vectors = load_word_vectors(config.word_vectors)
    annotation = config.annotation.for_preset(preset)
    plan = Plan(
        model=preset.model,
        saes=config.saes,
        keys=tuple(key.describe() for key in keys),
        prompts=tuple(prompts),
        seed=config.seed,
        steps=config.steps or preset.steps,
        guidance_scale=preset.guidance_scale if config.guidance is None else config.guidance,
        resolution=preset.resolution,
        iou_threshold=config.iou_threshold,
        labeller=annotation.record(),
        part_size=config.part_size,
    )
    pipe = load_pipeline(preset, device=config.device)
    bank = SAEBank(bank[k].to(pipe.device) for k in keys)
    parts = PartedBuild(Path(config.out), plan, bank, keys)
    remaining = parts.remaining()
    if len(remaining) < plan.num_parts:
        print(f"resuming: {plan.num_parts - len(remaining)} of {plan.num_parts} parts done")
    annotator = annotation.load_annotator(config.device) if remaining else None
    for index in tqdm(remaining, desc="parts", unit="part"):
        parts.build(
            index,
            pipe,
            annotator,
            labelled_by=plan.labeller["annotator"],
            gen_batch=config.gen_batch,
        )
    info = {
        "model": preset.model,
        "steps": plan.steps,
        "guidance_scale": plan.guidance_scale,
        **plan.labeller,
        "word_vectors": config.word_vectors,
    }
    gathered = parts.merged()
    dictionaries = parts.finish(gathered, word_vectors, info)
    print("\n".join(quality_lines(dictionaries, word_vectors)))
    labeller = annotation.describe()
    print(f"{len(prompts)} images, {gathered.num_objects} annotated objects ({labeller})")
    print(f"saved {len(dictionaries)} dictionaries and their card to {config.out}")
    if config.push_to_hub:
        url = push_dictionaries(Path(config.out), config.push_to_hub)
        print(f"pushed to {url}")
    return dictionaries


main = command(DictionaryConfig, build, "python -m core.emergence.build_dictionary", __doc__)


if __name__ == "__main__":
    sys.exit(main())
