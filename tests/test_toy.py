"""The toy preset's build: model, training and resume, SAEs, dictionaries, check, shipping."""

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline
from safetensors.torch import load_file

from core.annotate.clipseg import centre_of_mass
from core.annotate.shapes import StyleScorer, ToyAnnotator, ToySegmenter
from core.diffusion.checksums import AssetError, read_checksums, shipped_files, verify_assets
from core.diffusion.layouts import resolve_blocks
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import SD14_BLOCKS, get_preset
from core.files import REPO_ROOT
from core.sae.bank import SAEBank
from core.shapes.world import VOCABULARY, dataset
from core.steer.strength import load_strengths
from core.toy.build import MAX_SHIPPED_MB, ToyRun, main, trained
from core.toy.model import (
    TOY_SCALES,
    TWIN_BLOCKS,
    build_toy_parts,
    parameter_count,
    toy_tokenizer,
)
from core.toy.reproduce import SUBSET_FILE, differences, recorded, subset_rows
from core.toy.training import PROBE_STEPS, TRAIN_SCALES, ToyTrainer, held_out
from tests.helpers import command_help

SMOKE = TRAIN_SCALES["smoke"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, shipped folder) of a whole smoke-scale build by the GPU script."""
    root = tmp_path_factory.mktemp("toy")
    out, shipped = root / "out", root / "assets"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
    }
    script = REPO_ROOT / "scripts" / "gpu_toy.sh"
    subprocess.run(["bash", script, out, "smoke"], cwd=root, env=env, check=True)
    run = root / "runs" / "toy-smoke"
    assert main(["ship", "--scale", "smoke", "--out", str(run), "--to", str(shipped)]) == 0
    return run, shipped


def test_gpu_script_packs_the_run_in_pieces_that_unpack_to_it(built, tmp_path):
    run, _ = built
    out = run.parent.parent / "out"
    with open(tmp_path / "toy.tar", "wb") as joined:
        for part in sorted(out.glob("toy.tar.part-*")):
            joined.write(part.read_bytes())
    with tarfile.open(tmp_path / "toy.tar") as tar:
        names = set(tar.getnames())
    for path in ("pipeline/model_index.json", "check/report.md", "saes/metrics.json"):
        assert f"toy-smoke/{path}" in names
    assert not any(name.endswith((".pt", "latents.safetensors")) for name in names)
    timings = json.loads((out / "timings.json").read_text())
    assert {"train_s", "saes_s", "dictionary_s", "strengths_s", "check_s"} <= timings.keys()
    assert "done in" in (out / "log.txt").read_text()


def test_tokenizer_keeps_every_world_word_whole():
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = toy_tokenizer(folder)
    for word in VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


@pytest.mark.parametrize("scale", sorted(TOY_SCALES))
def test_every_scale_has_the_paper_hook_points(scale):
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = toy_tokenizer(folder)
    _, _, unet = build_toy_parts(TOY_SCALES[scale], tokenizer, seed=0)
    assert len(resolve_blocks(unet, SD14_BLOCKS)) == 3
    assert TRAIN_SCALES[scale].model == TOY_SCALES[scale]


def test_full_model_fits_the_size_budget():
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = toy_tokenizer(folder)
    vae, text_encoder, unet = build_toy_parts(TOY_SCALES["full"], tokenizer, seed=0)
    widths = [m.proj_out.out_channels for m in resolve_blocks(unet, SD14_BLOCKS).values()]
    sae_bytes = 3 * sum(4 * (2 * 4 * d * d + 4 * d + d) for d in widths)  # 3 t values, fp32
    pipeline_bytes = 2 * parameter_count(vae, text_encoder, unet)  # fp16
    assert (pipeline_bytes + sae_bytes) / 1e6 < MAX_SHIPPED_MB - 1


def test_build_writes_a_loadable_pipeline_saes_dictionaries_and_a_report(built):
    run, _ = built
    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    weights = load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' spread
    assert len(resolve_blocks(pipe.unet, SD14_BLOCKS)) == 3
    bank = SAEBank.from_pretrained(run / "saes")
    keys = set(bank.keys())
    assert {(k.block, k.t) for k in keys} == {(b, t) for b in SD14_BLOCKS for t in (1.0, 0.5, 0.0)}
    assert len(list((run / "saes").rglob("concepts.json"))) == 9
    summary = json.loads((run / "check" / "summary.json").read_text())
    assert {"captions", "composition", "spatial", "global", "claims"} <= set(summary)
    assert summary["captions"]["images"] == 3
    assert "## Claims" in (run / "check" / "report.md").read_text()


def test_the_dit_twin_reuses_the_toys_vae_and_text_encoder_and_runs_the_same_check(built, tmp_path):
    run, _ = built
    out = tmp_path / "twin"
    args = ["all", "--scale", "smoke", "--out", str(out), "--denoiser", "pixart"]
    assert main([*args, "--reuse", str(run / "pipeline")]) == 0
    twin = PixArtAlphaPipeline.from_pretrained(out / "pipeline")
    toy = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    for part in ("vae", "text_encoder"):
        mine, theirs = getattr(twin, part).state_dict(), getattr(toy, part).state_dict()
        assert all(torch.equal(mine[name], theirs[name]) for name in theirs), part
    assert twin.vae.config.scaling_factor == toy.vae.config.scaling_factor
    assert len(resolve_blocks(twin.transformer, TWIN_BLOCKS)) == 3
    bank = SAEBank.from_pretrained(out / "saes")
    assert {k.block for k in bank} == set(TWIN_BLOCKS)
    assert {sae.cfg.layout for _, sae in bank.items()} == {"PixArt"}
    summary = json.loads((out / "check" / "summary.json").read_text())
    assert summary["captions"]["images"] == 3 and "claims" in summary


def test_held_out_check_uses_no_training_caption(built):
    run, _ = built
    captions = json.loads((run / "check" / "summary.json").read_text())
    training = {scene.caption for scene in SMOKE.training_scenes()}
    with open(run / "check" / "captions.csv", newline="") as f:
        checked = [row["caption"] for row in csv.DictReader(f)]
    assert checked and captions["captions"]["objects"] == len(checked)
    assert not any(caption in training for caption in checked)
    assert all(held_out(caption) for caption in checked)


def test_shipped_files_carry_checksums_and_load_through_the_preset(built):
    _, shipped = built
    listed = read_checksums(shipped / "README.md")
    assert set(listed) == {p.as_posix() for p in shipped_files(shipped)}
    assert not any("spatial_means" in path for path in listed)
    preset = get_preset("toy", model=str(shipped / "pipeline"), assets=str(shipped), steps=4)
    pipe = load_pipeline(preset, device="cpu")
    image = pipe(
        "a red circle on a gray plain background",
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_the_recorded_subset_of_the_check_reproduces_on_the_shipped_weights(built):
    run, shipped = built
    rows, settings = recorded(shipped / "check" / SUBSET_FILE)
    assert "check/subset.json" in read_checksums(shipped / "README.md")
    assert len(rows["captions"]) >= 6 and settings.resolution == 32
    toy = ToyRun(run, "smoke", "cpu")
    pipe, bank, dictionaries = trained(toy, shipped)
    found = subset_rows(pipe, bank, dictionaries, load_strengths(shipped / "saes"), settings)
    assert differences(rows, found) == []
    changed = copy.deepcopy(found)
    changed["captions"][0]["object_found"] = 1 - changed["captions"][0]["object_found"]
    assert differences(rows, changed) == [
        f"captions row 0: object_found was {found['captions'][0]['object_found']!r}, "
        f"now {changed['captions'][0]['object_found']!r}"
    ]


def test_corrupt_or_missing_asset_is_named(built, tmp_path):
    _, shipped = built
    copy = tmp_path / "assets"
    shutil.copytree(shipped, copy)
    verify_assets(copy)
    weights = copy / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="unet/diffusion_pytorch_model.safetensors is corrupt"):
        verify_assets(copy)
    preset = get_preset("toy", model=str(copy / "pipeline"), assets=str(copy))
    with pytest.raises(AssetError, match="checksum mismatch"):
        load_pipeline(preset, device="cpu")
    (copy / "pipeline" / "model_index.json").unlink()
    with pytest.raises(AssetError, match="model_index.json is missing"):
        verify_assets(copy)


def test_the_toy_preset_without_shipped_weights_says_how_to_build_them(tmp_path):
    preset = get_preset("toy", model=str(tmp_path / "pipeline"), assets=str(tmp_path))
    with pytest.raises(AssetError, match="python -m core.toy.build all"):
        load_pipeline(preset, device="cpu")


def _weights(trainer: ToyTrainer) -> dict[str, torch.Tensor]:
    parts = {"vae": trainer.vae, "text": trainer.text_encoder, "unet": trainer.denoiser}
    return {f"{n}.{k}": v for n, m in parts.items() for k, v in m.state_dict().items()}


RESUME_CONFIG = replace(SMOKE, scenes=16, vae_steps=8, denoiser_steps=8, save_every=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of a training run that nothing stopped."""
    straight = ToyTrainer(tmp_path_factory.mktemp("straight"), RESUME_CONFIG, "cpu")
    assert straight.run() is not None
    return _weights(straight)


@pytest.mark.parametrize("stop_after", [5, 11], ids=["in-vae", "in-denoiser"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, stop_after, uninterrupted):
    calls = iter(range(10_000))  # stop() is asked once per step, across both phases
    first = ToyTrainer(tmp_path / "resumed", RESUME_CONFIG, "cpu")
    assert first.run(stop=lambda: next(calls) >= stop_after) is None
    resumed = ToyTrainer(tmp_path / "resumed", RESUME_CONFIG, "cpu")
    assert resumed.run() is not None
    expected, got = uninterrupted, _weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_with_other_settings_or_a_corrupt_checkpoint_is_one_sentence(tmp_path):
    config = replace(SMOKE, scenes=16, vae_steps=4, denoiser_steps=4, save_every=2)
    calls = iter(range(100))
    assert ToyTrainer(tmp_path, config, "cpu").run(stop=lambda: next(calls) >= 2) is None
    with pytest.raises(ValueError, match="other settings \\(vae_steps\\).*--overwrite"):
        ToyTrainer(tmp_path, replace(config, vae_steps=5), "cpu").run()
    (tmp_path / "work" / "vae.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="vae.pt is unreadable"):
        ToyTrainer(tmp_path, config, "cpu").run()


def test_a_budgeted_phase_fits_its_steps_to_the_budget_and_records_them(tmp_path):
    budget = 8.0
    config = replace(
        SMOKE,
        scenes=16,
        vae_steps=4,
        denoiser_batch=2,
        denoiser_steps=100_000,
        denoiser_budget_s=budget,
        save_every=100_000,
    )
    trainer = ToyTrainer(tmp_path, config, "cpu")
    assert trainer.run() is not None
    recorded = json.loads((tmp_path / "work" / "steps.json").read_text())["denoiser"]
    assert PROBE_STEPS[1] <= recorded["steps"] < 100_000 and recorded["seconds_per_step"] > 0
    left = (recorded["steps"] - recorded["fitted_at_step"]) * recorded["seconds_per_step"]
    assert recorded["fitted_at_step"] == PROBE_STEPS[1]
    assert recorded["elapsed_s"] + left <= budget or left == 0  # or the probe spent it all
    assert trainer.log["denoiser_steps"] == recorded["steps"]
    again = ToyTrainer(tmp_path, config, "cpu")
    assert again.run() is not None and again.log["denoiser_steps"] == recorded["steps"]


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["ship", "--out", str(tmp_path)]) == 2
    assert "ship needs --to" in capsys.readouterr().err
    argv = ["check", "--scale", "smoke", "--out", str(tmp_path / "none"), "--device", "cpu"]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_latents_cache_holds_scaled_latents_and_caption_tokens(built):
    run, _ = built
    cache = load_file(run / "work" / "latents.safetensors")
    assert cache["latents"].shape == (SMOKE.scenes, 4, 16, 16)
    assert abs(float(cache["latents"].float().std()) - 1) < 1e-2
    assert cache["tokens"].shape == (SMOKE.scenes, 77)


def test_background_annotation_segmenter_and_style_scorer_read_the_pixels():
    scene = next(
        s for s in dataset(50, 3) if len({o.shape for o in s.objects}) == len(s.objects) > 1
    )
    annotations = ToyAnnotator(with_background=True).annotate(scene.image)
    background = annotations[-1]
    assert background.label == scene.background.style
    objects = np.logical_or.reduce([o.mask for o in scene.objects])
    assert (background.mask == ~objects).mean() > 0.97
    target = scene.objects[0]
    masks = ToySegmenter().segment(scene.image, [target.shape, "nothing"])
    x, y = centre_of_mass(masks[target.shape])
    assert abs(x - target.centre[0]) < 3 and abs(y - target.centre[1]) < 3
    assert masks["nothing"].sum() == 0
    scores = StyleScorer().similarity([scene.image], scene.background.style)
    assert scores == [1.0]


def test_help_from_the_command_line_states_the_defaults():
    text = " ".join(command_help("core.toy.build").split())
    assert "--scale" in text and "(default: cpu)" in text
    assert "(default: None)" not in text
