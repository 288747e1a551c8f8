"""Draw docs/beyond-tiny.png from the CSVs the commands of docs/beyond.md write.

    python -m scripts.plot_beyond --compare runs/compare-shared-1 runs/compare-shared \
        --labels "time-shared, 1 step's rows" "time-shared, 3 steps' rows" \
        --embeddings runs/embeddings

Left: explained variance per t of each block's per-time SAEs (solid) and of each time-shared
bank (`core.emergence.compare_shared`'s comparison.csv, one line style each). Right: mean
composition IoU per step of each word-vector source (`core.emergence.compare_embeddings`'
composition.csv), over the rows whose IoU is defined.
"""

import csv
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.runtime import command  # noqa: E402
from core.views.emergence import t_axis  # noqa: E402

STYLES = ("--", ":", "-.")
"""Line styles of the time-shared banks, in order (per-time SAEs are solid)."""
T_OF = {"t=1": 1.0, "t=0.5": 0.5, "t=0": 0.0}


@dataclass
class PlotConfig:
    """Settings of `python -m scripts.plot_beyond`."""

    compare: list[str] = field(default_factory=list)
    """Output folders of `core.emergence.compare_shared`, one per time-shared bank."""
    labels: list[str] = field(default_factory=list)
    """A legend label per --compare folder."""
    embeddings: str = "runs/embeddings"
    """Output folder of `core.emergence.compare_embeddings`."""
    out: str = "docs/beyond-tiny.png"

    def __post_init__(self) -> None:
        if not self.compare or len(self.labels) != len(self.compare):
            raise ValueError("give one or more --compare folders and one --labels entry each")


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the command that writes it first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def explained_variance(folder: str) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """block -> {"per_time" | "shared": [(t, explained variance)]}, from comparison.csv."""
    found: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in read_rows(Path(folder) / "comparison.csv"):
        if row["measure"] == "explained_variance":
            for kind in ("per_time", "shared"):
                found[row["block"]][kind].append((T_OF[row["at"]], float(row[kind])))
    return found


def composition_by_step(folder: str) -> dict[str, list[tuple[float, float]]]:
    """source -> [(t, mean IoU over the rows with a defined IoU at that step)]."""
    ious: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in read_rows(Path(folder) / "composition.csv"):
        iou = float(row["iou"])
        if not math.isnan(iou):
            ious[row["source"]][float(row["t"])].append(iou)
    return {
        source: sorted((t, sum(v) / len(v)) for t, v in by_t.items())
        for source, by_t in ious.items()
    }


def plot(config: PlotConfig) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = matplotlib.colormaps["tab10"]
    banks = [explained_variance(folder) for folder in config.compare]
    for i, block in enumerate(sorted(banks[0])):
        t, ev = zip(*sorted(banks[0][block]["per_time"]), strict=True)
        left.plot(t, ev, "o-", color=colours(i), label=f"{block}, per-time")
        for bank, label, style in zip(banks, config.labels, STYLES, strict=False):
            t, ev = zip(*sorted(bank[block]["shared"]), strict=True)
            left.plot(t, ev, style, marker="s", color=colours(i), label=f"{block}, {label}")
    t_axis(left)
    left.set_ylabel("explained variance, held-out generations")
    left.set_title("Per-time vs time-shared SAEs", fontsize=10, loc="left")
    left.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    for i, (source, points) in enumerate(sorted(composition_by_step(config.embeddings).items())):
        t, iou = zip(*points, strict=True)
        right.plot(t, iou, "o-", color=colours(i), label=source)
    t_axis(right)
    right.set_ylabel("mean composition IoU (defined rows)")
    right.set_title("Concept embeddings: word vectors vs text encoder", fontsize=10, loc="left")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(config.out, dpi=100)
    print(f"wrote {config.out}")


main = command(PlotConfig, plot, "python -m scripts.plot_beyond", __doc__)

if __name__ == "__main__":
    sys.exit(main())
