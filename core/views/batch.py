"""The emergence view over several prompts and seeds, for the page and for
`python -m core.views.emergence_batch`.

One generation (`run_emergence`) per prompt and seed, every one with the same steps, block,
branch and words. Each step's IoU of the SAE prediction and of the cross-attention baseline
is pooled over every run and target word: their mean, standard deviation and the number of
defined values (a word in neither mask has no IoU at that step, and is left out), per step,
and per word as well.

Only IoUs against an annotation of the final image are results. Where the annotator does not
find a word, a run scores it against its own last step's prediction instead (1.0 at the last
step by construction): the batch leaves those out of every mean, table and plot, and its
summary line says how many there were.
"""

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from core.files import write_csv, write_json
from core.runtime import counted
from core.views.emergence import EmergenceResult, finished, iou_axes, run_emergence
from core.views.inputs import check_prompt, check_seed
from core.views.model_cache import Loaded

METHODS = {"sae": "SAE prediction", "attention": "cross-attention"}
"""The two maps scored per step: the SAE's predicted mask and the DAAM-style baseline."""
STATISTICS = ("mean", "std", "n")
ALL_WORDS = "all"
"""The word column of the rows pooled over every word."""
SELF_REFERENCE = "last step"
"""A run's reference for a word its annotator did not find: its own last prediction."""
MAX_PAGE_RUNS = 16
"""Runs a page request may ask for; more are for the command line."""


@dataclass(frozen=True)
class Spread:
    """The mean, standard deviation (over the values, ddof=0) and count of defined values."""

    mean: float
    std: float
    n: int


def spread(values: Iterable[float]) -> Spread:
    """The spread of the values that are not NaN; NaN mean and std when none is."""
    defined = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if not defined.size:
        return Spread(math.nan, math.nan, 0)
    return Spread(float(defined.mean()), float(defined.std()), int(defined.size))


@dataclass
class RunScores:
    """What a batch keeps of one run: its scores, not its image and maps."""

    prompt: str
    seed: int
    words: list[str]
    references: dict[str, str]
    """word -> what its IoU is against: "annotation" or "last step"."""
    ious: dict[str, list[float]]
    attention_ious: dict[str, list[float]]

    @classmethod
    def of(cls, result: EmergenceResult) -> "RunScores":
        references = {word: how for word, (_, how) in result.references.items()}
        return cls(
            result.prompt,
            result.seed,
            result.words,
            references,
            result.ious,
            result.attention_ious,
        )

    def scores(self, method: str) -> dict[str, list[float]]:
        """word -> IoU per step of the method ("sae" or "attention") against an annotation:
        a word scored against the run's own last step is left out."""
        scores = self.ious if method == "sae" else self.attention_ious
        return {w: s for w, s in scores.items() if w not in self.against_last_step}

    @property
    def against_last_step(self) -> list[str]:
        """The words the annotator did not find, scored against the run's last step."""
        return [w for w, how in self.references.items() if how == SELF_REFERENCE]


@dataclass
class BatchResult:
    """The runs of a batch, every one with the same steps (`ts`), block and branch."""

    preset: str
    block: str
    branch: str
    prompts: list[str]
    seeds: list[int]
    ts: list[float]
    runs: list[RunScores] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        """Every target word of the runs, in order of appearance."""
        return list(dict.fromkeys(w for run in self.runs for w in run.words))

    def spreads(self, method: str, word: str | None = None) -> list[Spread]:
        """Per step, the spread of the method's IoUs over every run and word (or `word`)."""
        per_run = [run.scores(method) for run in self.runs]
        series = [s[w] for s in per_run for w in s if word in (None, w)]
        if not series:  # no word of the method in any run (cross-attention: none in a prompt)
            return [spread([])] * len(self.ts)
        return [spread(values) for values in zip(*series, strict=True)]


def parse_seeds(text: object) -> list[range]:
    """Seeds as a person types them: "0-3", "0, 1, 2" or both ("0-3, 7"), ranges inclusive.

    Ranges stay ranges, so that the batch size is known before a huge one is spelled out.
    """
    parts = re.split(r"[,;\s]+", re.sub(r"\s*-\s*", "-", str(text or "")).strip())
    ranges = []
    for part in filter(None, parts):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        low, high = (found[1], found[2] or found[1]) if found else ("", "")
        if not found or int(low) > int(high):
            raise ValueError(
                f'The seeds must be whole numbers or ranges such as "0-3" or "0, 1, 2", got '
                f"{text!r}."
            )
        ranges.append(range(check_seed(low), check_seed(high) + 1))
    if not ranges:
        raise ValueError('Give at least one seed, such as "0-3" or "0, 1, 2".')
    return ranges


def seed_count(ranges: Sequence[range]) -> int:
    """How many distinct seeds the ranges hold, without spelling them out."""
    count, end = 0, 0
    for seeds in sorted(ranges, key=lambda r: r.start):
        count += max(0, seeds.stop - max(seeds.start, end))
        end = max(end, seeds.stop)
    return count


def page_batch(prompt: object, extra: object, seeds: object) -> tuple[list[str], list[int]]:
    """The prompts (the tab's, then one a line of `extra`) and seeds of a page request,
    refused beyond `MAX_PAGE_RUNS` runs."""
    lines = [str(prompt or ""), *str(extra or "").splitlines()]
    prompts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not prompts:
        raise ValueError("There is no prompt to run: write the tab's prompt or one a line.")
    ranges = parse_seeds(seeds)
    runs = len(prompts) * seed_count(ranges)
    if runs > MAX_PAGE_RUNS:
        raise ValueError(
            f"{counted(len(prompts), 'prompt')} × {counted(seed_count(ranges), 'seed')} make "
            f"{runs} runs, more than "
            f"the page runs at once ({MAX_PAGE_RUNS}); run larger batches with "
            "`python -m core.views.emergence_batch`."
        )
    return prompts, list(dict.fromkeys(s for r in ranges for s in r))


def run_batch(
    loaded: Loaded,
    prompts: Sequence[object],
    seeds: Sequence[object],
    steps: object,
    block: str,
    branch: str,
    words: object = "",
    on_run: Callable[[int, int, RunScores], None] | None = None,
) -> BatchResult:
    """`run_emergence` for every prompt and seed (prompt-major); `on_run(done, total, run)`
    after each run. Every prompt and seed is checked before the first generation."""
    prompts = list(dict.fromkeys(check_prompt(p) for p in prompts))
    seeds = list(dict.fromkeys(check_seed(s) for s in seeds))
    if not prompts or not seeds:
        raise ValueError("A batch needs at least one prompt and one seed.")
    result = BatchResult(loaded.preset.name, block, branch, prompts, seeds, [])
    total = len(prompts) * len(seeds)
    for prompt in prompts:
        for seed in seeds:
            run = run_emergence(loaded, prompt, seed, steps, block, branch, words)
            result.ts = run.ts
            result.runs.append(RunScores.of(run))
            if on_run is not None:
                on_run(len(result.runs), total, result.runs[-1])
    return result


def batch_figure(result: BatchResult) -> Figure:
    """Mean IoU vs t over the runs and words, with a band of one standard deviation: the SAE
    prediction solid, the cross-attention baseline dashed."""
    ax = iou_axes("mean IoU with the annotation mask")
    colours = matplotlib.colormaps["tab10"]
    for i, (method, style) in enumerate(zip(METHODS, ("o-", "--"), strict=True)):
        spreads = result.spreads(method)
        mean = np.array([s.mean for s in spreads])
        std = np.array([s.std for s in spreads])
        ax.plot(result.ts, mean, style, color=colours(i), label=f"{METHODS[method]}, mean")
        low, high = np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1)  # IoU is in [0, 1]
        label = f"{METHODS[method]}, ±1 std"
        ax.fill_between(result.ts, low, high, color=colours(i), alpha=0.2, label=label)
    return finished(
        ax,
        f"Mean IoU per step over {_design(result)} and their words\n"
        "(no IoU where a word is in neither mask)",
    )


def summary_rows(result: BatchResult, word: str | None = None) -> list[dict[str, object]]:
    """Per step: t, and each method's mean, std and n over every run and word (or `word`)."""
    columns = {method: result.spreads(method, word) for method in METHODS}
    return [
        {
            "t": t,
            **{
                f"{method}_{statistic}": getattr(spreads[i], statistic)
                for method, spreads in columns.items()
                for statistic in STATISTICS
            },
        }
        for i, t in enumerate(result.ts)
    ]


TABLE_HEADERS = ["t"] + [f"{METHODS[m]} {s}" for m in METHODS for s in STATISTICS]
"""The page's table: the columns of `summary_rows`, named for a reader."""


def batch_table(result: BatchResult) -> list[list[object]]:
    """`summary_rows` over every word as a table's rows (values rounded, NaN as empty)."""
    return [[_shown(value) for value in row.values()] for row in summary_rows(result)]


def _shown(value: object) -> object:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    return value


def summary_line(result: BatchResult) -> str:
    """One line: the batch, and each method's IoU pooled over every step, run and word."""
    pooled = {
        method: spread(v for run in result.runs for s in run.scores(method).values() for v in s)
        for method in METHODS
    }
    scores = ", ".join(
        f"{METHODS[m]} {s.mean:.3f} ± {s.std:.3f} (n={s.n})" for m, s in pooled.items()
    )
    left_out = sum(len(run.against_last_step) for run in result.runs)
    missing = (
        f" Left out: {counted(left_out, 'word')} the annotator did not find in their run's "
        "final image (scored only against the run's own last step, which is no result)."
        if left_out
        else ""
    )
    return (
        f"{_design(result, f'{len(result.ts)} steps, {result.block} {result.branch}')}; "
        f"mean IoU against the annotation over every step, run and word: {scores}.{missing}"
    )


def write_batch(result: BatchResult, out: Path) -> None:
    """batch.csv, batch.png and runs.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"word": word or ALL_WORDS, "step": i, **row}
        for word in [None, *result.words]
        for i, row in enumerate(summary_rows(result, word))
    ]
    write_csv(out / "batch.csv", rows)
    batch_figure(result).savefig(out / "batch.png")
    runs = {
        "preset": result.preset,
        "block": result.block,
        "branch": result.branch,
        "ts": result.ts,
        "runs": [
            {
                "prompt": run.prompt,
                "seed": run.seed,
                "words": run.words,
                "references": run.references,
                "ious": _nulls(run.ious),
                "attention_ious": _nulls(run.attention_ious),
            }
            for run in result.runs
        ],
    }
    write_json(out / "runs.json", runs)


def _nulls(scores: dict[str, list[float]]) -> dict[str, list[float | None]]:
    """IoUs as JSON holds them: NaN (undefined) as null."""
    return {w: [None if math.isnan(v) else v for v in values] for w, values in scores.items()}


def _design(result: BatchResult, more: str = "") -> str:
    """ "4 runs (2 prompts × 2 seeds)", with `more` inside the brackets."""
    prompts, seeds = counted(len(result.prompts), "prompt"), counted(len(result.seeds), "seed")
    inside = ", ".join(part for part in (f"{prompts} × {seeds}", more) if part)
    return f"{counted(len(result.runs), 'run')} ({inside})"
