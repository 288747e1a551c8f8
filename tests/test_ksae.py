import json

import pytest
import torch

from core.revelio import ksae
from core.revelio.ksae_folders import ksae_folder, load_ksaes, sae_timestep
from core.sae.bank import SAEBank, SAEKey
from core.sae.model import TopKSAE
from tests.helpers import LAYERS, TIMESTEPS, assert_defaults_stated_once, command_help, write_cache


def test_paper_defaults():
    cfg = ksae.paper_config()
    assert (cfg.expansion_factor, cfg.k, cfg.lr, cfg.warmup_steps) == (64, 32, 4e-4, 500)
    assert cfg.auxk_alpha == 0.0  # the paper's loss is the normalised MSE alone
    assert cfg.batch_size == 8192  # the authors' released code
    assert ksae.paper_config(k=4).k == 4


def test_batches_are_seeded_and_cover_every_row_equally():
    batches = list(ksae.batch_indices(10, 4, 5, seed=3))
    assert all(len(b) == 4 for b in batches)
    counts = torch.bincount(torch.cat(batches), minlength=10)
    assert counts.tolist() == [2] * 10  # 20 rows drawn = two full shuffles
    again = list(ksae.batch_indices(10, 4, 5, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = list(ksae.batch_indices(10, 4, 5, seed=4))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))


def test_num_steps():
    assert ksae.num_steps(100, 32, epochs=2, samples=None) == 7
    assert ksae.num_steps(100, 1000, epochs=3, samples=None) == 3  # batch capped at the rows
    assert ksae.num_steps(100, 50, epochs=None, samples=1000) == 20
    assert ksae.num_steps(100, 50, epochs=None, samples=None) == ksae.PAPER_SAMPLES // 50


def test_train_cache_round_trips_through_the_core_format(tmp_path):
    write_cache(tmp_path / "cache", maps=False)
    cfg = ksae.paper_config(expansion_factor=4, k=4, warmup_steps=5, batch_size=16)
    folders = ksae.train_cache(tmp_path / "cache", tmp_path / "saes", cfg, epochs=20)
    assert len(folders) == len(LAYERS) * len(TIMESTEPS)
    folder = ksae_folder(tmp_path / "saes", "up_blocks.1", 25)
    assert folder in folders
    raw = json.loads((folder / "cfg.json").read_text())
    assert (raw["d_in"], raw["num_latents"], raw["k"], raw["t"]) == (8, 32, 4, 0.025)
    assert raw["block"] == "up_blocks.1" and raw["model"] == "synthetic"
    assert raw["metrics"]["timestep"] == 25
    assert raw["metrics"]["recipe"]["lr"] == 4e-4 and raw["metrics"]["recipe"]["warmup_steps"] == 5
    assert raw["metrics"]["final_explained_variance"] > 0.5

    bank = SAEBank.from_pretrained(tmp_path / "saes")
    assert SAEKey("up_blocks.1", 0.025, "cond") in bank
    loaded = load_ksaes(tmp_path / "saes")
    assert sorted(loaded) == sorted((layer, t) for layer in LAYERS for t in TIMESTEPS)
    sae = loaded[("up_blocks.1", 25)]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    x = torch.randn(5, 8)
    again = TopKSAE.from_pretrained(folder)
    assert torch.equal(sae.encode_dense(x.clone()), again.encode_dense(x.clone()))


def test_training_is_reproducible(tmp_path):
    features = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    cfg = ksae.paper_config(expansion_factor=2, k=2, warmup_steps=2, batch_size=8)
    a, b = (ksae.train_ksae(features, cfg, 10, layer="mid_block", timestep=0) for _ in "ab")
    assert torch.equal(a.W_dec, b.W_dec)
    assert a.cfg.t == 0.0 and sae_timestep(a) == 0


def test_cli_trains_selected_pairs_and_refuses_to_overwrite(tmp_path, capsys):
    write_cache(tmp_path / "cache", maps=False)
    args = ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "saes")]
    small = ["--layers", "up_ft1", "--timesteps", "200", "--expansion-factor", "2", "-k", "2"]
    small += ["--epochs", "1", "--device", "cpu"]
    assert ksae.main(args + small) == 0
    assert load_ksaes(tmp_path / "saes").keys() == {("up_blocks.1", 200)}
    assert "explained variance" in capsys.readouterr().out
    assert ksae.main(args + small) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert ksae.main(args + small + ["--overwrite"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "up_ft2"], "layer up_blocks.2 is not in the cache; it holds mid_block"),
        (["--timesteps", "999"], "timestep 999 is not in the cache; it holds 25, 200"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    write_cache(tmp_path / "cache", maps=False)
    args = ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "saes"), *extra]
    assert ksae.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_missing_cache_is_one_line(tmp_path, capsys):
    assert ksae.main(["--cache", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no feature cache at" in capsys.readouterr().err


def test_cli_length_is_epochs_or_samples(tmp_path, capsys):
    args = ["--cache", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "1"]
    assert ksae.main([*args, "--samples", "100"]) == 2
    err = capsys.readouterr().err
    assert err == "error: give the training length as --epochs or --samples, not both\n"


def test_help_states_each_default_once():
    assert_defaults_stated_once(command_help("core.revelio.ksae"), ksae.KsaeConfig)
