"""Write PCA images (first three components as RGB) of cached feature maps.

    python -m core.revelio.pca_maps --cache cache/ --layer up_ft1 --timestep 25 --out pca/

One PCA over all the chosen images, so that a colour means the same in every file
(`core.revelio.pca`); the cache must hold maps (extracted with `--maps`).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from core.revelio.pca import cached_pca_images
from core.runtime import command


@dataclass
class PcaConfig:
    """Settings of `python -m core.revelio.pca_maps`."""

    cache: Path
    """Feature cache extracted with --maps."""
    layer: str
    """Module path or alias (up_ft1, ...)."""
    timestep: int
    """Integer timestep of the maps."""
    out: Path
    """Folder for the PNG files."""
    indices: tuple[int, ...] = (0, 1, 2, 3)
    """Images of the cache to draw, with one PCA over all of them."""
    size: int = 256
    """Side of each image in pixels."""


def write_pca_maps(config: PcaConfig) -> list[Path]:
    """One PNG per chosen image, `pca_<layer>_t<timestep>_<index>.png`; their paths."""
    images = cached_pca_images(
        config.cache, config.layer, config.timestep, config.indices, config.size
    )
    config.out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in zip(config.indices, images, strict=True):
        path = config.out / f"pca_{config.layer}_t{config.timestep:04d}_{index}.png"
        image.save(path)
        paths.append(path)
    print(f"wrote {len(paths)} images to {config.out}")
    return paths


main = command(PcaConfig, write_pca_maps, "python -m core.revelio.pca_maps", __doc__)

if __name__ == "__main__":
    sys.exit(main())
