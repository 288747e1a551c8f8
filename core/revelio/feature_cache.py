"""On-disk cache of diffusion features of labelled images (Revelio's setting).

One folder per extraction run:

    <cache>/
      meta.json                                  FeatureMeta: model, classes, labels, images
      <layer>/t<timestep:04d>/pooled.safetensors {"features": float32 [N, C]}
      <layer>/t<timestep:04d>/maps.safetensors   {"features": float16 [N, C, H, W]} (optional)

`layer` is the module path inside the denoiser (`mid_block`, `up_blocks.1`,
`transformer_blocks.12`); `timestep` is the integer DDPM timestep (0..1000) at which noise
was added. Row i of every file is image i of `meta.json`.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.files import atomic_write

META_FILE = "meta.json"
KINDS = ("pooled", "maps")
LAYER_ALIASES = {
    "bottleneck": "mid_block",
    "up_ft0": "up_blocks.0",
    "up_ft1": "up_blocks.1",
    "up_ft2": "up_blocks.2",
}
"""Revelio's names for the U-Net layers it reads."""


@dataclass
class FeatureMeta:
    model: str
    """Pipeline id or folder the features come from."""
    layers: list[str]
    timesteps: list[int]
    classes: list[str]
    """Class names; label i means classes[i]."""
    labels: list[int]
    images: list[str]
    """Image paths (relative to the image folder) or dataset row ids, one per row."""
    prompt: str = ""
    """Text (or, for DiT, class) conditioning the denoiser saw; empty: unconditional."""
    seed: int = 0
    resolution: int | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


def layer_name(layer: str) -> str:
    """The module path of a layer given by module path or by Revelio's alias."""
    return LAYER_ALIASES.get(layer, layer)


def feature_path(cache: str | Path, layer: str, timestep: int, kind: str = "pooled") -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; choose one of {', '.join(KINDS)}")
    return Path(cache) / layer_name(layer) / f"t{int(timestep):04d}" / f"{kind}.safetensors"


def save_meta(cache: str | Path, meta: FeatureMeta) -> None:
    Path(cache).mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(meta), indent=2) + "\n"
    atomic_write(Path(cache) / META_FILE, lambda tmp: tmp.write_text(text))


def load_meta(cache: str | Path) -> FeatureMeta:
    path = Path(cache) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature cache at {cache} (no {META_FILE}); extract features first"
        )
    return FeatureMeta(**json.loads(path.read_text()))


def save_features(
    cache: str | Path, layer: str, timestep: int, features: Tensor, kind: str = "pooled"
) -> Path:
    path = feature_path(cache, layer, timestep, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float32 if kind == "pooled" else torch.float16
    tensor = features.detach().to("cpu", dtype).contiguous()
    atomic_write(path, lambda tmp: save_file({"features": tensor}, tmp))
    return path


def load_features(cache: str | Path, layer: str, timestep: int, kind: str = "pooled") -> Tensor:
    path = feature_path(cache, layer, timestep, kind)
    if not path.is_file():
        available = sorted(
            f"{p.parent.parent.name}/{p.parent.name}" for p in Path(cache).glob(f"*/t*/{kind}*")
        )
        raise FileNotFoundError(
            f"no {kind} features for {layer_name(layer)} at t={timestep} in {cache}; "
            f"available: {', '.join(available) or 'none'}"
        )
    return load_file(path)["features"]
