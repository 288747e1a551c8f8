import os
import sys

import pytest
import torch
from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from PIL import Image

from core.diffusion.tiny import tiny_vae
from core.revelio.block_outputs import block_outputs, capture, resolve_layers, tokens_to_map
from core.revelio.feature_cache import feature_path, load_features, load_meta
from core.revelio.features import (
    FeatureExtractor,
    FeaturesConfig,
    check_timesteps,
    dataset_images,
    hf_dataset,
    image_folder,
    image_noise,
    main,
    pixels,
)
from core.shapes.world import dataset
from tests.helpers import assert_defaults_stated_once, command_help

N_IMAGES = 10
LAYERS = ["bottleneck", "up_ft0", "up_ft1", "up_ft2"]


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """Toy-world scenes with one object each, saved as <shape>/<index>.png."""
    root = tmp_path_factory.mktemp("shapes")
    for index, scene in enumerate(dataset(N_IMAGES, seed=3, size=32, max_objects=1)):
        folder = root / scene.objects[0].shape
        folder.mkdir(exist_ok=True)
        Image.fromarray(scene.image).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def extractor(tiny_pipe):
    return FeatureExtractor.from_pipeline(tiny_pipe, resolution=32)


@pytest.fixture(scope="module")
def dit_pipe():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            num_layers=3,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
        vae = tiny_vae(2)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDPMScheduler())


def unet_inputs(pipe, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=generator)
    embedding = torch.randn(batch, 77, 32, generator=generator)
    return latents, torch.tensor([250] * batch), embedding


def hook_counts(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


# Block outputs


@torch.no_grad()
def test_unet_block_outputs_equal_a_manual_forward(tiny_pipe):
    unet = tiny_pipe.unet
    latents, t, embedding = unet_inputs(tiny_pipe)
    plain = unet(latents, t, encoder_hidden_states=embedding).sample
    with block_outputs(unet, ["bottleneck", "up_blocks.3"]) as maps:
        hooked = unet(latents, t, encoder_hidden_states=embedding).sample
    assert torch.equal(hooked, plain)

    emb = unet.time_embedding(unet.time_proj(t))
    sample = unet.conv_in(latents)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, _ = block(sample, temb=emb, encoder_hidden_states=embedding)
        else:
            sample, _ = block(sample, temb=emb)
    middle = unet.mid_block(sample, emb, encoder_hidden_states=embedding)
    torch.testing.assert_close(maps["bottleneck"], middle)
    head = unet.conv_out(unet.conv_act(unet.conv_norm_out(maps["up_blocks.3"])))
    torch.testing.assert_close(head, plain)


@torch.no_grad()
def test_dit_block_outputs_are_token_grids_of_a_manual_forward(dit_pipe):
    dit = dit_pipe.transformer
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, labels = torch.tensor([10, 10]), torch.tensor([1000, 1000])
    plain = dit(latents, timestep=t, class_labels=labels).sample
    layers = [f"transformer_blocks.{i}" for i in range(3)]
    with block_outputs(dit, layers) as maps:
        hooked = dit(latents, timestep=t, class_labels=labels).sample
    assert torch.equal(hooked, plain)

    tokens = dit.pos_embed(latents)
    for layer, block in zip(layers, dit.transformer_blocks, strict=True):
        tokens = block(tokens, timestep=t, class_labels=labels)
        assert maps[layer].shape == (2, 16, 4, 4)
        torch.testing.assert_close(maps[layer], tokens_to_map(tokens, 4, 4))
    # token 4 * row + column sits at (row, column) of the grid
    torch.testing.assert_close(maps[layers[-1]][1, :, 2, 3], tokens[1, 4 * 2 + 3])


@torch.no_grad()
def test_capture_stops_after_the_last_layer_with_the_same_maps(tiny_pipe):
    unet = tiny_pipe.unet
    latents, t, embedding = unet_inputs(tiny_pipe)
    with block_outputs(unet, ["up_ft1"]) as maps:
        unet(latents, t, encoder_hidden_states=embedding)
    later = []
    handle = unet.up_blocks[2].register_forward_hook(lambda *args: later.append(1))
    try:
        captured = capture(
            unet, ["up_ft1"], lambda: unet(latents, t, encoder_hidden_states=embedding)
        )
    finally:
        handle.remove()
    assert later == []
    assert torch.equal(captured["up_ft1"], maps["up_ft1"])


def test_hooks_are_removed_when_the_forward_raises(tiny_pipe):
    unet = tiny_pipe.unet
    before = hook_counts(unet)
    bad = torch.zeros(1, 3, 16, 16)  # wrong channel count
    with pytest.raises(RuntimeError), block_outputs(unet, LAYERS):
        assert hook_counts(unet) > before
        unet(bad, 10, encoder_hidden_states=torch.zeros(1, 77, 32))
    with pytest.raises(RuntimeError):
        capture(unet, LAYERS, lambda: unet(bad, 10, encoder_hidden_states=torch.zeros(1, 77, 32)))
    assert hook_counts(unet) == before


def test_unknown_layer_lists_the_valid_ones_in_one_sentence(tiny_pipe, dit_pipe):
    with pytest.raises(ValueError) as error:
        resolve_layers(tiny_pipe.unet, ["up_ft9"])
    message = str(error.value)
    assert "\n" not in message
    assert "'up_ft9'" in message and "bottleneck (mid_block)" in message
    assert "up_blocks.3" in message
    with pytest.raises(ValueError, match="transformer_blocks.2$"):
        resolve_layers(dit_pipe.transformer, ["transformer_blocks.3"])


# Extraction and the cache


def test_image_folder_labels_are_the_sorted_class_subfolders(shapes_folder):
    images = image_folder(shapes_folder)
    scenes = list(dataset(N_IMAGES, seed=3, size=32, max_objects=1))
    assert images.classes == sorted({s.objects[0].shape for s in scenes})
    assert len(images) == N_IMAGES
    for image_id, label in zip(images.ids, images.labels, strict=True):
        index = int(image_id.split("/")[1].removesuffix(".png"))
        assert images.classes[label] == scenes[index].objects[0].shape
        assert image_id.startswith(images.classes[label] + "/")
    assert images.open(0).size == (32, 32)


def test_pixels_resize_the_shorter_side_and_centre_crop():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # a blue left quarter is cropped away
    tensor = pixels(image, 16)
    assert tensor.shape == (3, 16, 16)
    assert tensor.min() >= -1 and tensor.max() <= 1
    torch.testing.assert_close(tensor[:, 4:12, 4:12].mean(dim=(1, 2)), torch.tensor([1.0, -1, -1]))


def test_extraction_writes_the_cache_and_pooled_is_the_spatial_mean(
    extractor, shapes_folder, tmp_path
):
    images = image_folder(shapes_folder)
    written = extractor.extract(images, tmp_path, LAYERS, [25, 200], batch_size=4, maps=True)
    assert len(written) == 4 * 2 * 2
    meta = load_meta(tmp_path)
    assert meta.layers == ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert meta.timesteps == [25, 200]
    assert (meta.classes, meta.labels, meta.images) == (images.classes, images.labels, images.ids)
    assert meta.prompt == "" and meta.resolution == 32

    latents = extractor.encode([images.open(i) for i in range(N_IMAGES)])
    fresh = extractor.block_maps(latents, 200, ["up_ft1"], range(N_IMAGES))["up_ft1"]
    pooled = load_features(tmp_path, "up_ft1", 200)
    cached_maps = load_features(tmp_path, "up_blocks.1", 200, "maps")
    assert pooled.dtype == torch.float32 and cached_maps.dtype == torch.float16
    torch.testing.assert_close(pooled, fresh.mean(dim=(2, 3)))
    torch.testing.assert_close(cached_maps, fresh.half())
    assert not torch.allclose(pooled, load_features(tmp_path, "up_ft1", 25))
    assert load_features(tmp_path, "bottleneck", 25).shape == (N_IMAGES, 64)
    assert load_features(tmp_path, "up_ft2", 25).shape == (N_IMAGES, 32)


def test_features_do_not_depend_on_batch_size_or_layer_set(extractor, shapes_folder, tmp_path):
    images = image_folder(shapes_folder)
    extractor.extract(images, tmp_path / "a", ["bottleneck", "up_ft1"], [100], batch_size=3)
    extractor.extract(images, tmp_path / "b", ["bottleneck"], [100], batch_size=N_IMAGES)
    torch.testing.assert_close(
        load_features(tmp_path / "a", "bottleneck", 100),
        load_features(tmp_path / "b", "bottleneck", 100),
        rtol=1e-4,
        atol=1e-5,
    )


def test_noise_is_per_image_and_the_same_for_every_call():
    first = image_noise((4, 2, 2), seed=0, indices=[0, 1, 2])
    assert torch.equal(first[1:], image_noise((4, 2, 2), seed=0, indices=[1, 2]))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, image_noise((4, 2, 2), seed=1, indices=[0, 1, 2]))


def test_timestep_1000_reads_the_noisiest_trained_timestep(extractor):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    at_1000 = extractor.block_maps(latents, 1000, ["bottleneck"], [0, 1])["bottleneck"]
    at_999 = extractor.block_maps(latents, 999, ["bottleneck"], [0, 1])["bottleneck"]
    at_500 = extractor.block_maps(latents, 500, ["bottleneck"], [0, 1])["bottleneck"]
    assert torch.equal(at_1000, at_999)
    assert not torch.allclose(at_1000, at_500)


def test_a_rerun_skips_files_already_written(extractor, shapes_folder, tmp_path):
    images = image_folder(shapes_folder)
    extractor.extract(images, tmp_path, ["up_ft1"], [25])
    path = feature_path(tmp_path, "up_ft1", 25)
    os.utime(path, (0, 0))
    assert extractor.extract(images, tmp_path, ["up_ft1"], [25]) == []
    assert path.stat().st_mtime == 0
    written = extractor.extract(images, tmp_path, ["up_ft1", "bottleneck"], [25, 50])
    assert set(written) == {
        feature_path(tmp_path, "bottleneck", 25),
        feature_path(tmp_path, "up_ft1", 50),
        feature_path(tmp_path, "bottleneck", 50),
    }
    assert load_meta(tmp_path).timesteps == [25, 50]
    assert extractor.extract(images, tmp_path, ["up_ft1"], [25], overwrite=True) == [path]
    assert path.stat().st_mtime > 0


def test_a_cache_of_another_run_is_refused(tiny_pipe, shapes_folder, tmp_path):
    images = image_folder(shapes_folder)
    FeatureExtractor.from_pipeline(tiny_pipe, resolution=32).extract(images, tmp_path, ["up_ft1"])
    other = FeatureExtractor.from_pipeline(tiny_pipe, resolution=32, seed=1)
    with pytest.raises(ValueError, match="another run \\(its seed differ"):
        other.extract(images, tmp_path, ["up_ft1"], overwrite=True)


def test_a_prompt_changes_the_features(tiny_pipe, extractor, shapes_folder):
    prompted = FeatureExtractor.from_pipeline(tiny_pipe, prompt="a red circle", resolution=32)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    empty = extractor.block_maps(latents, 25, ["up_ft1"], [0])["up_ft1"]
    assert not torch.allclose(prompted.block_maps(latents, 25, ["up_ft1"], [0])["up_ft1"], empty)
    assert prompted.meta(image_folder(shapes_folder)).prompt == "a red circle"


def test_dit_features_by_block_index_with_the_null_class(dit_pipe, shapes_folder, tmp_path):
    extractor = FeatureExtractor.from_pipeline(dit_pipe, resolution=16)
    seen = []
    handle = dit_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True
    )
    try:
        extractor.extract(image_folder(shapes_folder), tmp_path, None, [25], maps=True)
    finally:
        handle.remove()
    assert all(torch.equal(labels, torch.full_like(labels, 1000)) for labels in seen)
    meta = load_meta(tmp_path)
    assert meta.layers == [f"transformer_blocks.{i}" for i in range(3)]
    assert meta.extra["condition"] == "null class"
    maps = load_features(tmp_path, "transformer_blocks.1", 25, "maps")
    assert maps.shape == (N_IMAGES, 16, 4, 4)
    torch.testing.assert_close(
        load_features(tmp_path, "transformer_blocks.1", 25),
        maps.float().mean(dim=(2, 3)),
        atol=2e-3,
        rtol=2e-3,
    )
    with pytest.raises(ValueError, match="null class"):
        FeatureExtractor.from_pipeline(dit_pipe, prompt="a dog")


# Input errors and other sources


class FakeDataset:
    """Just enough of a `datasets.Dataset` with an image and a ClassLabel column."""

    class Labels:
        names = ["cat", "dog"]

    features = {"image": object(), "label": Labels()}
    rows = [(Image.new("RGB", (8, 8), (i * 60, 0, 0)), i % 2) for i in range(3)]

    def __getitem__(self, key):
        if key == "label":
            return [label for _, label in self.rows]
        image, label = self.rows[key]
        return {"image": image, "label": label}


def test_dataset_rows_become_labelled_images():
    images = dataset_images(FakeDataset(), "test", "image", "label")
    assert images.classes == ["cat", "dog"]
    assert images.labels == [0, 1, 0]
    assert images.ids == ["test/0", "test/1", "test/2"]
    assert images.open(2).getpixel((0, 0)) == (120, 0, 0)
    with pytest.raises(ValueError, match="no column 'fine_label'; its columns are: image, label"):
        dataset_images(FakeDataset(), "test", "image", "fine_label")


def test_a_missing_datasets_package_is_one_clear_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        hf_dataset("user/pets")


def test_timesteps_are_integers_from_0_to_1000():
    assert check_timesteps([200, 25, 25, 0, 1000]) == [0, 25, 200, 1000]
    for bad in ([1001], [-1], [2.5], []):
        with pytest.raises(ValueError):
            check_timesteps(bad)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["--preset", "tiny", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_extracts_then_skips_what_is_cached(shapes_folder, tmp_path, capsys):
    args = ("--images", shapes_folder, "--out", tmp_path, "--layers", "up_ft1", "--timesteps", 25)
    code, out, _ = run_cli(capsys, *args, "--maps", "--batch-size", 4)
    assert code == 0 and "2 files written" in out
    assert load_meta(tmp_path).model == "tiny"
    assert load_features(tmp_path, "up_ft1", 25, "maps").shape == (N_IMAGES, 64, 8, 8)
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "0 files written" in out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "has no class subfolders"),
        ("flat", "has no class subfolders"),
        ("no_images", "hold no images"),
        ("layer", "unknown layer 'up_ft7'; valid ones are: bottleneck (mid_block)"),
        ("timestep", "timestep 1001 is not an integer in 0..1000"),
        ("negative", "timestep -5 is not an integer in 0..1000"),
    ],
)
def test_cli_input_errors_are_one_sentence(case, expected, shapes_folder, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    if case == "flat":
        Image.new("RGB", (8, 8)).save(folder / "a.png")
    if case == "no_images":
        (folder / "cat").mkdir()
        (folder / "cat" / "notes.txt").write_text("not an image")
    if case in ("layer", "timestep", "negative"):
        folder = shapes_folder
    layer = "up_ft7" if case == "layer" else "up_ft1"
    timestep = {"timestep": 1001, "negative": -5}.get(case, 25)
    args = ("--images", folder, "--out", tmp_path / "out", "--layers", layer)
    code, out, err = run_cli(capsys, *args, f"--timesteps={timestep}")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.parametrize("source", [[], ["--images", "a", "--dataset", "user/pets"]])
def test_cli_takes_images_or_a_dataset(source, tmp_path, capsys):
    assert main(["--out", str(tmp_path), *source]) == 2
    err = capsys.readouterr().err
    expected = "give the labelled images as --images FOLDER or as --dataset NAME, one of the two"
    assert err == f"error: {expected}\n"


def test_help_states_each_default_once():
    assert_defaults_stated_once(command_help("core.revelio.features"), FeaturesConfig)


def test_layers_by_alias_or_path_are_read_once(extractor):
    assert extractor.layers(["up_ft1", "bottleneck", "mid_block"]) == ["up_blocks.1", "mid_block"]
    assert extractor.layers() == ["mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2"]


def test_cli_reads_a_saved_dit_pipeline(dit_pipe, shapes_folder, tmp_path, capsys):
    dit_pipe.save_pretrained(tmp_path / "dit")
    args = ["--images", shapes_folder, "--out", tmp_path / "cache", "--model", tmp_path / "dit"]
    code, out, err = run_cli(capsys, *args, "--layers", "transformer_blocks.2")
    assert code == 0, err
    meta = load_meta(tmp_path / "cache")
    assert (meta.model, meta.resolution, meta.layers) == (
        str(tmp_path / "dit"),
        16,
        ["transformer_blocks.2"],
    )
    assert load_features(tmp_path / "cache", "transformer_blocks.2", 25).shape == (N_IMAGES, 16)


@pytest.mark.slow
def test_sd14_sized_features_have_the_papers_widths():
    from core.diffusion.tiny import sd14_shaped_pipeline

    extractor = FeatureExtractor.from_pipeline(sd14_shaped_pipeline())
    assert extractor.resolution == 512
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = extractor.block_maps(latents, 25, LAYERS, [0])
    shapes = {layer: tuple(found.shape[1:]) for layer, found in maps.items()}
    assert shapes == {
        "bottleneck": (1280, 8, 8),
        "up_ft0": (1280, 16, 16),
        "up_ft1": (1280, 32, 32),
        "up_ft2": (640, 64, 64),
    }
