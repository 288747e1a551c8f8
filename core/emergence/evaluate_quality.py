"""Paper 1's dictionary quality: concept cohesion and separability per SAE."""

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.emergence.concept_measures import cohesion, separability
from core.emergence.concepts import ConceptDictionary
from core.emergence.results import PAPER_COHESION, PAPER_SEPARABILITY, Rows, save_figure  # noqa: E402
from core.emergence.words import WordVectors  # noqa: E402
from core.sae.bank import SAEKey  # noqa: E402


def quality_rows(
    dictionaries: Mapping[SAEKey, ConceptDictionary], word_vectors: WordVectors
) -> Rows:
    """Cohesion and separability of each dictionary (NaN where undefined), with the paper's."""
    rows = []
    for key, dictionary in sorted(dictionaries.items(), key=lambda kv: (kv[0].block, -kv[0].t)):
        rows.append(
            {
                "block": key.block,
                "branch": key.branch,
                "t": key.t,
                "concepts": int(dictionary.has_embedding.sum()),
                "cohesion": _or_nan(cohesion, dictionary, word_vectors),
                "separability": _or_nan(separability, dictionary),
                "paper_cohesion": PAPER_COHESION.get(key.t, math.nan),
                "paper_separability": PAPER_SEPARABILITY.get(key.t, math.nan),
            }
        )
    return rows


def _or_nan(metric: Callable[..., float], *args) -> float:
    try:
        return metric(*args)
    except ValueError:  # too few concepts for the metric
        return math.nan


def plot_quality(rows: Rows, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("cohesion", "separability"), strict=True):
        for block, branch in sorted({(r["block"], r["branch"]) for r in rows}):
            points = sorted(
                (r["t"], r[metric]) for r in rows if (r["block"], r["branch"]) == (block, branch)
            )
            ax.plot(*zip(*points, strict=True), marker="o", label=f"{block} ({branch})")
        paper = PAPER_COHESION if metric == "cohesion" else PAPER_SEPARABILITY
        ax.plot(list(paper), list(paper.values()), "k--", label="paper (SD v1.4)")
        ax.set(xlabel="t (1 = noise)", title=metric, xlim=(1.05, -0.05))
        ax.legend(fontsize=6)
    save_figure(fig, path)
