"""SAEs, concept dictionaries, composition maps and steering on diffusion-transformer
blocks, with no special case above the hooks: the training command on each tiny DiT preset
(PixArt, SD3, FLUX layouts), a dictionary from a labeller that calls the whole image a
circle, the circle's composition map on the patch grid at every step, and interventions."""

import numpy as np
import pytest

from core.annotate.annotation import ObjectAnnotation
from core.diffusion.hooks import record
from core.diffusion.layouts import block_width, check_sae_fits, denoiser_of
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import get_preset
from core.diffusion.sampling import generate_images
from core.emergence.composition import predict_over_steps
from core.emergence.gathering import gather
from core.emergence.words import BUNDLED_GLOVE, load_word_vectors
from core.sae.bank import SAEKey
from core.steer.intervene import Intervention, intervene
from core.training.train import RunConfig, train

LAYOUTS = {"tiny-pixart": "PixArt", "tiny-sd3": "SD3", "tiny-flux": "FLUX"}
PROMPTS = ["a red circle", "a blue circle", "a green square", "a circle on a table"] * 2


class WholeImage:
    """Calls the whole image a circle."""

    def annotate(self, image, prompt=None) -> list[ObjectAnnotation]:
        return [ObjectAnnotation("circle", np.ones(image.size[::-1], dtype=bool), 1.0)]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def trained(request, tmp_path_factory):
    """(preset, pipeline, SAEs of its middle block at t = 1 and 0.5, their dictionaries)."""
    name = request.param
    preset = get_preset(name)
    folder = tmp_path_factory.mktemp(name)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    block = preset.hook_points[1]
    config = RunConfig(
        out=str(folder / "run"),
        preset=name,
        prompts=str(folder / "prompts.txt"),
        blocks=(block,),
        t=(1.0, 0.5),
        expansion_factor=4,
        k=4,
        batch_size=64,
        buffer_size=256,
        lr=1e-3,
    )
    bank = train(config)
    pipe = load_pipeline(preset, device="cpu")
    gathered = gather(
        pipe,
        bank,
        PROMPTS[:4],
        WholeImage(),
        keys=bank.keys(),
        steps=preset.steps,
        guidance_scale=preset.guidance_scale,
        resolution=preset.resolution,
        iou_threshold=0.2,
    )
    vectors = load_word_vectors(BUNDLED_GLOVE)
    dictionaries = {key: b.build(vectors) for key, b in gathered.builders.items()}
    return preset, pipe, bank, dictionaries, vectors


def test_the_training_command_trains_saes_on_a_dit_block(trained):
    preset, pipe, bank, _, _ = trained
    block = preset.hook_points[1]
    assert sorted(bank.keys()) == [SAEKey(block, 0.5, "cond"), SAEKey(block, 1.0, "cond")]
    module = dict(denoiser_of(pipe).named_modules())[block]
    for _, sae in bank.items():
        cfg = sae.cfg
        assert (cfg.layout, cfg.stream, cfg.d_in) == (LAYOUTS[preset.name], "image", 32)
        assert cfg.d_in == block_width(module)
        assert cfg.metrics["num_steps"] > 0


def test_the_training_command_reads_a_joint_blocks_text_stream(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    block = get_preset("tiny-sd3").hook_points[1]
    settings = dict(prompts=str(tmp_path / "prompts.txt"), blocks=(block,), stream="text", t=(1.0,))
    settings.update(expansion_factor=4, k=4, batch_size=64, buffer_size=256)
    bank = train(RunConfig(out=str(tmp_path / "sd3"), preset="tiny-sd3", **settings))
    denoiser = denoiser_of(load_pipeline(get_preset("tiny-sd3"), device="cpu"))
    ((_, sae),) = bank.items()
    module = dict(denoiser.named_modules())[block]
    assert (sae.cfg.stream, sae.cfg.d_in) == ("text", block_width(module, "text"))
    check_sae_fits(sae.cfg, denoiser, block, "text")
    with pytest.raises(ValueError, match="reads the text stream, not the image one"):
        check_sae_fits(sae.cfg, denoiser, block)
    pixart = RunConfig(out=str(tmp_path / "pixart"), preset="tiny-pixart", **settings)
    with pytest.raises(ValueError, match="a BasicTransformerBlock has no text stream"):
        train(pixart)
    assert not (tmp_path / "pixart").exists()


def test_a_dictionary_and_a_composition_map_on_the_patch_grid(trained):
    preset, pipe, bank, dictionaries, vectors = trained
    block = preset.hook_points[1]
    assert all(d.cids_for("circle") for d in dictionaries.values())  # labelled concepts
    with record(pipe, [block]) as recording:
        generate_images(
            pipe,
            ["a red circle"],
            [7],
            steps=preset.steps,
            guidance_scale=preset.guidance_scale,
            resolution=32,
        )
    steps = predict_over_steps(
        recording, bank, dictionaries, ["circle"], vectors, block=block, branch="cond"
    )
    assert len(steps) == preset.steps
    assert {tuple(step.predictions["circle"].mask.shape) for step in steps} == {(1, 8, 8)}
    assert {step.sae_key.t for step in steps} == {1.0, 0.5}  # each step read by the nearest SAE


def test_steering_a_dit_block(trained):
    preset, pipe, bank, dictionaries, _ = trained
    block = preset.hook_points[1]
    cids = {key: d.cids_for("circle") for key, d in dictionaries.items()}

    def generate():
        return generate_images(
            pipe,
            ["a blue square"],
            [3],
            steps=preset.steps,
            guidance_scale=preset.guidance_scale,
            resolution=32,
            output_type="np",
        )[0]

    plain = generate()
    images = {}
    for kind, strength in (("global", 0.0), ("global", 50.0), ("spatial", 50.0)):
        region = np.zeros((32, 32), bool)
        region[:16, :16] = True
        edit = Intervention(
            kind=kind,
            cids=cids,
            strength=strength,
            window="early",
            region=region if kind == "spatial" else None,
            stages=preset.stages,
        )
        with intervene(pipe, bank, block, edit, (32, 32)) as done:
            images[kind, strength] = generate()
        assert bool(done.edited()) == (strength > 0)
    assert (images["global", 0.0] == plain).all()
    assert not (images["global", 50.0] == plain).all()
    assert not (images["spatial", 50.0] == plain).all()


def test_an_sae_of_another_kind_of_denoiser_is_refused(trained):
    preset, pipe, bank, _, _ = trained
    block = preset.hook_points[1]
    cfg = bank.items()[0][1].cfg
    other = "FLUX" if cfg.layout != "FLUX" else "PixArt"
    with pytest.raises(ValueError) as refused:
        check_sae_fits(type(cfg)(**{**vars(cfg), "layout": other}), denoiser_of(pipe), block)
    assert str(refused.value) == (
        f"The SAE of {block} (t={cfg.t:g}, cond) was trained on a {other} block and this model "
        f"is a {cfg.layout}; train SAEs on this model (python -m core.training.train)."
    )
    with pytest.raises(ValueError, match="unknown hook point 'mid_block.attentions.0'; valid"):
        check_sae_fits(cfg, denoiser_of(pipe), "mid_block.attentions.0")
    with pytest.raises(ValueError, match="reads width 32 but the block has 64 channels"):
        check_sae_fits(type(cfg)(**{**vars(cfg), "d_in": 32}), _wider(pipe), block)


def _wider(pipe):
    """A denoiser of the same layout twice as wide."""
    denoiser = denoiser_of(pipe)
    config = dict(denoiser.config)
    heads = "num_attention_heads"
    return type(denoiser).from_config({**config, heads: 2 * config[heads]})
