"""Word vectors against the pipeline's own text encoder as concept embeddings:
`python -m core.emergence.compare_embeddings`.

    python -m core.emergence.compare_embeddings --saes assets/tiny/saes --preset tiny \
        --prompts assets/prompts/tiny.txt --annotator toy --iou-threshold 0.2 \
        --dictionary-prompts 128 --out runs/embeddings

The emergence paper embeds each concept as the mean word vector of its labels and notes
that such vectors "have limited expressive capacity". Here the same evidence (one pass of
generation and annotation over `--prompts`) builds one dictionary per embedding source;
each is scored by cohesion and separability per SAE and by composition IoU on held-out
prompts (prompts after the first `--dictionary-prompts`). Writes `quality.csv`,
`composition.csv` and `summary.json`, and prints the side-by-side table.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from simple_parsing import field

from core.annotate.labellers import AnnotatorConfig
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import PRESETS, get_preset
from core.emergence.concept_measures import cohesion, separability
from core.emergence.concepts import ConceptDictionary
from core.emergence.dictionary_builder import IOU_THRESHOLD
from core.emergence.evaluate_composition import composition_rows
from core.emergence.gathering import gather
from core.emergence.words import BUNDLED_GLOVE, TEXT_ENCODER, WordVectors, load_word_vectors
from core.files import write_csv, write_json
from core.runtime import command
from core.sae.bank import SAEBank
from core.training.activations import read_prompts


@dataclass(kw_only=True)
class CompareConfig:
    """Settings of `python -m core.emergence.compare_embeddings`."""

    saes: str
    """SAE bank: local folder or Hub repo."""
    prompts: str
    """Text file, one prompt per line: dictionaries first, then held-out composition prompts."""
    out: str
    """Output folder."""
    preset: str = field(default="tiny", choices=sorted(PRESETS))
    """Preset: pipeline, sampling and (for the text-encoder source) its text encoder."""
    sources: tuple[str, ...] = (BUNDLED_GLOVE, TEXT_ENCODER)
    """Embedding sources; a bare "text-encoder:" means the preset's own text encoder."""
    annotation: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    """Which annotator labels the generated images."""
    dictionary_prompts: int = 40
    """Prompts the dictionaries are built from; the rest (up to `composition_prompts`) test."""
    composition_prompts: int = 10
    """Held-out prompts for composition IoU."""
    iou_threshold: float = IOU_THRESHOLD
    """IoU of activation map and object mask above which a label joins a concept (the
    paper's 0.5; `tiny`'s shipped dictionaries use 0.2: its objects are specks)."""
    gen_batch: int = 8
    """Prompts generated at once."""
    seed: int = 0
    """Prompt i uses seed + i."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""


def compare(config: CompareConfig) -> dict[str, dict]:
    """Build one dictionary set per source from the same evidence; score and write them."""
    preset = get_preset(config.preset)
    prompts = read_prompts(config.prompts)
    train, held_out = _split(prompts, config.dictionary_prompts, config.composition_prompts)
    pipe = load_pipeline(preset, device=config.device)
    bank = SAEBank.from_pretrained(config.saes, device=pipe.device)
    annotator = config.annotation.load_annotator(config.device)
    sampling = {
        "steps": preset.steps,
        "guidance_scale": preset.guidance_scale,
        "resolution": preset.resolution,
    }
    evidence = gather(
        pipe,
        bank,
        train,
        annotator,
        keys=bank.keys(),
        seed=config.seed,
        gen_batch=config.gen_batch,
        iou_threshold=config.iou_threshold,
        **sampling,
    )
    quality, composition, summary = [], [], {}
    for source in config.sources:
        name = f"{TEXT_ENCODER}{config.preset}" if source == TEXT_ENCODER else source
        vectors = load_word_vectors(name)
        dictionaries = {key: b.build(vectors) for key, b in evidence.builders.items()}
        for key, dictionary in dictionaries.items():
            quality.append(
                {
                    "source": name,
                    "sae": key.describe(),
                    "concepts": len(dictionary.evidence),
                    "cohesion": _cohesion(dictionary, vectors),
                    "separability": separability(dictionary),
                }
            )
        rows = composition_rows(
            pipe,
            bank,
            dictionaries,
            held_out,
            annotator,
            vectors,
            blocks=sorted({key.block for key in bank}),
            targets=config.annotation.labeller.world.targets,
            seed=config.seed + len(train),
            **sampling,
        )
        composition += [{"source": name, **row} for row in rows]
        summary[name] = _summary(quality, rows, name)
    out = Path(config.out)
    write_csv(out / "quality.csv", quality)
    write_csv(out / "composition.csv", composition)
    write_json(out / "summary.json", summary)
    for name, numbers in summary.items():
        print(f"{name:28s} " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()))
    return summary


def _cohesion(dictionary: ConceptDictionary, vectors: WordVectors) -> float:
    """Cohesion, or NaN where no concept has a labelled entry to measure."""
    return cohesion(dictionary, vectors) if dictionary.has_embedding.any() else float("nan")


def _split(prompts: Sequence[str], train: int, test: int) -> tuple[list[str], list[str]]:
    if len(prompts) <= train:
        raise ValueError(
            f"the prompt file holds {len(prompts)} prompts; it needs more than "
            f"--dictionary-prompts ({train}) so that some are held out"
        )
    return list(prompts[:train]), list(prompts[train : train + test])


def _summary(quality: list[dict], rows: list[dict], source: str) -> dict[str, float]:
    mine = [row for row in quality if row["source"] == source]
    first_step = [row["iou"] for row in rows if row.get("step") == 0]
    return {
        "cohesion": _mean([row["cohesion"] for row in mine]),
        "separability": _mean([row["separability"] for row in mine]),
        "composition_iou_first_step": _mean(first_step),
        "composition_iou": _mean([row["iou"] for row in rows]),
        "composition_rows_with_iou": float(np.isfinite([row["iou"] for row in rows]).sum()),
    }


def _mean(values: list[float]) -> float:
    """The mean of the defined values (an IoU of two empty masks is not); NaN if none is."""
    defined = [v for v in values if np.isfinite(v)]
    return float(np.mean(defined)) if defined else float("nan")


main = command(CompareConfig, compare, "python -m core.emergence.compare_embeddings", __doc__)

if __name__ == "__main__":
    sys.exit(main())
