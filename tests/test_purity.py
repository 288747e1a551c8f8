import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.revelio import ksae, latents, purity
from core.revelio.feature_cache import load_meta
from core.sae.config import SAEConfig
from core.sae.model import TopKSAE
from tests.helpers import assert_defaults_stated_once, command_help, write_cache

HALF = [0] * 5 + [1] * 5
ONE_OUT = [0] * 9 + [9]


def test_sigma_label_matches_a_hand_computation():
    assert latents.sigma_label(torch.tensor([[3] * 10, [7] * 10])) == 0.0
    # sample std (n - 1): 5 zeros and 5 ones -> sqrt(10 * 0.25 / 9); 9 zeros and a 9 -> sqrt(8.1)
    expected = (math.sqrt(2.5 / 9) + math.sqrt(8.1)) / 2
    assert latents.sigma_label(torch.tensor([HALF, ONE_OUT])) == pytest.approx(expected)


def test_majority_and_entropy_match_hand_computations():
    sets = torch.tensor([[3] * 10, HALF, ONE_OUT])
    assert latents.majority_fraction(sets) == pytest.approx((1 + 0.5 + 0.9) / 3)
    half = math.log(2) / math.log(10)
    one_out = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(10)
    assert latents.label_entropy(sets, num_classes=37) == pytest.approx((0 + half + one_out) / 3)
    # with 2 classes the ceiling is log 2: an even split is maximally impure
    assert latents.label_entropy(torch.tensor([HALF]), num_classes=2) == pytest.approx(1.0)


def test_only_sigma_label_depends_on_class_numbering():
    sets = torch.tensor([HALF, ONE_OUT, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    permutation = torch.tensor([4, 9, 0, 7, 1, 8, 2, 6, 3, 5])  # class c is renamed permutation[c]
    before, after = latents.purity(sets, 10), latents.purity(permutation[sets], 10)
    assert after.majority_fraction == pytest.approx(before.majority_fraction)
    assert after.entropy == pytest.approx(before.entropy)
    assert after.sigma_label != pytest.approx(before.sigma_label)
    # classes 0 and 1 renamed 4 and 9: the same half-and-half latent looks 5 times less pure
    half = torch.tensor([HALF])
    assert latents.sigma_label(permutation[half]) == pytest.approx(5 * latents.sigma_label(half))
    # and sigma_label ranks it purer than a 9-in-10 latent, which the other two measures do not
    one_out = torch.tensor([ONE_OUT])
    assert latents.sigma_label(half) < latents.sigma_label(one_out)
    assert latents.majority_fraction(half) < latents.majority_fraction(one_out)
    assert latents.label_entropy(half, 10) > latents.label_entropy(one_out, 10)


def test_bad_label_sets_are_refused():
    with pytest.raises(ValueError, match="images >= 2"):
        latents.sigma_label(torch.tensor([[1]]))


def class_sae(num_classes: int) -> TopKSAE:
    """An SAE whose latent c reads (and writes) axis c: one latent per class, k = 1."""
    sae = TopKSAE(SAEConfig(d_in=num_classes, num_latents=num_classes, k=1))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(num_classes))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.eye(num_classes))
        sae.b_dec.zero_()
    return sae


def class_features(labels: list[int], num_classes: int, scale: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), num_classes).float() * scale[:, None]


def test_pure_latents_have_zero_sigma_and_full_majority():
    labels = [c for c in range(3) for _ in range(12)]
    scale = torch.linspace(1, 2, len(labels)) * torch.tensor(labels).add(1)  # class 2 is loudest
    summary = latents.summarize_latents(class_sae(3), class_features(labels, 3, scale), 10)
    assert summary.fire_count.tolist() == [12, 12, 12]
    assert summary.top_images[0].tolist() == list(range(11, 1, -1))  # largest activation first
    assert latents.most_activating_latents(summary, 2).tolist() == [2, 1]
    measured, chosen = latents.latent_purity(summary, labels, 3, latents=1000, images=10)
    assert chosen.tolist() == [2, 1, 0]
    assert (measured.sigma_label, measured.majority_fraction, measured.entropy) == (0, 1, 0)
    assert measured.num_latents == 3
    chance = latents.chance_purity(labels, 10, 200, 3)
    assert chance.sigma_label > 0.6 and chance.majority_fraction < 0.7 and chance.entropy > 0.8


def test_latents_firing_on_few_images_are_left_out():
    labels = [0] * 11 + [1] * 10
    summary = latents.summarize_latents(class_sae(2), class_features(labels, 2, torch.ones(21)), 10)
    assert latents.most_activating_latents(summary, min_fires=10).tolist() == [0]
    with pytest.raises(ValueError, match="no latent fires on more than 11 images"):
        latents.latent_purity(summary, labels, 2, min_fires=11)


def test_a_rare_impure_latent_does_not_count():
    """Latent 0 fires on 11 images of class 0; latent 1 on 10 images, half of each class."""
    labels = [0] * 11 + HALF
    axis = [0] * 11 + [1] * 10
    features = class_features(axis, 2, torch.linspace(1, 2, len(axis)))
    summary = latents.summarize_latents(class_sae(2), features, 10)
    assert summary.fire_count.tolist() == [11, 10]
    measured, chosen = latents.latent_purity(summary, labels, 2)  # the paper's: more than 10
    assert chosen.tolist() == [0] and measured.sigma_label == 0.0
    measured, chosen = latents.latent_purity(summary, labels, 2, min_fires=9)
    assert chosen.tolist() == [1, 0]  # latent 1's images are brighter
    assert measured.sigma_label == pytest.approx(math.sqrt(2.5 / 9) / 2)


def mixing_sae() -> TopKSAE:
    """k = 1; latents 0 and 1 read axes 0 and 1, latent 2 reads half of each, so it is never
    the top latent of an image that lies on one axis: the k-sparse code never uses it."""
    sae = TopKSAE(SAEConfig(d_in=2, num_latents=3, k=1))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.eye(3, 2))
        sae.b_dec.zero_()
    return sae


def test_dense_scores_count_latents_the_topk_code_leaves_out():
    labels = [i % 2 for i in range(24)]  # classes alternate; image i has size i + 1
    features = class_features(labels, 2, torch.arange(1.0, 25.0))
    dense = latents.summarize_latents(mixing_sae(), features, 10)  # the default: dense
    assert dense.fire_count.tolist() == [12, 12, 24]
    assert dense.top_images[2].tolist() == list(range(23, 13, -1))  # 5 of each class
    measured, chosen = latents.latent_purity(dense, labels, 2)
    assert chosen.tolist() == [1, 0, 2]  # mean score 13, 12 and 6.25
    assert measured.sigma_label == pytest.approx(math.sqrt(2.5 / 9) / 3)
    assert measured.majority_fraction == pytest.approx((1 + 1 + 0.5) / 3)
    top_two, _ = latents.latent_purity(dense, labels, 2, latents=2)
    assert top_two.sigma_label == 0.0
    code = latents.summarize_latents(mixing_sae(), features, 10, activations="code")
    assert code.fire_count.tolist() == [12, 12, 0]
    measured, chosen = latents.latent_purity(code, labels, 2)
    assert chosen.tolist() == [1, 0] and measured.sigma_label == 0.0


def test_summary_in_chunks_equals_the_dense_computation():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_in=6, num_latents=24, k=3))
    x = torch.randn(50, 6)
    dense_scores = torch.relu(x @ sae.encoder.weight.T + sae.encoder.bias).detach().T
    for activations, scores in (("code", sae.encode_dense(x).detach().T), ("dense", dense_scores)):
        values, images = scores.topk(5, dim=1)
        for chunk in (7, 1000):
            summary = latents.summarize_latents(sae, x, 5, activations=activations, chunk=chunk)
            assert torch.allclose(summary.top_values, values)
            firing = values > 0  # zero activations tie, so only firing images have a fixed order
            assert torch.equal(summary.top_images[firing], images[firing])
            assert torch.equal(summary.fire_count, (scores > 0).sum(dim=1))
            assert torch.allclose(summary.act_sum, scores.double().sum(dim=1))
    default = latents.summarize_latents(sae, x, 5)
    assert torch.allclose(default.top_values, dense_scores.topk(5, dim=1).values)


def write_images(folder, meta) -> None:
    folder.mkdir()
    colours = ["red", "green", "blue", "yellow"]
    for name, label in zip(meta.images, meta.labels, strict=True):
        Image.new("RGB", (20, 20), colours[label]).save(folder / name)


def test_latent_grid_shows_the_top_images_with_their_classes(tmp_path):
    meta = write_cache(tmp_path / "cache", maps=False)
    write_images(tmp_path / "images", meta)
    scale = torch.arange(1, len(meta.labels) + 1).float()
    features = class_features(meta.labels, 3, scale)
    summary = latents.summarize_latents(class_sae(3), features, 10)
    load = latents.image_loader(tmp_path / "images", meta)
    grid = latents.latent_grid(summary, 1, load, meta, images=7, columns=4, tile=32)
    assert grid.size == (4 * 32, 2 * (32 + 14))
    assert grid.getpixel((5, 5)) == (0, 128, 0)  # class 1 is green
    assert latents.image_grid([load(0)] * 3, columns=2, tile=10).size == (20, 20)
    empty = latents.summarize_latents(class_sae(4), torch.nn.functional.pad(features, (0, 1)), 10)
    with pytest.raises(ValueError, match="latent 3 fires on none of the images"):
        latents.latent_grid(empty, 3, load, meta)
    with pytest.raises(FileNotFoundError, match="img000.png"):
        latents.image_loader(tmp_path, meta)(0)


def test_cli_prints_purity_beside_chance_and_draws_grids(tmp_path, capsys):
    meta = write_cache(tmp_path / "cache", maps=False, per_class=15)
    write_images(tmp_path / "images", meta)
    cfg = ksae.paper_config(expansion_factor=2, k=2, warmup_steps=5, batch_size=16)
    ksae.train_cache(tmp_path / "cache", tmp_path / "saes", cfg, epochs=10, timesteps=[25])
    args = ["--cache", str(tmp_path / "cache"), "--saes", str(tmp_path / "saes")]
    grids = ["--images", str(tmp_path / "images"), "--grids", str(tmp_path / "grids")]
    more = ["--csv", str(tmp_path / "purity.csv"), "--device", "cpu"]
    assert purity.main(args + grids + more) == 0
    out = capsys.readouterr().out
    assert "sigma_label" in out and "chance" in out
    assert len(out.strip().splitlines()) == 3  # a header and the two layers' rows at t=25
    assert list((tmp_path / "grids" / "mid_block" / "t0025").glob("latent*.png"))
    lines = (tmp_path / "purity.csv").read_text().splitlines()
    assert lines[0].startswith("layer,timestep,latents,sigma_label,majority_fraction,entropy")
    assert len(lines) == 3
    assert load_meta(tmp_path / "cache").classes == meta.classes

    assert purity.main(args + ["--timesteps", "200"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no k-SAE for mid_block t=200") and err.count("\n") == 1


def test_cli_images_and_grids_go_together(tmp_path, capsys):
    args = ["--cache", str(tmp_path), "--saes", str(tmp_path), "--grids", str(tmp_path / "g")]
    assert purity.main(args) == 2
    assert capsys.readouterr().err == "error: --images and --grids go together\n"


def test_help_states_each_default_once():
    text = command_help("core.revelio.purity")
    assert_defaults_stated_once(text, purity.PurityConfig)
    assert "(default: dense)" in " ".join(text.split())
    assert purity.PurityConfig(Path("cache"), Path("saes")).activations == "dense"
