"""Rows of evaluation results: their means, tables and figures, and the paper's numbers (SD
v1.4) they are compared with."""

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MID = "mid_block.attentions.0"
PAPER_COHESION = {1.0: 0.588, 0.5: 0.639, 0.0: 0.664}
PAPER_SEPARABILITY = {1.0: 0.433, 0.5: 0.363, 0.0: 0.344}
PAPER_SPATIAL = {"early": 0.80, "middle": 0.35, "final": 0.23}
PAPER_GLOBAL = {
    "early": {"success": 0.69, "delta_clip": 0.007, "lpips": 0.653},
    "middle": {"success": 0.93, "delta_clip": 0.021, "lpips": 0.385},
    "final": {"success": 0.78, "delta_clip": 0.006, "lpips": 0.114},
}
PAPER_COMPOSITION = "paper (SD v1.4): mid_block IoU ~0.26 at t=1.0, saturating by t=0.5; up best"
Rows = list[dict]


def mean_by(rows: Rows, keys: Sequence[str], value: str) -> dict[tuple, float]:
    """Mean of `value` over rows grouped by `keys` (NaN values left out)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if not math.isnan(float(row[value])):
            groups.setdefault(tuple(row[k] for k in keys), []).append(float(row[value]))
    return {group: float(np.mean(values)) for group, values in groups.items()}


def plot_stage_rates(summary: Rows, column: str, paper_column: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    stages = [r["stage"] for r in summary]
    x = np.arange(len(stages))
    ax.bar(x - 0.2, [r[column] for r in summary], 0.4, label="this run")
    ax.bar(x + 0.2, [r[paper_column] for r in summary], 0.4, label="paper (SD v1.4)")
    ax.set_xticks(x, stages)
    ax.set(ylabel=column, title=title, ylim=(0, 1))
    ax.legend(fontsize=7)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(rows: Rows, title: str) -> str:
    """Rows as an aligned text table (floats to 3 decimals)."""
    if not rows:
        return f"{title}: no rows"
    columns = list(rows[0])
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
