"""Build the app's revelio tab demo into assets/revelio-demo/: images, features, k-SAEs.

    python -m scripts.build_revelio_demo

1. Renders NUM_IMAGES one-object shapes-world scenes (`core.shapes.world.dataset`,
   max_objects=1) as PNGs into `images/<shape>/<index>.png`: the class is the shape.
2. Extracts their features with `core.revelio.features` from the `tiny` preset at TIMESTEPS:
   feature maps (`--maps`) for MAP_LAYERS, pooled features only for POOLED_ONLY_LAYERS
   (the 16x16 maps of up_ft2 would triple the folder's size).
3. Trains one small k-SAE per (layer, timestep) with `core.revelio.ksae` (KSAE_ARGS): few latents,
   so that many fire on more than 10 of the images, as the purity table needs.
4. Writes build.json: the commands and settings.

Each step is written down as the command line that repeats it; that line is parsed into the
command's config and the command's function runs it, so build.json records what ran.

The tiny model has random weights: the demo shows the views working, not findings. Takes
under a minute on a 2-core CPU and needs no network.
"""

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from core.diffusion.presets import ASSETS
from core.revelio.features import FeaturesConfig, cache_features
from core.revelio.ksae import KsaeConfig, train_ksaes
from core.runtime import one_line_errors, parse_config
from core.shapes.world import dataset

OUT = ASSETS / "revelio-demo"
IMAGES, CACHE, SAES = OUT / "images", OUT / "cache", OUT / "ksaes"
NUM_IMAGES = 120
IMAGE_SIZE = 64
"""Pixels per side of the PNGs; the extractor resizes them to the preset's 32."""
SEED = 0
TIMESTEPS = ("25", "250")
MAP_LAYERS = ("bottleneck", "up_ft0", "up_ft1")
POOLED_ONLY_LAYERS = ("up_ft2",)
KSAE_ARGS = [
    "--expansion-factor",
    "2",
    "-k",
    "16",
    "--lr",
    "1e-3",
    "--warmup-steps",
    "20",
    "--epochs",
    "300",
    "--seed",
    str(SEED),
    "--device",
    "cpu",
]


def write_images(folder: Path) -> dict[str, int]:
    """The scenes as `folder/<shape>/<index>.png`; images per shape."""
    counts: dict[str, int] = {}
    for index, scene in enumerate(dataset(NUM_IMAGES, SEED, IMAGE_SIZE, max_objects=1)):
        (shape,) = (obj.shape for obj in scene.objects)
        path = folder / shape / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(path, optimize=True)
        counts[shape] = counts.get(shape, 0) + 1
    return dict(sorted(counts.items()))


Step = tuple[type, Callable, list[str]]
"""A command's config type, its function and the argument list of the step."""


def steps() -> list[Step]:
    """Each step, in order."""
    common = ["--preset", "tiny", "--images", str(IMAGES), "--out", str(CACHE), "--timesteps"]
    common += [*TIMESTEPS, "--seed", str(SEED), "--device", "cpu"]
    return [
        (FeaturesConfig, cache_features, [*common, "--layers", *MAP_LAYERS, "--maps"]),
        (FeaturesConfig, cache_features, [*common, "--layers", *POOLED_ONLY_LAYERS]),
        (KsaeConfig, train_ksaes, ["--cache", str(CACHE), "--out", str(SAES), *KSAE_ARGS]),
    ]


def command_line(run: Callable, argv: list[str]) -> str:
    """How a person runs the step, with this repository's absolute paths made relative."""
    root = f"{ASSETS.parent}/"
    return " ".join(["python -m", run.__module__, *(arg.removeprefix(root) for arg in argv)])


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    counts = write_images(IMAGES)
    for config_type, run, argv in steps():
        run(parse_config(config_type, argv, f"python -m {run.__module__}", None))
    build = {
        "images": {"count": NUM_IMAGES, "size": IMAGE_SIZE, "seed": SEED, "per_class": counts},
        "commands": [command_line(run, argv) for _, run, argv in steps()],
    }
    (OUT / "build.json").write_text(json.dumps(build, indent=2) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main))
