"""The emergence batch on the shipped tiny preset: its statistics against the runs it pools,
the page's checks of a request, and its command."""

import csv
import json
import math
from dataclasses import astuple

import numpy as np
import pytest
import torch

from core.views.batch import (
    MAX_PAGE_RUNS,
    TABLE_HEADERS,
    BatchResult,
    RunScores,
    batch_figure,
    batch_table,
    page_batch,
    parse_seeds,
    seed_count,
    spread,
    summary_line,
)
from core.views.emergence import run_emergence
from core.views.emergence_batch import main
from core.views.model_cache import ModelCache

UP = "up_blocks.1.attentions.0"
PROMPTS = ["a red circle and a blue star", "a blue star"]
NAN = math.nan


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return ModelCache().get("tiny")


def pooled(series: list[list[float]]) -> list[tuple[float, float, int]]:
    """Per step, the mean, std and count of the defined values of every series."""
    values = np.array(series, dtype=float)
    counts = (~np.isnan(values)).sum(axis=0)
    return list(zip(np.nanmean(values, axis=0), np.nanstd(values, axis=0), counts, strict=True))


def test_the_command_pools_each_steps_iou_over_runs_and_words(loaded, tmp_path, capsys):
    prompts = [option for prompt in PROMPTS for option in ("--prompt", prompt)]
    argv = [*prompts, "--preset", "tiny", "--seeds", "0", "1", "--steps", "3"]
    argv += ["--out", str(tmp_path)]
    assert main(argv) == 0
    runs = [run_emergence(loaded, p, seed, 3, UP, "cond") for p in PROMPTS for seed in (0, 1)]
    rows = list(csv.DictReader((tmp_path / "batch.csv").read_text().splitlines()))
    annotated = [
        {w for w, (_, how) in run.references.items() if how == "annotation"} for run in runs
    ]
    assert any(set(run.words) - found for run, found in zip(runs, annotated, strict=True))
    for method, scores in (("sae", "ious"), ("attention", "attention_ious")):
        by_word = [
            [(w, s) for w, s in getattr(run, scores).items() if w in found]
            for run, found in zip(runs, annotated, strict=True)
        ]
        for word in ("all", "star"):
            mine = [s for items in by_word for w, s in items if word in (w, "all")]
            found = [r for r in rows if r["word"] == word]
            assert [float(r["t"]) for r in found] == pytest.approx(runs[0].ts)
            for row, (mean, std, n) in zip(found, pooled(mine), strict=True):
                assert int(row[f"{method}_n"]) == n
                np.testing.assert_allclose(
                    [float(row[f"{method}_mean"]), float(row[f"{method}_std"])],
                    [mean, std],
                    equal_nan=True,
                )
    saved = json.loads((tmp_path / "runs.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in saved["runs"]] == [(r.prompt, r.seed) for r in runs]
    for kept, run in zip(saved["runs"], runs, strict=True):
        assert kept["words"] == run.words
        undefined = {w: [NAN if v is None else v for v in s] for w, s in kept["ious"].items()}
        np.testing.assert_allclose(list(undefined.values()), list(run.ious.values()))
    assert (tmp_path / "batch.png").stat().st_size > 0
    assert "4 runs (2 prompts × 2 seeds, 3 steps" in capsys.readouterr().out


def test_spread_leaves_undefined_values_out():
    assert astuple(spread([0.2, NAN, 0.4])) == pytest.approx((0.3, 0.1, 2))
    empty = spread([NAN])
    assert math.isnan(empty.mean) and math.isnan(empty.std) and empty.n == 0


def synthetic() -> BatchResult:
    """Two runs of two steps; "b" has no IoU at the first step, nor a cross-attention map."""
    first = RunScores("p", 0, ["a", "b"], {}, {"a": [0.2, 0.4], "b": [NAN, 0.6]}, {"a": [0, 0]})
    second = RunScores("p", 1, ["a"], {}, {"a": [0.6, 0.8]}, {"a": [0.5, 1]})
    return BatchResult("tiny", UP, "cond", ["p"], [0, 1], [1.0, 0.5], [first, second])


def test_the_figure_and_table_show_both_methods_per_step():
    result = synthetic()
    sae = [astuple(s) for s in result.spreads("sae")]
    assert sae == [pytest.approx((0.4, 0.2, 2)), pytest.approx((0.6, math.sqrt(0.08 / 3), 3))]
    assert result.spreads("sae", "b")[0].n == 0 and result.spreads("attention", "b")[1].n == 0
    ax = batch_figure(result).axes[0]
    assert "over 2 runs (1 prompt × 2 seeds)" in ax.get_title(loc="left")
    labels = [text.get_text() for text in ax.figure.legends[0].get_texts()]
    assert labels == [
        "SAE prediction, mean",
        "SAE prediction, ±1 std",
        "cross-attention, mean",
        "cross-attention, ±1 std",
    ]
    sae, attention = ax.get_lines()
    assert sae.get_linestyle() == "-" and attention.get_linestyle() == "--"
    assert ax.get_xlim()[0] > ax.get_xlim()[1]  # t from 1 to 0, as generation runs
    table = batch_table(result)
    assert len(table) == 2 and all(len(row) == len(TABLE_HEADERS) for row in table)
    assert table[0] == [1.0, 0.4, 0.2, 2, 0.25, 0.25, 2]


def test_seeds_are_typed_as_ranges_or_lists():
    assert [list(r) for r in parse_seeds("0-3")] == [[0, 1, 2, 3]]
    assert [list(r) for r in parse_seeds("0, 1 ,2")] == [[0], [1], [2]]
    assert seed_count(parse_seeds("5, 0 - 3, 2-4")) == 6
    assert seed_count(parse_seeds("0-4294967295")) == 2**32  # counted, never spelled out
    assert page_batch("a cat", "a dog\n\na cat\n", "3, 0-1") == (["a cat", "a dog"], [3, 0, 1])
    assert page_batch("", "a dog", 7) == (["a dog"], [7])


@pytest.mark.parametrize(
    ("prompt", "extra", "seeds", "message"),
    [
        ("a cat", "", "zero", 'The seeds must be whole numbers or ranges such as "0-3" or'),
        ("a cat", "", "3-1", 'The seeds must be whole numbers or ranges such as "0-3" or'),
        ("a cat", "", "-1", 'The seeds must be whole numbers or ranges such as "0-3" or'),
        ("a cat", "", " , ", 'Give at least one seed, such as "0-3" or "0, 1, 2".'),
        ("", " \n", "0", "There is no prompt to run: write the tab's prompt or one a line."),
        ("a cat", "a dog", "0-8", f"18 runs, more than the page runs at once ({MAX_PAGE_RUNS})"),
    ],
)
def test_bad_page_requests_are_one_sentence(prompt, extra, seeds, message):
    with pytest.raises(ValueError) as refused:
        page_batch(prompt, extra, seeds)
    text = refused.value.args[0]
    assert message in text and text.endswith(".") and text.count(". ") == 0


def test_a_word_scored_against_its_own_last_step_is_no_result():
    """A word the annotator did not find is scored against the run's last prediction (1.0 at
    the last step by construction): it is left out of every mean, and the summary says so."""
    found = RunScores("p", 0, ["a"], {"a": "annotation"}, {"a": [0.2, 0.4]}, {"a": [0.1, 0.3]})
    self_scored = {"b": "last step"}
    missed = RunScores("p", 1, ["b"], self_scored, {"b": [0.3, 1.0]}, {"b": [0.2, 0.5]})
    result = BatchResult("tiny", UP, "cond", ["p"], [0, 1], [1.0, 0.5], [found, missed])
    assert [astuple(s) for s in result.spreads("sae")] == [
        pytest.approx((0.2, 0.0, 1)),
        pytest.approx((0.4, 0.0, 1)),
    ]
    assert batch_table(result)[1][1:4] == [0.4, 0.0, 1]
    line = summary_line(result)
    assert "SAE prediction 0.300 ± 0.100 (n=2)" in line
    assert line.endswith(
        "Left out: 1 word the annotator did not find in their run's final image (scored only "
        "against the run's own last step, which is no result)."
    )
    assert "Left out" not in summary_line(synthetic())
