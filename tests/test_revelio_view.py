"""The revelio tab's service functions, on the shipped demo and on synthetic caches."""

from pathlib import Path

import numpy as np
import pytest
import torch

from core.files import REPO_ROOT
from core.revelio.feature_cache import load_features, load_meta
from core.revelio.ksae import paper_config, train_cache
from core.revelio.latents import chance_purity, latent_purity, most_activating_latents
from core.revelio.pca import pca_images
from core.views import revelio as rv
from tests.helpers import write_cache

DEMO = rv.DEMO_CACHE, rv.DEMO_SAES
UP1 = ("up_blocks.1", 25)


@pytest.fixture(autouse=True)
def readable_tmp(tmp_path, monkeypatch):
    """Synthetic caches live in tmp_path, which the page may read only when told."""
    monkeypatch.setenv(rv.ROOTS_ENV, str(tmp_path))


pytestmark = pytest.mark.usefixtures("one_thread")


def train_small(cache: Path, out: Path, seed: int = 0) -> None:
    cfg = paper_config(expansion_factor=2, k=8, warmup_steps=5, seed=seed)
    train_cache(cache, out, cfg, epochs=20, overwrite=True)


def test_the_demo_holds_ksaes_everywhere_and_maps_except_up_ft2():
    found = rv.contents(*DEMO)
    layers = ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert found.ksae_pairs == [(layer, t) for layer in layers for t in (25, 250)]
    assert found.map_pairs == [(layer, t) for layer in layers[:3] for t in (25, 250)]
    assert len(found.meta) == 120 and len(found.meta.classes) == 6


def test_relative_folders_are_found_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        rv.find_folder("assets/revelio-demo/cache", "cache")
        == REPO_ROOT / "assets/revelio-demo/cache"
    )
    assert rv.find_folder(" ", "image", required=False) is None
    with pytest.raises(ValueError, match="give the cache folder"):
        rv.find_folder("", "cache")
    with pytest.raises(FileNotFoundError, match="the cache folder nowhere does not exist"):
        rv.find_folder("nowhere", "cache")


def test_purity_rows_are_core_purity_of_each_pair():
    rows = rv.purity_table(*DEMO)
    assert [row[:2] for row in rows][4] == ["up_ft1 (up_blocks.1)", 25]
    meta = load_meta(rv.DEMO_CACHE)
    summary = rv.summary(rv.DEMO_CACHE, rv.DEMO_SAES, UP1)
    measured, chosen = latent_purity(summary, meta.labels, 6)
    chance = chance_purity(meta.labels, 10, len(chosen), 6)
    expected = [measured.sigma_label, measured.majority_fraction, measured.entropy]
    expected += [chance.sigma_label, chance.majority_fraction, chance.entropy]
    assert rows[4][2] == len(chosen)
    assert rows[4][3:] == [round(value, 3) for value in expected]


def test_purest_latents_rank_the_most_activating_by_majority():
    meta = load_meta(rv.DEMO_CACHE)
    summary = rv.summary(rv.DEMO_CACHE, rv.DEMO_SAES, UP1)
    ranked, majority = rv.purest_latents(summary, meta.labels)
    assert set(ranked.tolist()) == set(most_activating_latents(summary).tolist())
    assert torch.all(majority[:-1] >= majority[1:])
    top_labels = [meta.labels[i] for i in summary.top_images[ranked[0], :10].tolist()]
    assert max(top_labels.count(c) for c in set(top_labels)) / 10 == pytest.approx(
        majority[0].item()
    )
    assert rv.choose_latent(summary, meta.labels, "purest", 0) == ranked[0]
    assert rv.choose_latent(summary, meta.labels, "id", "7") == 7


@pytest.mark.parametrize(
    ("by", "number", "message"),
    [
        ("id", 128, "latent 128 is out of range; the k-SAE has 128"),
        ("id", -1, "latent -1 is out of range"),
        ("purest", 10_000, "rank 10000 is out of range"),
        ("id", 2.5, "the latent must be a whole number, got 2.5"),
        ("best", 0, 'choose the latent "by" purest or id'),
    ],
)
def test_a_latent_that_is_not_there_is_refused(by, number, message):
    summary = rv.summary(rv.DEMO_CACHE, rv.DEMO_SAES, UP1)
    with pytest.raises(ValueError, match=message):
        rv.choose_latent(summary, load_meta(rv.DEMO_CACHE).labels, by, number)


def test_inspect_lists_the_top_images_with_their_labels_and_draws_them():
    meta = load_meta(rv.DEMO_CACHE)
    view = rv.inspect_latent(*DEMO, rv.DEMO_IMAGES, "up_ft1", "25", "id", 3)
    assert view.latent == 3 and 0 < len(view.rows) <= 10
    for rank, (position, index, file, label, activation) in enumerate(view.rows):
        assert position == rank and file == meta.images[index]
        assert label == meta.classes[meta.labels[index]] and activation > 0
        assert file.startswith(f"{label}/")  # the demo's class is its folder
    assert [row[4] for row in view.rows] == sorted((row[4] for row in view.rows), reverse=True)
    assert view.grid.size == (5 * 128, (len(view.rows) + 4) // 5 * (128 + 14))
    assert view.note.startswith("Latent 3 of 128 at up_ft1 (up_blocks.1), t=25, fires on ")
    blind = rv.inspect_latent(*DEMO, None, "up_ft1", 25, "id", 3)
    assert blind.grid is None and blind.rows == view.rows
    assert blind.note.endswith(
        "No image folder given, so no grid: the table has its top images' labels."
    )


def test_unknown_pairs_and_missing_ksaes_are_named(tmp_path):
    with pytest.raises(ValueError, match="layer up_blocks.3 is not in the cache; it holds mid"):
        rv.inspect_latent(*DEMO, None, "up_blocks.3", 25)
    with pytest.raises(ValueError, match="choose a layer"):
        rv.inspect_latent(*DEMO, None, "", 25)
    write_cache(tmp_path / "cache")
    train_small(tmp_path / "cache", tmp_path / "saes")
    (tmp_path / "saes" / "up_blocks.1" / "t0200" / "cfg.json").unlink()
    with pytest.raises(ValueError, match="no k-SAE for up_blocks.1 t=200 in .*; it holds mid"):
        rv.inspect_latent(tmp_path / "cache", tmp_path / "saes", None, "up_blocks.1", 200)
    with pytest.raises(ValueError, match="holds no k-SAE for the cache's layers"):
        rv.contents(tmp_path / "cache", tmp_path)


def test_a_retrained_ksae_is_summarized_again(tmp_path):
    write_cache(tmp_path / "cache", maps=False)
    train_small(tmp_path / "cache", tmp_path / "saes", seed=0)
    pair = ("mid_block", 25)
    before = rv.summary(tmp_path / "cache", tmp_path / "saes", pair)
    assert rv.summary(tmp_path / "cache", tmp_path / "saes", pair) is before
    train_small(tmp_path / "cache", tmp_path / "saes", seed=1)
    after = rv.summary(tmp_path / "cache", tmp_path / "saes", pair)
    assert not torch.equal(before.act_sum, after.act_sum)
    assert rv.contents(tmp_path / "cache", tmp_path / "saes").map_pairs == []
    with pytest.raises(ValueError, match=r"no feature maps for mid_block t=25 \(maps: none\)"):
        rv.pca_view(tmp_path / "cache", None, "bottleneck", 25)


def test_pca_maps_come_from_one_pca_over_the_images_shown():
    panels = rv.pca_view(rv.DEMO_CACHE, rv.DEMO_IMAGES, "up_ft1", 250, "2-3, 7")
    meta = load_meta(rv.DEMO_CACHE)
    captions = [f"2: {meta.classes[meta.labels[2]]}", "2: PCA"]
    assert [caption for _, caption in panels[:2]] == captions
    assert len(panels) == 6 and all(image.size == (256, 256) for image, _ in panels)
    maps = load_features(rv.DEMO_CACHE, "up_blocks.1", 250, "maps")[[2, 3, 7]]
    joint = pca_images(maps, size=256)
    for (image, _), expected in zip(panels[1::2], joint, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(expected))
    alone = rv.pca_view(rv.DEMO_CACHE, None, "up_ft1", 250, "2")
    assert len(alone) == 1 and not np.array_equal(np.asarray(alone[0][0]), np.asarray(joint[0]))


LABELS = [0] * 5 + [1] * 3 + [2] * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", [0, 5, 8]), ("0-2, 9", [0, 1, 2, 9]), ("4 5", [4, 5]), ("6-6", [6])],
)
def test_image_indices_are_read_from_text(text, expected):
    assert rv.parse_indices(text, LABELS) == expected


def test_without_indices_each_class_shows_its_first_image():
    assert rv.default_indices([2, 0, 2, 1, 0]) == [0, 1, 3]
    assert rv.default_indices(list(range(12))) == list(range(8))
    assert rv.default_indices([0] * 12) == list(range(8))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: rv.parse_indices("a-b", LABELS), 'numbers and ranges like "0-7, 12"'),
        (lambda: rv.parse_indices("0-40", LABELS), "choose 1 to 32 images, got 41"),
        (lambda: rv.pca_view(rv.DEMO_CACHE, None, "up_ft1", 25, "119-121"), "outside 0..119"),
        (lambda: rv.pca_view(rv.DEMO_CACHE, None, "up_ft2", 25), "extract with --maps"),
        (lambda: rv.pca_view(rv.DEMO_CACHE, None, "up_ft1", "late"), "whole number, got 'late'"),
    ],
)
def test_bad_pca_requests_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_latents_that_fire_too_rarely_are_not_measured_or_ranked(tmp_path):
    write_cache(tmp_path / "cache", per_class=3, maps=False)  # 9 images: none fires on > 10
    train_small(tmp_path / "cache", tmp_path / "saes")
    rows = rv.purity_table(tmp_path / "cache", tmp_path / "saes")
    assert len(rows) == 4 and all(row[2:] == [0, *[None] * 6] for row in rows)
    with pytest.raises(ValueError, match="so none is ranked; choose a latent by id"):
        rv.inspect_latent(tmp_path / "cache", tmp_path / "saes", None, "mid_block", 25)
    view = rv.inspect_latent(tmp_path / "cache", tmp_path / "saes", None, "mid_block", 25, "id", 0)
    assert view.latent == 0 and len(view.rows) <= 9


def test_folders_outside_the_readable_roots_are_refused(tmp_path, monkeypatch):
    write_cache(tmp_path / "cache")
    monkeypatch.setenv(rv.ROOTS_ENV, "")
    with pytest.raises(PermissionError, match="outside the folders this page may read"):
        rv.find_folder(tmp_path / "cache", "feature cache")
    assert rv.find_folder(rv.DEMO_CACHE, "feature cache") == rv.DEMO_CACHE


@pytest.mark.parametrize("where", ["/etc", "/no-such-folder", "../../no-such-folder", "/tmp"])
def test_outside_the_readable_roots_nothing_tells_whether_a_folder_exists(where, monkeypatch):
    monkeypatch.setenv(rv.ROOTS_ENV, "")
    with pytest.raises(PermissionError) as raised:
        rv.find_folder(where, "cache")
    assert str(raised.value) == (
        f"the cache folder {where} is outside the folders this page may read (assets/, runs/ "
        f"and {rv.ROOTS_ENV}); add its parent to {rv.ROOTS_ENV}"
    )
