"""The evaluations on the tiny pipeline, with hand-written dictionaries, a fake annotator
and tiny random CLIP / CLIPSeg models (built as tests/test_annotate.py builds them)."""

import csv
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from core.annotate.annotation import ObjectAnnotation
from core.annotate.clipseg import ClipSegSegmenter
from core.annotate.labellers import LABELLERS, PAPER_OBJECTS
from core.annotate.scorers import ClipScorer
from core.diffusion.presets import PRESETS, SD14_BLOCKS, STAGE_T
from core.emergence import evaluate
from core.emergence.concepts import ConceptDictionary, save_dictionaries
from core.emergence.evaluate_composition import composition_rows
from core.emergence.evaluate_edits import (
    global_edit_rows,
    global_summary,
    spatial_edit_rows,
    spatial_summary,
)
from core.emergence.evaluate_quality import quality_rows
from core.emergence.words import load_word_vectors
from core.sae.bank import SAEBank
from core.sae.config import SAEConfig
from core.sae.model import TopKSAE
from core.shapes.world import SHAPES
from tests.helpers import command_help, save_clip, save_clipseg

MID = "mid_block.attentions.0"
N, STEPS, SIZE = 16, 4, 32
PROMPTS = ["a cat on a table", "a black cat", "a cat and a tree"]
FAST = dict(steps=STEPS, guidance_scale=7.5, seed=0)


def random_sae(block: str, t: float, seed: int) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(64, N, 4, block=block, t=t))
    with torch.no_grad():
        sae.encoder.bias.uniform_(0.1, 0.5)  # every row keeps k positive latents
    return sae


@pytest.fixture(scope="module")
def bank() -> SAEBank:
    keys = [(b, t) for b in SD14_BLOCKS for t in (1.0, 0.5, 0.0)]
    return SAEBank(random_sae(b, t, i) for i, (b, t) in enumerate(keys))


@pytest.fixture(scope="module")
def all_cat(bank):
    """Every CID means "cat": the predicted cat mask is the whole image at every step."""
    vectors = load_word_vectors()
    return {
        k: ConceptDictionary.from_labels(k, N, {c: ["cat"] for c in range(N)}, vectors)
        for k in bank
    }


@pytest.fixture(scope="module")
def mixed(bank):
    """Half the CIDs "cat", half "dog" / "snow", so cohesion and separability are defined."""
    vectors = load_word_vectors()
    labels = {c: ["cat"] if c < N // 2 else ["dog", "snow"] for c in range(N)}
    return {k: ConceptDictionary.from_labels(k, N, labels, vectors) for k in bank}


class LeftHalfCat:
    """Annotates a cat on the left half of every image, and a tree nowhere asked."""

    def annotate(self, image, prompt=None):
        mask = np.zeros((image.height, image.width), dtype=bool)
        mask[:, : image.width // 2] = True
        return [ObjectAnnotation("cat", mask, 1.0), ObjectAnnotation("tree", ~mask, 1.0)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("eval-models")
    return {"clip": save_clip(root / "clip"), "clipseg": save_clipseg(root / "clipseg")}


def test_composition_known_answer_and_baselines(tiny_pipe, bank, all_cat):
    vectors = load_word_vectors()
    rows = composition_rows(
        tiny_pipe, bank, all_cat, PROMPTS, LeftHalfCat(), vectors, blocks=SD14_BLOCKS, **FAST
    )
    # "cat" is a noun of every prompt; "tree" is one only of the third, and has no CIDs
    assert len(rows) == len(PROMPTS) * len(SD14_BLOCKS) * STEPS
    assert {r["word"] for r in rows} == {"cat"}
    assert {r["block"] for r in rows} == set(SD14_BLOCKS)
    assert all(r["iou"] == pytest.approx(0.5) for r in rows)  # all-on vs the left half
    assert all(r["baseline_mean_iou"] == pytest.approx(1.0) for r in rows)
    assert all(r["baseline_centre_iou"] == pytest.approx(0.2) for r in rows)
    ts = sorted({r["t"] for r in rows}, reverse=True)
    assert len(ts) == STEPS and ts[0] > 0.7 and ts[-1] < 0.01


def test_composition_labels_mode_and_words_without_vectors(tiny_pipe, bank, mixed):
    vectors = load_word_vectors()
    rows = composition_rows(
        tiny_pipe,
        bank,
        mixed,
        PROMPTS[:1],
        LeftHalfCat(),
        vectors,
        blocks=[MID],
        targets="labels",
        **FAST,
    )
    assert {r["word"] for r in rows} == {"cat"}  # "tree" labels no concept
    assert all(0 <= r["iou"] <= 1 for r in rows)
    assert all(math.isnan(r["baseline_mean_iou"]) for r in rows)  # one image: no others
    with pytest.raises(ValueError, match="no word vector for \\['qzxv'\\]"):
        composition_rows(
            tiny_pipe,
            bank,
            mixed,
            PROMPTS,
            LeftHalfCat(),
            vectors,
            blocks=[MID],
            targets=["qzxv"],
            **FAST,
        )


def test_quality_rows(mixed, all_cat):
    vectors = load_word_vectors()
    rows = quality_rows(mixed, vectors)
    assert len(rows) == 9 and [r["t"] for r in rows[:3]] == [1.0, 0.5, 0.0]
    assert rows[0]["paper_cohesion"] == 0.588 and rows[2]["paper_separability"] == 0.344
    row = rows[0]
    assert 0 < row["cohesion"] < 1 and -1 <= row["separability"] < 1
    assert quality_rows(all_cat, vectors)[0]["separability"] == pytest.approx(1.0)


def test_spatial_edits_rows_and_summary(tiny_pipe, bank, mixed, models):
    segmenter = ClipSegSegmenter(str(models["clipseg"]), device="cpu")
    rows = spatial_edit_rows(
        tiny_pipe,
        bank,
        mixed,
        ["cat", "qzxv"],
        segmenter,
        quadrants=("top_left", "bottom_right"),
        **FAST,
    )
    assert len(rows) == 1 * 2 * 3  # "qzxv" labels nothing and is skipped
    assert {r["stage"] for r in rows} == {"early", "middle", "final"}
    assert {r["strength"] for r in rows} == {4000.0, 400.0, 1000.0}
    for row in rows:
        assert row["success"] == int(row["found_quadrant"] == row["quadrant"])
        sae = f"{MID} (t={STAGE_T[row['stage']]:g}, cond)"  # each stage edits with its own SAE
        assert row["edits"].startswith("edited ") and sae in row["edits"]
        assert row["edits"].endswith("; skipped none")
    summary = {r["stage"]: r for r in spatial_summary(rows)}
    for stage, row in summary.items():
        mine = [r["success"] for r in rows if r["stage"] == stage]
        assert row["success_rate"] == pytest.approx(np.mean(mine)) and row["n"] == len(mine)
    assert summary["early"]["paper"] == 0.80


def test_global_edits_change_the_image(tiny_pipe, bank, mixed, models):
    scorer = ClipScorer(str(models["clip"]), device="cpu")
    rows = global_edit_rows(tiny_pipe, bank, mixed, ["snow"], PROMPTS[:2], scorer, **FAST)
    assert len(rows) == 2 * 3
    for row in rows:
        assert row["delta_clip"] == pytest.approx(row["clip_after"] - row["clip_before"])
        assert row["success"] == int(row["delta_clip"] > 0)
        assert math.isnan(row["lpips"])
    assert all(r["pixel_diff"] >= 0 for r in rows)
    # editing from the first step changes the image; an edit of the last step alone may
    # vanish in 8-bit rounding on the tiny model
    assert all(r["pixel_diff"] > 0 for r in rows if r["stage"] == "early")
    summary = global_summary(rows)
    assert [r["stage"] for r in summary] == ["early", "middle", "final"]
    assert summary[1]["mean_delta_clip"] == pytest.approx(
        np.mean([r["delta_clip"] for r in rows if r["stage"] == "middle"])
    )


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_csvs_plots_and_summaries(
    tiny_pipe, bank, mixed, models, tmp_path, monkeypatch, capsys
):
    bank.save_pretrained(tmp_path / "bank")
    save_dictionaries(mixed.values(), tmp_path / "bank")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    left_half = replace(LABELLERS["grounded-sam"], annotator=lambda c, d: LeftHalfCat())
    monkeypatch.setitem(LABELLERS, "grounded-sam", left_half)
    out = tmp_path / "eval"
    code = evaluate.main(
        [
            "--preset",
            "tiny",
            "--saes",
            str(tmp_path / "bank"),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--device",
            "cpu",
            "--limit",
            "2",
            "--objects",
            "cat",
            "dog",
            "--quadrants",
            "top_left",
            "--concepts",
            "snow",
            "--annotator",
            "grounded-sam",
            "--clip-model",
            str(models["clip"]),
            "--clipseg-model",
            str(models["clipseg"]),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    for name in ("composition", "quality", "spatial", "global"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.png").stat().st_size > 0
    composition = read_csv(out / "composition.csv")
    assert {"prompt", "seed", "block", "branch", "step", "t", "word", "iou"} <= set(composition[0])
    assert len(composition) == 2 * 3 * STEPS and all(0 <= float(r["iou"]) <= 1 for r in composition)
    spatial = read_csv(out / "spatial.csv")
    assert len(spatial) == 2 * 1 * 3
    for row in read_csv(out / "spatial_summary.csv"):
        mine = [int(r["success"]) for r in spatial if r["stage"] == row["stage"]]
        assert float(row["success_rate"]) == pytest.approx(np.mean(mine))
        assert f"{np.mean(mine):.3f}" in printed.out
    assert "LPIPS is unavailable" in printed.out and printed.out.count("LPIPS is unavailable") == 1
    assert len(read_csv(out / "global_summary.csv")) == 3


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--tasks", "quality", "--dictionaries", "MISSING"], "does not exist"),
        (["--tasks", "composition", "--targets", "cat,qzxv"], "no word vector for ['qzxv']"),
        (["--tasks", "spatial", "--objects", "qzxv"], "none of ['qzxv'] labels a concept"),
        (["--tasks", "global", "--prompts", "EMPTY"], "has no prompts"),
    ],
)
def test_cli_errors_are_one_line(bank, mixed, tmp_path, capsys, extra, expected):
    bank.save_pretrained(tmp_path / "bank")
    save_dictionaries(mixed.values(), tmp_path / "bank")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n")
    extra = [
        str(tmp_path / "missing")
        if a == "MISSING"
        else str(tmp_path / "empty.txt")
        if a == "EMPTY"
        else a
        for a in extra
    ]
    code = evaluate.main(
        [
            "--preset",
            "tiny",
            "--saes",
            str(tmp_path / "bank"),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err


def test_help_from_the_command_line_states_the_defaults():
    text = " ".join(command_help("core.emergence.evaluate").split())
    assert "--edit-block" in text and "(default: the preset's steering block)" in text
    assert "(default: CIDAS/clipseg-rd64-refined)" in text
    assert "--tags {vision,prompt,prompt+vision}" in text and "(default: vision)" in text
    config = evaluate.EvaluateConfig(out="out", tasks=("quality",), dictionaries="dicts")
    assert config.annotation.tags == "vision"
    assert "(default: None)" not in text


def test_the_defaults_come_from_the_preset():
    config = evaluate.EvaluateConfig(out="out", preset="tiny")
    tiny = PRESETS["tiny"]
    assert (config.saes, config.prompts) == (tiny.sae_source, tiny.prompts)
    assert (config.edit_block, config.annotation.annotator) == (tiny.app.steer_block, "toy")
    assert (config.targets, config.objects) == ("labels", SHAPES)
    paper = evaluate.EvaluateConfig(out="out", preset="sd14", saes="saes", prompts="p.txt")
    assert (paper.edit_block, paper.annotation.annotator) == (MID, "grounded-sam")
    assert paper.objects == PAPER_OBJECTS and paper.targets == "nouns"
    with pytest.raises(ValueError, match="--saes is needed for .*'sd14' has no SAEs of its own"):
        evaluate.EvaluateConfig(out="out", preset="sd14", prompts="p.txt")


def test_the_defaults_run_offline_on_the_shipped_preset(tmp_path, capsys):
    """Everything as shipped but the number of prompts: the preset's file holds hundreds."""
    torch.set_num_threads(1)  # on a small shared CPU, more threads spin against each other
    code = evaluate.main(["--out", str(tmp_path), "--limit", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    for name in ("composition", "quality", "spatial", "global"):
        assert (tmp_path / f"{name}.csv").is_file() and (tmp_path / f"{name}.png").is_file()
    assert "labelled by annotator toy" in printed.out
