"""Build a tiny preset's SAEs, concept dictionaries and top-example index into assets/.

    python -m scripts.build_tiny_assets                        # `tiny`, into assets/tiny/
    python -m scripts.build_tiny_assets --preset tiny-flux     # into assets/tiny-flux/

The presets are `tiny` (SD v1.4's U-Net layout) and the tiny diffusion transformers
(`tiny-pixart`, `tiny-sd3`, `tiny-flux`).

1. Trains the 9 SAEs (the preset's 3 hook points x t in {1.0, 0.5, 0.0}, `cond`) with
   `core.training.train`, on assets/prompts/tiny.txt, with the settings of the Makefile's demo run.
2. Generates one image per dictionary prompt (new seeds, so new images), annotates it with
   the shapes-world annotator (shapes and background style) and builds each SAE's concept
   dictionary, saved beside the SAE with its `spatial_means` (the top-example index) and
   examples.json, with `core.emergence.build_dictionary`'s functions and the IoU threshold
   IOU_THRESHOLD.
3. Writes build.json: the settings and a fingerprint of the tiny pipeline's weights, which
   the SAEs only make sense for (the weights are random, fixed by a seed and torch's
   initialisers; a test compares the fingerprint).

A tiny model has random weights, so its images are noise and its dictionaries sparse and
arbitrary: they exist to exercise the app and the tools offline, not to mean anything.
The U-Net's mid block has a 2x2 grid at 32 pixels: only backgrounds are large enough to
match its latents (a DiT's blocks all have the 8x8 patch grid). Takes a few minutes on a
2-core CPU and needs no network.
"""

import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from core.annotate.shapes import ToyAnnotator
from core.diffusion.pipelines import BUILT, load_pipeline
from core.diffusion.presets import ASSETS, get_preset
from core.emergence.build_dictionary import quality_lines
from core.emergence.concepts import save_dictionaries
from core.emergence.gathering import gather, save_examples
from core.emergence.words import BUNDLED_GLOVE, load_word_vectors
from core.runtime import command
from core.sae.bank import SAEBank
from core.training.activations import read_prompts
from core.training.train import RunConfig, train

PROMPTS = ASSETS / "prompts" / "tiny.txt"
TRAIN_SETTINGS = {"batch_size": 64, "buffer_size": 256, "lr": 1e-3}
"""As the Makefile's demo run: small batches, since a tiny image has few grid positions."""
DICTIONARY_PROMPTS = 128
GEN_BATCH = 8
DICTIONARY_SEED = 1000
"""Dictionary prompt i is generated from seed DICTIONARY_SEED + i, unlike in training."""
IOU_THRESHOLD = 0.2
"""The paper's 0.5 labels nothing here: the annotator's objects are specks of about 9
pixels and a grid cell of the down and up blocks covers 64."""


def saes_folder(preset: str) -> Path:
    return ASSETS / preset / "saes"


def build_file(preset: str) -> Path:
    """The build record of a tiny preset's assets."""
    return ASSETS / preset / "build.json"


def pipeline_fingerprint(pipe) -> dict[str, float]:
    """Numbers that change when a tiny pipeline's random weights or vocabulary change."""
    parts = [p for p in ("unet", "transformer", "vae", "text_encoder") if hasattr(pipe, p)]
    with torch.no_grad():
        return {
            name: round(
                sum(float(p.double().abs().sum()) for p in getattr(pipe, name).parameters()), 3
            )
            for name in parts
        } | {"vocabulary": len(pipe.tokenizer)}


def train_saes(preset: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(
            preset=preset, prompts=str(PROMPTS), out=tmp, overwrite=True, **TRAIN_SETTINGS
        )
        bank = train(config)
    if bank is None:
        raise SystemExit("training was interrupted")
    shutil.rmtree(out, ignore_errors=True)
    bank.save_pretrained(out)


def build_dictionaries(name: str, out: Path, prompts: Sequence[str]) -> dict:
    preset = get_preset(name)
    pipe = load_pipeline(preset, device="cpu")
    bank = SAEBank.from_pretrained(out)
    word_vectors = load_word_vectors(BUNDLED_GLOVE)
    settings = {"steps": preset.steps, "guidance_scale": preset.guidance_scale}
    gathered = gather(
        pipe,
        bank,
        prompts,
        ToyAnnotator(with_background=True),
        keys=bank.keys(),
        seed=DICTIONARY_SEED,
        gen_batch=GEN_BATCH,
        resolution=preset.resolution,
        iou_threshold=IOU_THRESHOLD,
        **settings,
    )
    dictionaries = {key: b.build(word_vectors) for key, b in gathered.builders.items()}
    save_dictionaries(dictionaries.values(), out)
    info = {
        "model": preset.model,
        **settings,
        "annotator": "toy",
        "word_vectors": BUNDLED_GLOVE,
        "iou_threshold": IOU_THRESHOLD,
    }
    save_examples(out, gathered, prompts, DICTIONARY_SEED, info)
    print("\n".join(quality_lines(dictionaries, word_vectors)))
    print(f"{len(prompts)} images, {gathered.num_objects} annotated objects")
    return {"fingerprint": pipeline_fingerprint(pipe), "torch": torch.__version__}


@dataclass
class TinyAssetsConfig:
    """Settings of `python -m scripts.build_tiny_assets`."""

    preset: str = "tiny"
    """Which tiny preset: tiny, tiny-pixart, tiny-sd3 or tiny-flux."""
    skip_training: bool = False
    """Reuse the saved SAEs."""


def build_assets(config: TinyAssetsConfig) -> None:
    """Train the SAEs (unless skipped), build their dictionaries and write build.json."""
    if config.preset not in BUILT:
        raise ValueError(f"{config.preset!r} is not a tiny preset; choose {', '.join(BUILT)}")
    torch.manual_seed(0)
    out = saes_folder(config.preset)
    if not config.skip_training:
        train_saes(config.preset, out)
    prompts = read_prompts(PROMPTS)[:DICTIONARY_PROMPTS]
    pipeline = build_dictionaries(config.preset, out, prompts)
    build = {
        "train_settings": TRAIN_SETTINGS,
        "dictionary_prompts": len(prompts),
        "dictionary_seed": DICTIONARY_SEED,
        "pipeline": pipeline,
    }
    build_file(config.preset).write_text(json.dumps(build, indent=2) + "\n")
    print(f"wrote {out} and {build_file(config.preset)}")


main = command(TinyAssetsConfig, build_assets, "python -m scripts.build_tiny_assets", __doc__)


if __name__ == "__main__":
    sys.exit(main())
