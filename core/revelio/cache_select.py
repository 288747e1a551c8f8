"""Choosing (layer, timestep) pairs of a feature cache, shared by the Revelio command lines."""

from collections.abc import Sequence
from dataclasses import dataclass

from simple_parsing import field

from core.revelio.feature_cache import FeatureMeta, layer_name
from core.runtime import default_device


@dataclass
class Selection:
    """Which (layer, timestep) pairs of the feature cache to read, and where to compute."""

    layers: tuple[str, ...] | None = None
    """Module paths or Revelio names (bottleneck, up_ft0..2); default: all in the cache."""
    timesteps: tuple[int, ...] | None = None
    """Integer timesteps; default: all in the cache."""
    device: str = field(default_factory=default_device)
    """Torch device."""


def select_pairs(
    meta: FeatureMeta,
    layers: Sequence[str] | None = None,
    timesteps: Sequence[int] | None = None,
) -> list[tuple[str, int]]:
    """The (layer module path, timestep) pairs asked for, in the cache's order.

    Raises ValueError naming what the cache holds when a layer or timestep is not in it.
    """
    chosen_layers = [layer_name(layer) for layer in layers] if layers else list(meta.layers)
    unknown = [layer for layer in chosen_layers if layer not in meta.layers]
    if unknown:
        raise ValueError(
            f"layer {unknown[0]} is not in the cache; it holds {', '.join(meta.layers)}"
        )
    chosen_times = [int(t) for t in timesteps] if timesteps else list(meta.timesteps)
    missing = [t for t in chosen_times if t not in meta.timesteps]
    if missing:
        held = ", ".join(str(t) for t in meta.timesteps)
        raise ValueError(f"timestep {missing[0]} is not in the cache; it holds {held}")
    return [(layer, t) for layer in chosen_layers for t in chosen_times]
