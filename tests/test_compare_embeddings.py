"""Word vectors against the pipeline's text encoder, on the same evidence."""

import json

from core.emergence.compare_embeddings import CompareConfig, main
from core.files import ASSETS
from tests.helpers import assert_defaults_stated_once, command_help

TINY = ["--saes", str(ASSETS / "tiny" / "saes"), "--annotator", "toy", "--iou-threshold", "0.2"]


def test_both_sources_are_scored_on_the_same_evidence(tmp_path):
    prompts = tmp_path / "prompts.txt"
    shapes = ("circle", "star", "square", "cross", "triangle", "diamond")
    prompts.write_text("".join(f"a red {shape} on a gray plain background\n" for shape in shapes))
    argv = [*TINY, "--prompts", str(prompts), "--out", str(tmp_path / "out")]
    assert main([*argv, "--dictionary-prompts", "4", "--composition-prompts", "2"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) == {"glove-6b-50d", "text-encoder:tiny"}
    assert all(0 <= numbers["separability"] <= 2 for numbers in summary.values())


def test_too_few_prompts_to_hold_some_out_is_one_sentence(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert main([*TINY, "--prompts", str(prompts), "--out", str(tmp_path)]) == 2
    assert "needs more than --dictionary-prompts (40)" in capsys.readouterr().err


def test_help_states_each_default_once():
    assert_defaults_stated_once(command_help("core.emergence.compare_embeddings"), CompareConfig)
