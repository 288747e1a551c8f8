"""Draw the toy model's samples for held-out captions beside the world's own renders.

    python -m scripts.toy_samples --out docs/toy-samples.png

Columns are held-out captions (`core.toy.check.heldout_scenes`, with the settings recorded
in the shipped model's `check/subset.json`), alternating one- and two-object scenes; the
top row is the world's rendering of the caption, the bottom row the shipped model's image
(the check's seeds, steps and guidance).
"""

import sys
import textwrap
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.diffusion.presets import TOY_ASSETS  # noqa: E402
from core.diffusion.sampling import generate_image
from core.runtime import command  # noqa: E402
from core.toy.check import heldout_scenes  # noqa: E402
from core.toy.reproduce import SUBSET_FILE, recorded  # noqa: E402
from core.views.model_cache import ModelCache  # noqa: E402


@dataclass
class SamplesConfig:
    """Settings of `python -m scripts.toy_samples`."""

    out: str = "docs/toy-samples.png"
    """The PNG to write."""
    columns: int = 8
    """Captions shown, half with one object and half with two."""


def draw_samples(config: SamplesConfig) -> None:
    _, settings = recorded(TOY_ASSETS / "check" / SUBSET_FILE)
    scenes = heldout_scenes(4 * config.columns, replace(settings, seed=settings.seed + 7))
    ones = [s for s in scenes if len(s.objects) == 1][: config.columns // 2]
    twos = [s for s in scenes if len(s.objects) == 2][: config.columns - len(ones)]
    chosen = [s for pair in zip(ones, twos, strict=False) for s in pair]
    fig, axes = plt.subplots(2, len(chosen), figsize=(1.7 * len(chosen), 4.2), squeeze=False)
    with ModelCache().using("toy") as loaded:
        for column, scene in enumerate(chosen):
            image = generate_image(
                loaded.pipe,
                scene.caption,
                settings.seed + column,
                settings.steps,
                settings.guidance_scale,
                settings.resolution,
            )
            for row, shown in enumerate((scene.image, image)):
                axes[row, column].imshow(shown, interpolation="nearest")
                axes[row, column].set_xticks([])
                axes[row, column].set_yticks([])
            axes[0, column].set_title("\n".join(textwrap.wrap(scene.caption, 22)), fontsize=6)
    axes[0, 0].set_ylabel("the world", fontsize=8)
    axes[1, 0].set_ylabel("the model", fontsize=8)
    fig.tight_layout()
    fig.savefig(config.out, dpi=150)
    print(f"wrote {config.out}")


main = command(SamplesConfig, draw_samples, "python -m scripts.toy_samples", __doc__)


if __name__ == "__main__":
    sys.exit(main())
