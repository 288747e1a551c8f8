"""Synthetic Revelio feature caches for the k-SAE, purity and Diff-C tests."""

from pathlib import Path

import torch

from core.revelio.feature_cache import FeatureMeta, save_features, save_meta

LAYERS = ["mid_block", "up_blocks.1"]
TIMESTEPS = [25, 200]


def write_cache(
    root: Path,
    *,
    num_classes: int = 3,
    per_class: int = 12,
    channels: int = 8,
    size: int = 8,
    maps: bool = True,
    noise: float = 0.3,
    seed: int = 0,
) -> FeatureMeta:
    """A cache whose features are a class prototype plus Gaussian noise.

    Maps put the prototype at every position (times a fixed random spatial pattern), so a
    classifier can read the class anywhere; pooled features are the maps' spatial means.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    meta = FeatureMeta(
        model="synthetic",
        layers=LAYERS,
        timesteps=TIMESTEPS,
        classes=[f"class{c}" for c in range(num_classes)],
        labels=labels,
        images=[f"img{i:03d}.png" for i in range(len(labels))],
    )
    save_meta(root, meta)
    label_tensor = torch.tensor(labels)
    for layer in LAYERS:
        for timestep in TIMESTEPS:
            prototypes = 2 * torch.randn(num_classes, channels, 1, 1, generator=generator)
            pattern = 1 + 0.2 * torch.rand(1, 1, size, size, generator=generator)
            shape = (len(labels), channels, size, size)
            x = prototypes[label_tensor] * pattern + noise * torch.randn(shape, generator=generator)
            save_features(root, layer, timestep, x.mean(dim=(2, 3)), "pooled")
            if maps:
                save_features(root, layer, timestep, x, "maps")
    return meta
