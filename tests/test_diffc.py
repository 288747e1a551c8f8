import csv
import math

import pytest
import torch

from core.revelio import diffc
from core.revelio.feature_cache import FeatureMeta, load_features, save_meta
from tests.helpers import assert_defaults_stated_once, command_help, write_cache


@torch.no_grad()
def test_architecture_matches_table_10():
    torch.manual_seed(0)
    model = diffc.DiffC(diffc.DiffCConfig(in_channels=4, num_classes=5)).eval()
    shapes = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "pool"):
        module = getattr(model, name)
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    logits = model(torch.randn(2, 4, 16, 16))
    assert shapes == {
        "conv1": (2, 1024, 16, 16),
        "conv2": (2, 1024, 8, 8),
        "conv3": (2, 1024, 4, 4),
        "conv4": (2, 1024, 2, 2),
        "pool": (2, 1024, 1, 1),
    }
    assert logits.shape == (2, 5)
    convs = [getattr(model, f"conv{i}")[0] for i in range(1, 5)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 4
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    with torch.device("meta"):
        sd = diffc.DiffC(diffc.DiffCConfig(in_channels=1280, num_classes=37))
    assert 40.0e6 < sum(p.numel() for p in sd.parameters()) < 40.3e6  # "40M params"


def test_learns_a_separable_task_with_the_paper_recipe(one_thread):
    generator = torch.Generator().manual_seed(0)
    labels = [c for c in range(3) for _ in range(10)]
    prototypes = torch.randn(3, 8, 1, 1, generator=generator)
    maps = (prototypes[labels] + torch.randn(30, 8, 4, 4, generator=generator)).half()
    train, test = diffc.stratified_split(labels, 0.3)
    data = maps[train], torch.tensor(labels)[train], maps[test], torch.tensor(labels)[test]
    cfg = diffc.DiffCConfig(in_channels=8, num_classes=3)
    result = diffc.train_diffc(*data, cfg, diffc.Recipe(epochs=3))
    assert result.top1 >= 0.85 and result.train_top1 == 1.0
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] / 5
    cosine = [5e-5 + 5e-5 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert [h["lr"] for h in result.history] == pytest.approx(cosine)


def test_stratified_split_is_seeded_and_keeps_class_shares():
    labels = [0] * 10 + [1] * 5 + [2] * 2
    train, test = diffc.stratified_split(labels, 0.2, seed=1)
    assert sorted(train.tolist() + test.tolist()) == list(range(17))
    assert torch.bincount(torch.tensor(labels)[test]).tolist() == [2, 1, 1]
    again = diffc.stratified_split(labels, 0.2, seed=1)
    assert torch.equal(again[1], test)
    assert not torch.equal(diffc.stratified_split(labels, 0.2, seed=2)[1], test)
    with pytest.raises(ValueError, match="test fraction"):
        diffc.stratified_split(labels, 1.0)


def test_a_split_in_the_meta_is_used():
    meta = FeatureMeta("m", ["mid_block"], [25], ["a", "b"], [0, 1, 0], ["x", "y", "z"])
    meta.extra["split"] = ["train", "test", "train"]
    train, test = diffc.cache_split(meta, 0.5, seed=0)
    assert train.tolist() == [0, 2] and test.tolist() == [1]
    meta.extra["split"] = ["train", "val", "train"]
    with pytest.raises(ValueError, match='"train" or "test" for each of the 3 images'):
        diffc.cache_split(meta, 0.5, seed=0)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = diffc.DiffC(diffc.DiffCConfig(in_channels=3, num_classes=2, width=8)).eval()
    path = diffc.save_diffc(tmp_path / "head" / diffc.WEIGHTS_FILE, model, {"top1": 0.5})
    loaded, info = diffc.load_diffc(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info == {"top1": 0.5} and loaded.cfg == model.cfg


def test_cli_reports_top1_per_layer_and_timestep(tmp_path, capsys):
    write_cache(tmp_path / "cache", per_class=6, size=4)
    out = tmp_path / "diffc"
    args = ["--cache", str(tmp_path / "cache"), "--out", str(out), "--width", "16"]
    assert diffc.main(args + ["--epochs", "1", "--test-fraction", "0.34", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 test accuracy (%), 6 test images" in printed
    assert printed.splitlines()[1].split() == ["timestep", "mid_block", "up_blocks.1"]
    with open(out / diffc.CSV_FILE) as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], r["timestep"]) for r in rows] == [
        ("mid_block", "25"),
        ("mid_block", "200"),
        ("up_blocks.1", "25"),
        ("up_blocks.1", "200"),
    ]
    assert rows[0]["test_images"] == "6" and rows[0]["channels"] == "8"
    assert 0 <= float(rows[0]["top1"]) <= 1
    model, info = diffc.load_diffc(out / "up_blocks.1" / "t0200" / diffc.WEIGHTS_FILE)
    assert model.cfg.width == 16 and info["classes"] == ["class0", "class1", "class2"]
    assert info["recipe"]["lr"] == 1e-4 and info["recipe"]["min_lr"] == 5e-5
    assert (out / "up_blocks.1" / "t0200" / "history.json").is_file()
    maps = load_features(tmp_path / "cache", "up_blocks.1", 200, "maps")
    assert model(maps[:2].float()).shape == (2, 3)


def test_cli_evaluates_on_a_test_cache(tmp_path, capsys):
    write_cache(tmp_path / "train", per_class=4, size=4)
    write_cache(tmp_path / "test", per_class=3, size=4, seed=1)
    args = ["--cache", str(tmp_path / "train"), "--out", str(tmp_path / "o"), "--width", "16"]
    args += ["--layers", "bottleneck", "--timesteps", "25", "--epochs", "1"]
    assert diffc.main(args + ["--test-cache", str(tmp_path / "test")]) == 0
    assert "9 test images" in capsys.readouterr().out
    with open(tmp_path / "o" / diffc.CSV_FILE) as f:
        (row,) = csv.DictReader(f)
    assert (row["layer"], row["train_images"], row["test_images"]) == ("mid_block", "12", "9")
    write_cache(tmp_path / "other", num_classes=2, size=4)
    assert diffc.main(args + ["--test-cache", str(tmp_path / "other")]) == 2
    assert "has other classes than" in capsys.readouterr().err


def test_cli_without_maps_says_to_re_extract(tmp_path, capsys):
    write_cache(tmp_path / "cache", maps=False)
    assert diffc.main(["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the cache at") and "re-extract the features with --maps" in err
    assert err.count("\n") == 1


def test_cli_without_test_images_is_one_line(tmp_path, capsys):
    meta = write_cache(tmp_path / "cache", per_class=2, size=4)
    meta.extra["split"] = ["train"] * len(meta)
    save_meta(tmp_path / "cache", meta)
    assert diffc.main(["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o")]) == 2
    assert "no test images" in capsys.readouterr().err


def test_help_states_each_default_once():
    assert_defaults_stated_once(command_help("core.revelio.diffc"), diffc.DiffCRunConfig)
