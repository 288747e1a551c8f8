"""What the app's revelio tab shows, computed from folders: a feature cache, its k-SAEs, images.

- `contents(cache, saes)`: the (layer, timestep) pairs with a k-SAE and those with maps;
- `purity_table(cache, saes)`: per pair, label purity of the most activating latents and the
  chance reference (`core.revelio.latents`);
- `inspect_latent(...)`: one latent's top images, as a grid when the image folder is given,
  and their class labels and activations;
- `pca_view(...)`: images beside the PCA maps of their features (`core.revelio.pca`), one PCA
  over all of them so that a colour means the same in every map.

Every bad input is a ValueError (or FileNotFoundError) whose message says what to change.
Latent summaries are kept for the last few (cache, SAE) pairs, so inspecting one latent
after another encodes the images once.
"""

import functools
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from core.files import ASSETS, REPO_ROOT
from core.revelio.cache_select import select_pairs
from core.revelio.feature_cache import (
    LAYER_ALIASES,
    FeatureMeta,
    feature_path,
    load_features,
    load_meta,
)
from core.revelio.ksae_folders import ksae_folder
from core.revelio.latents import (
    PAPER_IMAGES,
    PAPER_LATENTS,
    PAPER_MIN_FIRES,
    LatentSummary,
    chance_purity,
    image_loader,
    latent_grid,
    latent_purity,
    most_activating_latents,
    summarize_latents,
)
from core.revelio.pca import cached_pca_images
from core.sae.config import CFG_FILE
from core.sae.model import TopKSAE
from core.views.render import DISPLAY, for_display

DEMO = ASSETS / "revelio-demo"
DEMO_CACHE, DEMO_SAES, DEMO_IMAGES = DEMO / "cache", DEMO / "ksaes", DEMO / "images"
ROOTS_ENV = "REVELIO_ROOTS"
DEFAULT_PCA_IMAGES = 8
MAX_PCA_IMAGES = 32
PURITY_HEADERS = [
    "layer",
    "t",
    "latents",
    "sigma_label",
    "majority",
    "entropy",
    "chance sigma_label",
    "chance majority",
    "chance entropy",
]
TOP_IMAGE_HEADERS = ["rank", "image", "file", "class", "activation"]
ALIAS_OF = {path: alias for alias, path in LAYER_ALIASES.items()}

Pair = tuple[str, int]


@dataclass
class Contents:
    cache: Path
    saes: Path | None
    meta: FeatureMeta
    ksae_pairs: list[Pair]
    """(layer, timestep) pairs of the cache that have a k-SAE, in the cache's order."""
    map_pairs: list[Pair]
    """Pairs of the cache that have feature maps."""


@dataclass
class LatentView:
    latent: int
    grid: Image.Image | None
    """Its top images captioned "class (activation)"; None without an image folder."""
    rows: list[list]
    """One row per top image it fires on: TOP_IMAGE_HEADERS."""
    note: str


def readable_roots() -> list[Path]:
    """Folders the page may read below: the repository's assets/ and runs/, plus those in
    REVELIO_ROOTS (separated by the system's path separator), so that a public Space does
    not let visitors browse the server's files."""
    extra = [Path(p).expanduser() for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p]
    return [root.resolve() for root in (ASSETS, REPO_ROOT / "runs", *extra)]


def find_folder(path: str | Path | None, what: str, required: bool = True) -> Path | None:
    """An existing folder below `readable_roots()`; a relative path not found from the
    working directory is read from this repository's root (so the demo's default paths
    work from anywhere).

    A path outside the readable folders gets the same sentence whether it exists or not, so
    the page tells a visitor nothing about the server's other files."""
    text = str(path or "").strip()
    if not text:
        if required:
            raise ValueError(f"give the {what} folder")
        return None
    roots = readable_roots()
    readable = [
        candidate
        for candidate in (Path(text).expanduser(), REPO_ROOT / text)
        if any(candidate.resolve().is_relative_to(root) for root in roots)
    ]
    if not readable:
        raise PermissionError(
            f"the {what} folder {text} is outside the folders this page may read "
            f"(assets/, runs/ and {ROOTS_ENV}); add its parent to {ROOTS_ENV}"
        )
    for candidate in readable:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the {what} folder {text} does not exist")


def layer_label(layer: str) -> str:
    """`up_ft1 (up_blocks.1)` for a layer Revelio names, else the module path."""
    return f"{ALIAS_OF[layer]} ({layer})" if layer in ALIAS_OF else layer


def ksae_pairs_in(saes: Path) -> set[Pair]:
    """The (layer, timestep) folders `python -m core.revelio.ksae` wrote under `saes`."""
    configs = saes.glob(f"*/t[0-9][0-9][0-9][0-9]/{CFG_FILE}")
    return {(path.parent.parent.name, int(path.parent.name[1:])) for path in configs}


def contents(cache: str | Path, saes: str | Path | None) -> Contents:
    """What a cache (and a k-SAE folder, when given) hold. Raises when the k-SAE folder holds
    no k-SAE for any of the cache's pairs."""
    cache_dir = find_folder(cache, "feature cache")
    meta = load_meta(cache_dir)
    pairs = select_pairs(meta)
    maps = [pair for pair in pairs if feature_path(cache_dir, *pair, "maps").is_file()]
    saes_dir = find_folder(saes, "k-SAE", required=False)
    if saes_dir is None:
        return Contents(cache_dir, None, meta, [], maps)
    trained = ksae_pairs_in(saes_dir)
    if not trained & set(pairs):
        raise ValueError(
            f"the k-SAE folder {saes} holds no k-SAE for the cache's layers and timesteps "
            "(train them with python -m core.revelio.ksae)"
        )
    return Contents(cache_dir, saes_dir, meta, [pair for pair in pairs if pair in trained], maps)


def whole_number(value: object, what: str) -> int:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer():
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return int(number)


def check_pair(meta: FeatureMeta, layer: str, timestep: object) -> Pair:
    """(module path, timestep) of a pair the cache holds; raises naming what it holds."""
    if not str(layer or "").strip():
        raise ValueError("choose a layer (press load to list the cache's layers)")
    return select_pairs(meta, [str(layer).strip()], [whole_number(timestep, "the timestep")])[0]


@functools.lru_cache(maxsize=16)
def _summary(cache: Path, sae_dir: Path, pair: Pair, stamp: tuple[int, int]) -> LatentSummary:
    """Top images per latent; `stamp` (the files' mtimes) makes a changed file a new entry."""
    sae = TopKSAE.from_pretrained(sae_dir)
    return summarize_latents(sae, load_features(cache, *pair), PAPER_IMAGES)


def summary(cache: Path, saes: Path, pair: Pair) -> LatentSummary:
    """The latent summary of the pair's k-SAE on the cache's pooled features."""
    sae_dir = ksae_folder(saes, *pair)
    if not (sae_dir / CFG_FILE).is_file():
        held = ", ".join(f"{layer} t={t}" for layer, t in sorted(ksae_pairs_in(saes)))
        raise ValueError(f"no k-SAE for {pair[0]} t={pair[1]} in {saes}; it holds {held}")
    features = feature_path(cache, *pair)
    stamp = (features.stat().st_mtime_ns, (sae_dir / CFG_FILE).stat().st_mtime_ns)
    return _summary(cache, sae_dir, pair, stamp)


def purity_table(cache: str | Path, saes: str | Path) -> list[list]:
    """One row per pair with a k-SAE: PURITY_HEADERS, measures rounded to 3 decimals.

    A pair none of whose latents fires on more than 10 images has no measures (None).
    """
    found = contents(cache, saes)
    if found.saes is None:
        raise ValueError("give the k-SAE folder")
    labels, classes = found.meta.labels, len(found.meta.classes)
    rows = []
    for pair in found.ksae_pairs:
        row: list = [layer_label(pair[0]), pair[1]]
        latents = summary(found.cache, found.saes, pair)
        try:
            measured, chosen = latent_purity(latents, labels, classes)
        except ValueError:  # no latent fires often enough to be measured
            rows.append([*row, 0, *[None] * 6])
            continue
        chance = chance_purity(labels, PAPER_IMAGES, len(chosen), classes)
        values = [measured.sigma_label, measured.majority_fraction, measured.entropy]
        values += [chance.sigma_label, chance.majority_fraction, chance.entropy]
        rows.append([*row, len(chosen), *[round(v, 3) for v in values]])
    return rows


def purest_latents(found: LatentSummary, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The most activating latents (as in the purity table), purest first: (ids, the share
    of their top images in the most common class). Ties keep the mean-activation order."""
    chosen = most_activating_latents(found, PAPER_LATENTS, PAPER_MIN_FIRES)
    label_sets = torch.as_tensor(labels)[found.top_images[chosen, :PAPER_IMAGES]]
    counts = torch.nn.functional.one_hot(label_sets, max(labels) + 1).sum(dim=1)
    majority = counts.max(dim=1).values / label_sets.shape[1]
    order = majority.argsort(descending=True, stable=True)
    return chosen[order], majority[order]


def choose_latent(found: LatentSummary, labels: list[int], by: str, number: object) -> int:
    """The latent with id `number`, or the one of rank `number` among the purest."""
    number, count = whole_number(number, "the latent"), len(found.fire_count)
    if by == "id":
        if not 0 <= number < count:
            raise ValueError(
                f"latent {number} is out of range; the k-SAE has {count} (0 to {count - 1})"
            )
        return number
    if by != "purest":
        raise ValueError(f'choose the latent "by" purest or id, not {by!r}')
    ranked, _ = purest_latents(found, labels)
    if len(ranked) == 0:
        raise ValueError(
            f"no latent fires on more than {PAPER_MIN_FIRES} images, so none is ranked; "
            "choose a latent by id"
        )
    if not 0 <= number < len(ranked):
        raise ValueError(
            f"rank {number} is out of range: {len(ranked)} latents fire on more than "
            f"{PAPER_MIN_FIRES} images (ranks 0 to {len(ranked) - 1})"
        )
    return int(ranked[number])


def top_image_rows(found: LatentSummary, latent: int, meta: FeatureMeta) -> list[list]:
    top = zip(found.top_images[latent].tolist(), found.top_values[latent].tolist(), strict=True)
    return [
        [rank, i, meta.images[i], meta.classes[meta.labels[i]], round(value, 3)]
        for rank, (i, value) in enumerate(top)
        if value > 0
    ]


def latent_note(found: LatentSummary, latent: int, pair: Pair, rows: list[list]) -> str:
    """One line: how often the latent fires, and the classes of its top images."""
    name = f"Latent {latent} of {len(found.fire_count)} at {layer_label(pair[0])}, t={pair[1]},"
    if not rows:
        return f"{name} fires on none of the images."
    classes = Counter(row[3] for row in rows).most_common()
    spread = ", ".join(f"{count} {label}" for label, count in classes)
    mean = float(found.mean_activation[latent])
    return (
        f"{name} fires on {int(found.fire_count[latent])} images, mean activation {mean:.3f}; "
        f"its top {len(rows)}: {spread}."
    )


def inspect_latent(
    cache: str | Path,
    saes: str | Path,
    images: str | Path | None,
    layer: str,
    timestep: object,
    by: str = "purest",
    number: object = 0,
) -> LatentView:
    """One latent of the pair's k-SAE: its top images (a grid when `images` is given) and
    their labels and activations."""
    cache_dir, saes_dir = find_folder(cache, "feature cache"), find_folder(saes, "k-SAE")
    images_dir = find_folder(images, "image", required=False)
    meta = load_meta(cache_dir)
    pair = check_pair(meta, layer, timestep)
    found = summary(cache_dir, saes_dir, pair)
    latent = choose_latent(found, meta.labels, by, number)
    rows = top_image_rows(found, latent, meta)
    note = latent_note(found, latent, pair, rows)
    grid = None
    if images_dir is None:
        note += " No image folder given, so no grid: the table has its top images' labels."
    elif rows:
        grid = latent_grid(found, latent, image_loader(images_dir, meta), meta)
    return LatentView(latent, grid, rows, note)


def default_indices(labels: list[int]) -> list[int]:
    """The first image of each class (DEFAULT_PCA_IMAGES at most), so that the maps compare
    classes; the first images when there is one class."""
    firsts = list({label: index for index, label in reversed(list(enumerate(labels)))}.values())
    chosen = sorted(firsts) if len(firsts) > 1 else range(len(labels))
    return list(chosen)[:DEFAULT_PCA_IMAGES]


def parse_indices(text: str, labels: list[int]) -> list[int]:
    """Image indices from "0-7", "3, 5 9" or "" (`default_indices`)."""
    text = (text or "").strip()
    if not text:
        return default_indices(labels)
    indices: list[int] = []
    for part in re.split(r"[,\s]+", text):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f'image indices are numbers and ranges like "0-7, 12", got {part!r}')
        first, last = int(match[1]), int(match[2] or match[1])
        indices += range(first, last + 1)
    if not 0 < len(indices) <= MAX_PCA_IMAGES:
        raise ValueError(f"choose 1 to {MAX_PCA_IMAGES} images, got {len(indices)}")
    return indices


def pca_view(
    cache: str | Path, images: str | Path | None, layer: str, timestep: object, indices: str = ""
) -> list[tuple[Image.Image, str]]:
    """(image, caption) pairs: each chosen image (when `images` is given) then the PCA map of
    its features, all maps from one PCA, DISPLAY pixels wide."""
    cache_dir = find_folder(cache, "feature cache")
    images_dir = find_folder(images, "image", required=False)
    meta = load_meta(cache_dir)
    pair = check_pair(meta, layer, timestep)
    if not feature_path(cache_dir, *pair, "maps").is_file():
        held = [p for p in select_pairs(meta) if feature_path(cache_dir, *p, "maps").is_file()]
        listed = ", ".join(f"{layer} t={t}" for layer, t in held) or "none"
        raise ValueError(
            f"the cache has no feature maps for {pair[0]} t={pair[1]} (maps: {listed}); "
            "extract with --maps"
        )
    chosen = parse_indices(indices, meta.labels)
    maps = cached_pca_images(cache_dir, *pair, chosen, size=DISPLAY)
    load = image_loader(images_dir, meta) if images_dir else None
    panels = []
    for index, pca in zip(chosen, maps, strict=True):
        name = meta.classes[meta.labels[index]]
        if load:
            panels.append((for_display(load(index)), f"{index}: {name}"))
        panels.append((pca, f"{index}: PCA"))
    return panels
