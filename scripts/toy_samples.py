"""Draw the toy model's samples for held-out captions beside the world's own renders.

    python -m scripts.toy_samples --out docs/toy-samples.png
    python -m scripts.toy_samples --out docs/toy-twin-samples.png --twin runs/toy-dit/pipeline

Columns are held-out captions (`core.toy.check.heldout_scenes`, with the settings recorded
in the shipped model's `check/subset.json`), alternating one- and two-object scenes; the
top row is the world's rendering of the caption, the next the shipped model's image (the
check's seeds, steps and guidance), and with `--twin` a third its DiT twin's, from the same
seeds.
"""

import sys
import textwrap
from dataclasses import dataclass, replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.diffusion.pipelines import load_pipeline  # noqa: E402
from core.diffusion.presets import TOY_ASSETS, get_preset  # noqa: E402
from core.diffusion.sampling import generate_image
from core.runtime import command  # noqa: E402
from core.toy.check import heldout_scenes  # noqa: E402
from core.toy.reproduce import SUBSET_FILE, recorded  # noqa: E402


@dataclass
class SamplesConfig:
    """Settings of `python -m scripts.toy_samples`."""

    out: str = "docs/toy-samples.png"
    """The PNG to write."""
    columns: int = 8
    """Captions shown, half with one object and half with two."""
    twin: str | None = None
    """A DiT twin's pipeline folder, drawn in a third row."""


def draw_samples(config: SamplesConfig) -> None:
    _, settings = recorded(TOY_ASSETS / "check" / SUBSET_FILE)
    scenes = heldout_scenes(4 * config.columns, replace(settings, seed=settings.seed + 7))
    ones = [s for s in scenes if len(s.objects) == 1][: config.columns // 2]
    twos = [s for s in scenes if len(s.objects) == 2][: config.columns - len(ones)]
    chosen = [s for pair in zip(ones, twos, strict=False) for s in pair]
    models = {"the model": get_preset("toy")}
    if config.twin:
        models["its DiT twin"] = get_preset("toy", model=config.twin, assets=None)
    rows = 1 + len(models)
    fig, axes = plt.subplots(
        rows, len(chosen), figsize=(1.7 * len(chosen), 2.1 * rows), squeeze=False
    )
    for column, scene in enumerate(chosen):
        axes[0, column].set_title("\n".join(textwrap.wrap(scene.caption, 22)), fontsize=6)
        _show(axes[0, column], scene.image)
    for row, (label, preset) in enumerate(models.items(), start=1):
        axes[row, 0].set_ylabel(label, fontsize=8)
        pipe = load_pipeline(preset)
        for column, scene in enumerate(chosen):
            image = generate_image(
                pipe,
                scene.caption,
                settings.seed + column,
                settings.steps,
                settings.guidance_scale,
                settings.resolution,
            )
            _show(axes[row, column], image)
    axes[0, 0].set_ylabel("the world", fontsize=8)
    fig.tight_layout()
    fig.savefig(config.out, dpi=150)
    print(f"wrote {config.out}")


def _show(axis, image) -> None:
    axis.imshow(image, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


main = command(SamplesConfig, draw_samples, "python -m scripts.toy_samples", __doc__)


if __name__ == "__main__":
    sys.exit(main())
