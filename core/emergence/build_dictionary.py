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
`top_examples` can be computed later without generating again.
"""

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from simple_parsing import field

from core.annotate.annotation import Annotator
from core.annotate.grounded_sam import DINO_ID, SAM_ID, GroundedSamAnnotator
from core.annotate.tags import (
    CLIP_ID,
    OBJECT_VOCABULARY,
    TAGS,
    VOCABULARY_FILE,
    load_vocabulary,
    make_tagger,
)
from core.diffusion.hooks import BRANCHES
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import PRESETS, Preset, get_preset
from core.emergence.concepts import (
    IOU_THRESHOLD,
    ConceptDictionary,
    cohesion,
    save_dictionaries,
    separability,
)
from core.emergence.gathering import gather, save_examples, select_keys
from core.emergence.words import BUNDLED_GLOVE, WordVectors, load_word_vectors
from core.files import REPO_ROOT
from core.runtime import command
from core.sae.bank import SAEBank, SAEKey
from core.shapes.annotate import ToyAnnotator
from core.training.activations import read_prompts

ANNOTATORS = ("grounded-sam", "toy")
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


@dataclass(kw_only=True)
class AnnotatorConfig:
    """The annotator that labels generated images, and its models."""

    annotator: str | None = field(default=None, choices=ANNOTATORS)
    """grounded-sam: tags -> Grounding DINO -> SAM; toy reads shapes-world pixels (default:
    the preset's, toy for tiny and toy, else grounded-sam)."""
    tags: str = field(default="vision", choices=TAGS)
    """grounded-sam's tags: vision (zero-shot CLIP over the vocabulary, no prompt words, as
    the paper's RAM), prompt (the prompt's nouns) or prompt+vision."""
    vocabulary: str | None = None
    """Tag vocabulary, a text file with one object name a line (default:
    core/annotate/vocabulary.txt, COCO's 80 classes and 73 common things)."""
    clip_model: str = CLIP_ID
    """CLIP id or folder: the tagger (and, in evaluate, the scorer of global edits)."""
    dino_model: str = DINO_ID
    """Grounding DINO id or folder."""
    sam_model: str = SAM_ID
    """SAM id or folder."""

    def __post_init__(self) -> None:
        if self.annotator not in (None, *ANNOTATORS):
            raise ValueError(
                f"unknown annotator {self.annotator!r}; choose one of {', '.join(ANNOTATORS)}"
            )
        if self.tags not in TAGS:
            raise ValueError(f"unknown tags {self.tags!r}; choose one of {', '.join(TAGS)}")

    def for_preset(self, preset: Preset) -> "AnnotatorConfig":
        """This config, with the preset's annotator where it names none."""
        return replace(self, annotator=self.annotator or preset.annotator)

    def record(self) -> dict[str, str]:
        """What labelled the images, for the files written beside the results."""
        if self.annotator == "toy":
            return {"annotator": self.annotator}
        vocabulary = self.vocabulary or str(VOCABULARY_FILE.resolve().relative_to(REPO_ROOT))
        return {"annotator": self.annotator, "tags": self.tags, "vocabulary": vocabulary}

    def describe(self) -> str:
        """`record()` as one line: "annotator grounded-sam, tags vision, vocabulary ..."."""
        return ", ".join(f"{what} {value}" for what, value in self.record().items())


def make_annotator(config: AnnotatorConfig, device: str | None) -> Annotator:
    """The annotator `config` names, on `device`."""
    if config.annotator == "toy":
        return ToyAnnotator(with_background=True)
    vocabulary = load_vocabulary(config.vocabulary) if config.vocabulary else OBJECT_VOCABULARY
    tagger = make_tagger(config.tags, config.clip_model, vocabulary, device=device)
    return GroundedSamAnnotator(tagger, config.dino_model, config.sam_model, device=device)


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


def build(config: DictionaryConfig) -> dict[SAEKey, ConceptDictionary]:
    """Build, save and return the dictionaries `config` asks for, printing their quality."""
    prompts = read_prompts(config.prompts)[: config.limit]
    preset = get_preset(config.preset, **({"model": config.model} if config.model else {}))
    bank = SAEBank.from_pretrained(config.saes, config.blocks, config.branches, device="cpu")
    keys = select_keys(bank, config.blocks, config.branches, config.t)
    word_vectors = load_word_vectors(config.word_vectors)
    pipe = load_pipeline(preset, device=config.device)
    bank = SAEBank(bank[k].to(pipe.device) for k in keys)
    annotation = config.annotation.for_preset(preset)
    annotator = make_annotator(annotation, config.device)
    steps = config.steps or preset.steps
    guidance = preset.guidance_scale if config.guidance is None else config.guidance
    gathered = gather(
        pipe,
        bank,
        prompts,
        annotator,
        keys=keys,
        seed=config.seed,
        gen_batch=config.gen_batch,
        steps=steps,
        guidance_scale=guidance,
        resolution=preset.resolution,
        iou_threshold=config.iou_threshold,
    )
    dictionaries = {key: b.build(word_vectors) for key, b in gathered.builders.items()}
    out = Path(config.out)
    save_dictionaries(dictionaries.values(), out)
    info = {
        "model": preset.model,
        "steps": steps,
        "guidance_scale": guidance,
        **annotation.record(),
        "word_vectors": config.word_vectors,
    }
    save_examples(out, gathered, prompts, config.seed, info)
    print("\n".join(quality_lines(dictionaries, word_vectors)))
    labeller = annotation.describe()
    print(f"{len(prompts)} images, {gathered.num_objects} annotated objects ({labeller})")
    print(f"saved {len(dictionaries)} dictionaries to {out}")
    return dictionaries


main = command(DictionaryConfig, build, "python -m core.emergence.build_dictionary", __doc__)


if __name__ == "__main__":
    sys.exit(main())
