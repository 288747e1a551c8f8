"""Revelio's whole chain on the tiny preset: images -> features -> k-SAEs -> purity, Diff-C."""

import os

from core.revelio.check import CheckConfig, main
from core.shapes.world import SHAPES, write_image_folder
from tests.helpers import assert_defaults_stated_once, command_help


def test_the_check_runs_end_to_end_on_the_tiny_preset(tmp_path, capsys):
    argv = [
        "--out",
        str(tmp_path),
        "--train-per-class",
        "6",
        "--test-per-class",
        "3",
        "--resolution",
        "32",
        "--timesteps",
        "25",
        "500",
        "--ksae-epochs",
        "5",
        "--diffc-epochs",
        "2",
        "--diffc-width",
        "32",
        "--min-fires",
        "1",
    ]
    assert main(argv) == 0
    report = (tmp_path / "report.md").read_text()
    assert capsys.readouterr().out.endswith(report + "\n")
    rows = [line for line in report.splitlines() if "| `" in line]
    assert len(rows) == 8  # 4 layers x 2 timesteps, each with purity and Diff-C top-1
    assert all(" - " not in row for row in rows)
    assert sorted(os.listdir(tmp_path / "images" / "train")) == sorted(SHAPES)


def test_image_folder_is_balanced_and_seeded(tmp_path):
    first = write_image_folder(tmp_path / "a", per_class=2, seed=5, size=32, label="colour")
    second = write_image_folder(tmp_path / "b", per_class=2, seed=5, size=32, label="colour")
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*.png"))
    assert len(names) == 2 * 7 and names == sorted(
        p.relative_to(second).as_posix() for p in second.rglob("*.png")
    )
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)


def test_help_states_each_default_once():
    assert_defaults_stated_once(command_help("core.revelio.check"), CheckConfig)
