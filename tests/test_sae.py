"""Tests of core.sae (the TopK SAE, its config, checkpoints and banks) and core.training.trainer."""

import copy
import json
import logging
import os
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open

import core.sae.model
from core.sae.bank import SAEBank, SAEKey, hub_patterns
from core.sae.config import SAEConfig, SAELoadError
from core.sae.model import LatentStats, TopKSAE
from core.sae.sparse_ops import encoder_acts_at
from core.training.trainer import SAETrainer, TrainConfig, read_checkpoint
from tests.helpers import SDLENS_RUN, write_saeuron, write_sdlens

BLOCK = "unet.mid_block.attentions.0"


def make_sae(d: int = 16, n: int = 64, k: int = 4, seed: int = 0, **meta) -> TopKSAE:
    """A random SAE with non-zero biases, so that every term of the maths is exercised."""
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d, n, k, **meta))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    return sae


def assert_same_weights(a: TopKSAE, b: TopKSAE) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


# --- the model ---------------------------------------------------------------------------


def test_encode_decode_shapes_and_dense_equivalence():
    sae = make_sae()
    x = torch.randn(10, 16)
    top_acts, top_indices, pre_acts = sae.encode(x)
    assert top_acts.shape == top_indices.shape == (10, 4)
    assert pre_acts.shape == (10, 64)
    z = sae.encode_dense(x)
    assert z.shape == (10, 64)
    assert ((z != 0).sum(dim=1) <= 4).all()
    torch.testing.assert_close(sae.decode(top_acts, top_indices), z @ sae.W_dec + sae.b_dec)
    assert sae(x).x_hat.shape == (10, 16)
    torch.testing.assert_close(sae.concept_vectors.norm(dim=1), torch.ones(64))


def test_fvu_on_a_hand_case():
    sae = TopKSAE(SAEConfig(d_in=2, num_latents=2, k=1))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    out = sae(x)
    # Row 1 keeps only its 2 (error 1^2), row 2 is exact; variance around [1, 2] is 4.
    torch.testing.assert_close(out.x_hat, torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    torch.testing.assert_close(out.fvu, torch.tensor(0.25))
    assert out.auxk_loss.item() == 0.0


def test_auxk_reaches_dead_latents_only_when_some_are_dead():
    sae = make_sae()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    assert sae(x, dead_mask=dead).auxk_loss.item() == 0.0
    dead[:32] = True
    out = sae(x, dead_mask=dead, k_aux=8)
    assert out.auxk_loss.item() > 0
    out.auxk_loss.backward()
    assert sae.W_dec.grad[32:].abs().sum() == 0  # only dead latents reconstruct the residual
    assert sae.W_dec.grad[:32].abs().sum() > 0
    assert sae.encoder.weight.grad[32:].abs().sum() == 0  # and only their encoder rows learn
    assert sae.encoder.weight.grad[:32].abs().sum() > 0


def dense_reference_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, k_aux: int):
    """fvu + auxk / 4 as plain autograd differentiates it, through all [N, n] pre-activations."""
    pre = F.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    top = pre.topk(sae.cfg.k, dim=1)
    z = torch.zeros_like(pre).scatter(1, top.indices, top.values)
    residual = x - (z @ sae.W_dec + sae.b_dec)
    fvu = residual.pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum()
    aux = pre[:, dead].topk(k_aux, dim=1)
    z_aux = torch.zeros_like(pre[:, dead]).scatter(1, aux.indices, aux.values)
    r = residual.detach()
    auxk = (r - z_aux @ sae.W_dec[dead]).pow(2).sum() / (r - r.mean(dim=0)).pow(2).sum()
    return fvu + auxk / 4


def test_sparse_backward_matches_dense_autograd():
    sae = make_sae(d=12, n=48, k=6, seed=1).double()
    with torch.no_grad():
        sae.encoder.bias.sub_(0.8)  # few positive latents: rows keep some zeros (ReLU masks)
    x = torch.randn(30, 12, dtype=torch.float64, requires_grad=True)
    dead = torch.arange(48) % 3 == 0
    out = sae(x, dead_mask=dead, k_aux=8)
    assert (out.top_acts == 0).any() and (out.top_acts > 0).any()
    (out.fvu + out.auxk_loss / 4).backward()
    sparse_grads = [p.grad for p in (x, *sae.parameters())]

    x.grad = None
    sae.zero_grad()
    expected = dense_reference_loss(sae, x, dead.nonzero().squeeze(1), k_aux=8)
    expected.backward()
    torch.testing.assert_close(out.fvu + out.auxk_loss / 4, expected)
    for got, p in zip(sparse_grads, (x, *sae.parameters()), strict=True):
        torch.testing.assert_close(got, p.grad)


def test_sparse_encoder_gradcheck():
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (7, 4), (7,), (4,)]  # x, W_enc, b_enc, b_dec
    inputs = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    indices = torch.rand(5, 7, generator=generator).argsort(dim=1)[:, :3]  # distinct per row

    def pre_at_indices(x, weight, bias, b_dec):
        return ((x - b_dec) @ weight.T + bias).gather(1, indices)

    def acts_at(x, weight, bias, b_dec):
        with torch.no_grad():
            acts = pre_at_indices(x, weight, bias, b_dec).relu()
        return encoder_acts_at(x, weight, bias, b_dec, indices, acts)

    pre = pre_at_indices(*inputs)
    assert (pre < 0).any() and (pre > 0).any() and pre.abs().min() > 1e-3  # off the ReLU kink
    assert torch.autograd.gradcheck(acts_at, [t.requires_grad_() for t in inputs])


def test_sparse_backward_in_bfloat16():
    sae = make_sae().to(torch.bfloat16)
    x = torch.randn(32, 16, dtype=torch.bfloat16, requires_grad=True)
    out = sae(x, dead_mask=torch.arange(64) < 32, k_aux=8)
    (out.fvu + out.auxk_loss).backward()
    for t in (x, *sae.parameters()):
        assert t.grad.dtype == torch.bfloat16 and t.grad.isfinite().all()
    assert sae.encoder.weight.grad.abs().sum() > 0


def test_inference_builds_no_graph_and_pre_acts_carry_no_gradient():
    sae, x = make_sae(), torch.randn(10, 16)
    with torch.no_grad():
        inference = sae.encode(x)
    training = sae.encode(x)
    assert inference.top_acts.grad_fn is None and training.top_acts.grad_fn is not None
    assert not training.pre_acts.requires_grad
    assert torch.equal(inference.top_acts, training.top_acts)
    assert torch.equal(inference.top_indices, training.top_indices)


def test_width_mismatch_names_both_widths():
    with pytest.raises(ValueError, match="expects width 16 but the activations have width 24"):
        make_sae().encode(torch.randn(3, 24))


def test_decoder_gradient_projection_and_renormalisation():
    sae = make_sae()
    sae(torch.randn(8, 16)).fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    radial = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    torch.testing.assert_close(radial, torch.zeros(64), atol=1e-6, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_fold_input_scale_is_exact():
    sae, s = make_sae(), 3.7
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(s)
    x = torch.randn(20, 16) * 5
    scaled, raw = sae(x * s), folded(x)
    torch.testing.assert_close(scaled.x_hat, raw.x_hat * s)
    torch.testing.assert_close(sae.encode_dense(x * s), folded.encode_dense(x) * s)
    assert folded.cfg.input_scale == s
    assert torch.equal(folded.W_dec, sae.W_dec)


def test_latent_stats_accumulate():
    stats = LatentStats.zeros(4)
    stats.update(torch.tensor([[2.0, 1.0], [3.0, 0.0]]), torch.tensor([[0, 1], [0, 2]]))
    assert stats.fire_count.tolist() == [2, 1, 0, 0]  # a kept zero is not a firing
    assert stats.num_samples == 2
    assert stats.act_max.tolist() == [3.0, 1.0, 0.0, 0.0]
    assert stats.firing_frequency.tolist() == [1.0, 0.5, 0.0, 0.0]
    assert stats.mean_activation.tolist() == [2.5, 1.0, 0.0, 0.0]


# --- checkpoints ------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    sae = make_sae(model="sdxl", block=BLOCK, t=0.5, branch="uncond", input_scale=2.0)
    sae.cfg.metrics = {"fvu": 0.1}
    sae.stats = LatentStats.zeros(64)
    sae.stats.update(*sae.encode(torch.randn(50, 16))[:2])
    sae.save_pretrained(tmp_path)

    with safe_open(tmp_path / "sae.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["W_dec", "b_dec", "encoder.bias", "encoder.weight"]
    raw_cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert raw_cfg["expansion_factor"] == 4 and raw_cfg["normalize_decoder"] is True

    loaded = TopKSAE.from_pretrained(tmp_path)
    assert_same_weights(sae, loaded)
    assert loaded.cfg == sae.cfg
    for name, t in sae.stats.to_tensors().items():
        assert torch.equal(loaded.stats.to_tensors()[name], t), name


def test_site_is_saved_and_is_the_residual_update_when_absent(tmp_path):
    make_sae(block=BLOCK, site="output").save_pretrained(tmp_path / "output")
    assert json.loads((tmp_path / "output" / "cfg.json").read_text())["site"] == "output"
    assert TopKSAE.from_pretrained(tmp_path / "output").cfg.site == "output"
    make_sae(block=BLOCK).save_pretrained(tmp_path / "older")
    cfg = json.loads((tmp_path / "older" / "cfg.json").read_text())
    del cfg["site"]  # written before sites were recorded
    (tmp_path / "older" / "cfg.json").write_text(json.dumps(cfg))
    assert TopKSAE.from_pretrained(tmp_path / "older").cfg.site == "delta"
    with pytest.raises(ValueError, match="site must be one of delta, output, got 'input'"):
        SAEConfig(16, 64, 4, site="input")


def test_loads_sparsify_config_with_unknown_keys(tmp_path):
    make_sae().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(num_latents=0, activation="topk", multi_topk=False, skip_connection=False)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert TopKSAE.from_pretrained(tmp_path).cfg.num_latents == 64


def test_saeuron_hookpoint_folder_reads_the_block_output(tmp_path):
    tensors = write_saeuron(tmp_path, d=16, expansion=4, k=4)
    sae = TopKSAE.from_pretrained(tmp_path)
    assert (sae.cfg.num_latents, sae.cfg.k, sae.cfg.site, sae.cfg.t) == (64, 4, "output", None)
    for name, tensor in tensors.items():
        assert torch.equal(sae.state_dict()[name], tensor), name

    # sparsify: z = TopK(ReLU(W_enc (x - b_dec) + b_enc)); x_hat = W_dec^T z + b_dec.
    x = torch.randn(6, 16)
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    values, indices = pre.topk(4, dim=1)
    z = torch.zeros_like(pre).scatter(1, indices, values)
    torch.testing.assert_close(sae.encode_dense(x), z)
    torch.testing.assert_close(sae(x).x_hat, z @ tensors["W_dec"] + tensors["b_dec"])


OPTIONS = [("input_unit_norm", True), ("transcode", True), ("activation", "groupmax")]


@pytest.mark.parametrize(("option", "value"), OPTIONS)
def test_sparsify_options_this_sae_lacks_are_refused(tmp_path, option, value):
    write_saeuron(tmp_path, d=8)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, option: value}))
    with pytest.raises(SAELoadError, match="which this project's TopK SAE does not implement"):
        TopKSAE.from_pretrained(tmp_path)


def test_sdlens_checkpoint_computes_the_same_sae(tmp_path):
    torch.manual_seed(0)
    state = write_sdlens(tmp_path / "sdlens")
    sae = TopKSAE.from_pretrained(tmp_path / "sdlens")
    x = torch.randn(6, 8)

    # SDLens: z = ReLU(TopK(W_enc (x - pre_bias) + latent_bias)); x_hat = W_dec z + pre_bias.
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    values, indices = pre.topk(3, dim=1)
    z = torch.zeros_like(pre).scatter(1, indices, values.relu())
    x_hat = z @ state["decoder.weight"].T + state["pre_bias"]

    torch.testing.assert_close(sae.encode_dense(x), z)
    torch.testing.assert_close(sae(x).x_hat, x_hat)


def test_sdlens_mean_activations_load_with_the_sae(tmp_path):
    mean = torch.rand(32) * 20
    write_sdlens(tmp_path, mean=mean)
    sae = TopKSAE.from_pretrained(tmp_path)
    torch.testing.assert_close(sae.mean_acts, mean)
    assert "mean_acts" not in sae.state_dict()  # not written by save_pretrained
    assert sae.to(torch.float64).mean_acts.dtype == torch.float64  # it follows the SAE
    assert make_sae().mean_acts is None


class RunsCode:
    """Unpickling this would make a folder: what an untrusted pickle could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_mean_pt_is_never_run_as_code_and_must_fit_the_sae(tmp_path):
    write_sdlens(tmp_path)
    torch.save(RunsCode(tmp_path / "ran"), tmp_path / "mean.pt")
    with pytest.raises(SAELoadError, match="mean.pt is corrupt or truncated"):
        TopKSAE.from_pretrained(tmp_path)
    assert not (tmp_path / "ran").exists()
    torch.save(torch.ones(31), tmp_path / "mean.pt")
    with pytest.raises(SAELoadError, match=r"per latent \(32 values\) but holds shape \(31,\)"):
        TopKSAE.from_pretrained(tmp_path)


def test_missing_folder_or_files(tmp_path):
    with pytest.raises(SAELoadError, match="no SAE found at .*expected cfg.json.*no such folder"):
        TopKSAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "cfg.json").write_text("{}")
    with pytest.raises(SAELoadError, match="no SAE found.*, found cfg.json$"):
        TopKSAE.from_pretrained(tmp_path)


def test_an_unknown_layout_says_what_was_expected_and_what_was_found(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "notes").mkdir()
    expected = (
        "expected cfg.json + sae.safetensors (sparsify, SAeUron, this project) or config.json "
        "+ state_dict.pth (SDLens, also in a run's final/), found notes/, weights.bin"
    )
    for load in (TopKSAE.from_pretrained, SAEBank.from_pretrained):
        with pytest.raises(SAELoadError) as error:
            load(tmp_path)
        assert f"no SAE found at {tmp_path}: {expected}" in str(error.value)
        assert ". " not in str(error.value)  # one sentence


@pytest.mark.parametrize("name", ["sae.safetensors", "cfg.json", "latent_stats.safetensors"])
def test_truncated_files_are_reported(tmp_path, name):
    sae = make_sae()
    sae.stats = LatentStats.zeros(64)
    sae.save_pretrained(tmp_path)
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SAELoadError, match="corrupt or truncated.*re-download it or retrain"):
        TopKSAE.from_pretrained(tmp_path)


def test_corrupt_sdlens_checkpoint_is_reported(tmp_path):
    write_sdlens(tmp_path)
    (tmp_path / "state_dict.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SAELoadError, match="corrupt or truncated"):
        TopKSAE.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights(tmp_path):
    make_sae().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_in": 32}))
    with pytest.raises(SAELoadError, match="do not match"):
        TopKSAE.from_pretrained(tmp_path)


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    good = make_sae(seed=0)
    good.save_pretrained(tmp_path)

    def crash(tensors, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(core.sae.model, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        make_sae(seed=1).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae.safetensors"]
    assert_same_weights(good, TopKSAE.from_pretrained(tmp_path))


def test_hub_miss_while_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SAELoadError, match=r"could not download nobody/no-such-sae/x.*core\.train"):
        TopKSAE.from_pretrained("nobody/no-such-sae", "x")
    with pytest.raises(SAELoadError, match="pass a local folder"):
        SAEBank.from_pretrained("nobody/no-such-sae", blocks=[BLOCK])


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, path_in_repo, **kwargs):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["path_in_repo"] = path_in_repo
        calls["cfg"] = json.loads((Path(folder_path) / "cfg.json").read_text())
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    sae = make_sae(block=BLOCK)
    assert sae.push_to_hub("me/saes", f"{BLOCK}/t1.00/cond", private=True) == "commit"
    assert calls["create_repo"] == ("me/saes", {"private": True, "exist_ok": True})
    assert calls["files"] == ["cfg.json", "sae.safetensors"]
    assert calls["path_in_repo"] == f"{BLOCK}/t1.00/cond"
    assert calls["cfg"]["block"] == BLOCK


# --- banks ------------------------------------------------------------------------------


def make_bank() -> SAEBank:
    saes = [make_sae(seed=i, block=BLOCK, t=t) for i, t in enumerate([1.0, 0.5, 0.0])]
    saes.append(make_sae(seed=3, block=BLOCK, t=0.5, branch="uncond"))
    saes.append(make_sae(seed=4, block="unet.up_blocks.0.attentions.1", t=1.0))
    return SAEBank(saes)


def test_bank_round_trip_and_filters(tmp_path):
    bank = make_bank()
    bank.save_pretrained(tmp_path)
    assert (tmp_path / BLOCK / "t0.50" / "uncond" / "cfg.json").is_file()

    loaded = SAEBank.from_pretrained(tmp_path)
    assert sorted(loaded.keys()) == sorted(bank.keys())
    for key in bank:
        assert_same_weights(bank[key], loaded[key])

    only = SAEBank.from_pretrained(tmp_path, blocks=[BLOCK], branches=["cond"])
    assert sorted(only.keys()) == [SAEKey(BLOCK, t, "cond") for t in (0.0, 0.5, 1.0)]


def test_bank_reads_the_key_from_the_config_not_the_path(tmp_path):
    make_sae(block=BLOCK, t=0.25, branch="uncond").save_pretrained(tmp_path / "anything")
    assert SAEBank.from_pretrained(tmp_path).keys() == [SAEKey(BLOCK, 0.25, "uncond")]


def test_bank_nearest_time_lookup():
    bank = make_bank()
    assert bank.get(BLOCK, 0.8).cfg.t == 1.0
    assert bank.get(BLOCK, 0.3).cfg.t == 0.5
    assert bank.get(BLOCK, 0.25).cfg.t == 0.5  # a tie goes to the larger (noisier) time
    assert bank.get(BLOCK, 0.1).cfg.t == 0.0
    assert bank.get(BLOCK, 0.0, "uncond").cfg.t == 0.5
    with pytest.raises(KeyError, match="available: .*unet.up_blocks.0.attentions.1"):
        bank.get("unet.down_blocks.0", 0.5)


"""How the published SDLens repo names its folders: unet.<block><run>/final/."""


def test_bank_of_sdlens_folders_from_the_hub(tmp_path, monkeypatch):
    torch.manual_seed(0)
    block, other = "mid_block.attentions.0", "up_blocks.0.attentions.0"
    for name in (block, other):
        write_sdlens(tmp_path / f"unet.{name}{SDLENS_RUN.format(k=3, n=32)}" / "final", nested=True)
    requests = []

    def snapshot_download(repo_id, **kwargs):
        requests.append((repo_id, kwargs["allow_patterns"]))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    bank = SAEBank.from_pretrained("someone/sdlens-saes", blocks=[block], variant="k3_hidden32")
    assert requests == [("someone/sdlens-saes", hub_patterns([block], "k3_hidden32"))]
    assert bank.keys() == [SAEKey(block, None, "cond")]
    assert bank.get(block, 0.7).cfg.d_in == 8  # an SAE for all times serves any time

    # Only what is loaded is downloaded: final/'s config, weights and mean activations.
    run = f"unet.{block}{SDLENS_RUN.format(k=3, n=32)}"
    loaded = [f"{run}/final/{name}" for name in ("config.json", "state_dict.pth", "mean.pt")]
    other_run = f"unet.{block}{SDLENS_RUN.format(k=5, n=32)}/final/config.json"
    skipped = [f"{run}/final/std.pt", f"{run}/1000/state_dict.pth", other_run]
    assert list(filter_repo_objects(loaded + skipped, allow_patterns=requests[0][1])) == loaded


def test_sdlens_run_folders_resolve_to_final(tmp_path, caplog):
    block = "mid_block.attentions.0"
    run = tmp_path / f"unet.{block}{SDLENS_RUN.format(k=3, n=32)}"
    write_sdlens(run / "final", k=3)
    for step in ("1000", "2000"):
        write_sdlens(run / step, k=5)
    with caplog.at_level(logging.INFO, logger="core.sae.checkpoints"):
        assert SAEBank.from_pretrained(tmp_path).get(block, 0.5).cfg.k == 3
        assert TopKSAE.from_pretrained(run).cfg.k == 3
    said = [record.getMessage() for record in caplog.records]
    assert (
        said
        == [f"Loading the final checkpoint of the SDLens run {run}, not those of steps 1000, 2000."]
        * 2
    )
    assert TopKSAE.from_pretrained(run / "1000").cfg.k == 5  # a step, when asked for


def test_an_sdlens_run_without_final_is_refused(tmp_path):
    run = tmp_path / f"unet.mid_block.attentions.0{SDLENS_RUN.format(k=3, n=32)}"
    for step in ("1000", "2000"):
        write_sdlens(run / step)
    message = r"intermediate steps only \(1000, 2000\) and no final/; pass the folder of the step"
    with pytest.raises(SAELoadError, match=message):
        SAEBank.from_pretrained(tmp_path)
    with pytest.raises(SAELoadError, match=message):
        TopKSAE.from_pretrained(run)


def test_saeuron_layout_is_a_bank_of_output_saes_for_every_t(tmp_path, monkeypatch):
    block = "up_blocks.1.attentions.1"
    tensors = write_saeuron(tmp_path / f"unet.{block}", d=16)
    write_saeuron(tmp_path / "unet.up_blocks.1.attentions.2", d=16, seed=1)
    requests = []

    def snapshot_download(repo_id, **kwargs):
        requests.append((repo_id, kwargs["allow_patterns"]))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    bank = SAEBank.from_pretrained("bcywinski/SAeUron", blocks=[block])
    published = [f"unet.{block}/cfg.json", f"unet.{block}/sae.safetensors"]
    assert list(filter_repo_objects(published, allow_patterns=requests[0][1])) == published
    assert bank.keys() == [SAEKey(block, None, "cond")]
    assert bank.sites([block]) == {block: "output"}
    for t in (1.0, 0.37, 0.0):
        assert torch.equal(bank.get(block, t).W_dec, tensors["W_dec"])
    with pytest.raises(KeyError, match="no SAE for block 'up_blocks.1.attentions.1', branch"):
        bank.get(block, 0.5, "uncond")


def test_a_bank_keeps_one_site_per_block():
    bank = SAEBank([make_sae(block=BLOCK, t=1.0)])
    message = (
        r"SAEs of unet.mid_block.attentions.0 read the residual update \(block output minus "
        r"block input\) but the SAE for .* \(t=0.5, cond\) reads the block output; keep them"
    )
    with pytest.raises(ValueError, match=message):
        bank.add(make_sae(block=BLOCK, t=0.5, site="output"))
    assert bank.sites([BLOCK]) == {BLOCK: "delta"}


def test_sdlens_variants_of_one_block_are_told_apart(tmp_path):
    block = "mid_block.attentions.0"
    for k in (3, 5):
        write_sdlens(tmp_path / f"unet.{block}{SDLENS_RUN.format(k=k, n=32)}" / "final", k=k)
    with pytest.raises(SAELoadError, match="more than one SAE for mid_block.attentions.0.*variant"):
        SAEBank.from_pretrained(tmp_path)
    assert SAEBank.from_pretrained(tmp_path, variant="k5_hidden32").get(block, 0).cfg.k == 5


# --- training ---------------------------------------------------------------------------


def sparse_data(atoms: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """Each row: 4 distinct random atoms with coefficients in [0.5, 1.5], plus tiny noise."""
    chosen = torch.rand(num, len(atoms), generator=generator).topk(4, dim=1).indices
    coefficients = torch.rand(num, 4, generator=generator) + 0.5
    x = torch.einsum("nk,nkd->nd", coefficients, atoms[chosen])
    return x + 0.01 * torch.randn(num, atoms.shape[1], generator=generator)


def test_recovers_a_known_dictionary():
    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(256, 64, generator=generator)
    atoms /= atoms.norm(dim=1, keepdim=True)
    train = sparse_data(atoms, 65536, generator)
    # 512 latents for 256 atoms: the spares die, so dead_after (about 100 steps) and AuxK run.
    cfg = TrainConfig(num_latents=512, k=4, k_aux=32, lr=1e-3, batch_size=1024, dead_after=100_000)
    trainer = SAETrainer(64, cfg)
    start = time.perf_counter()
    for step in range(1500):
        first = step * cfg.batch_size % len(train)
        trainer.step(train[first : first + cfg.batch_size])
    elapsed = time.perf_counter() - start
    sae = trainer.export()

    held_out = sparse_data(atoms, 8192, torch.Generator().manual_seed(1))
    with torch.no_grad():
        explained_variance = 1 - sae(held_out).fvu.item()
    best_cosine = (atoms @ sae.concept_vectors.T).max(dim=1).values
    print(
        f"recovery: {elapsed:.1f} s, explained variance {explained_variance:.4f}, "
        f"mean best cosine {best_cosine.mean():.4f}, min {best_cosine.min():.4f}, "
        f"matched (> 0.9) {(best_cosine > 0.9).float().mean():.3f}"
    )
    assert explained_variance > 0.9
    assert best_cosine.mean() > 0.9
    assert (best_cosine > 0.9).float().mean() > 0.8
    assert sae.cfg.metrics["num_steps"] == 1500
    assert sae.stats.num_samples == 1500 * 1024


def test_exported_sae_works_on_raw_activations():
    x = torch.randn(256, 16) * 40 + 7  # far from unit scale
    # lr=0 keeps the weights the stats were recorded with; calibration still sets scale and b_dec.
    trainer = SAETrainer(16, TrainConfig(num_latents=64, k=4, lr=0.0))
    trainer.step(x)
    sae = trainer.export()
    assert sae.cfg.input_scale == trainer.input_scale
    with torch.no_grad():
        raw, scaled = sae(x), trainer.sae(x * trainer.input_scale)
    torch.testing.assert_close(raw.x_hat * trainer.input_scale, scaled.x_hat)
    # stats are in raw units
    assert sae.stats.act_max.max() == pytest.approx(raw.top_acts.max().item(), rel=1e-5)


def test_bad_rows_are_skipped_and_a_bad_batch_changes_nothing():
    trainer = SAETrainer(16, TrainConfig(num_latents=64, k=4))
    x = torch.randn(32, 16)
    x[3, 0], x[7, 5] = float("nan"), float("inf")
    assert trainer.step(x)["l0"] > 0
    assert trainer.skipped_rows == 2
    assert trainer.stats.num_samples == 30

    before, _ = trainer.state_dict()
    before = {name: t.clone() for name, t in before.items()}
    assert trainer.step(torch.full((8, 16), float("nan"))) == {}
    assert trainer.skipped_rows == 10
    after, _ = trainer.state_dict()
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(t, after[name]), name


def test_resume_is_bit_exact(tmp_path):
    cfg = TrainConfig(num_latents=64, k=4, k_aux=16, lr=1e-3, warmup_steps=5, dead_after=64)
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    straight = SAETrainer(16, cfg, block=BLOCK, t=0.5)
    for x in batches:
        straight.step(x)

    first = SAETrainer(16, cfg, block=BLOCK, t=0.5)
    for x in batches[:7]:
        first.step(x)
    first.save_checkpoint(tmp_path)
    resumed = SAETrainer(16, cfg, block=BLOCK, t=0.5)
    resumed.load_state_dict(*read_checkpoint(tmp_path))
    rebuilt = SAETrainer.from_checkpoint(tmp_path)
    for x in batches[7:]:
        resumed.step(x)
        rebuilt.step(x)

    assert straight.dead_mask.any()  # the AuxK path was part of the run
    for trainer in (resumed, rebuilt):
        assert_same_weights(straight.sae, trainer.sae)
        assert torch.equal(straight.samples_since_fired, trainer.samples_since_fired)
        assert torch.equal(straight.stats.act_sum, trainer.stats.act_sum)
        assert trainer.num_steps == 12 and trainer.mean_metrics() == straight.mean_metrics()
        assert trainer.export().cfg == straight.export().cfg


def test_corrupt_trainer_checkpoint_is_reported(tmp_path):
    trainer = SAETrainer(16, TrainConfig(num_latents=64, k=4))
    trainer.step(torch.randn(8, 16))
    path = trainer.save_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SAELoadError, match="corrupt or truncated"):
        SAETrainer.from_checkpoint(tmp_path)
