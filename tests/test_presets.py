import subprocess
import sys
from collections import Counter

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import PAPER_STAGES, PRESETS, SD14_BLOCKS, STAGES, get_preset
from core.diffusion.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from core.files import REPO_ROOT
from core.runtime import ModelNotAvailableError
from core.steer.windows import stage_at
from tests.helpers import seeded


def test_sd14_preset_follows_the_paper():
    preset = get_preset("sd14")
    assert preset.model == "CompVis/stable-diffusion-v1-4"
    assert (preset.steps, preset.guidance_scale, preset.scheduler) == (50, 7.5, "ddim")
    assert preset.hook_points == SD14_BLOCKS
    assert STAGES == {"early": (0.6, 1.0), "middle": (0.2, 0.6), "final": (0.0, 0.2)}


@pytest.mark.parametrize("name", list(PRESETS))
def test_the_page_opens_each_preset_on_its_own_blocks(name):
    preset = PRESETS[name]
    assert {preset.app.block, preset.app.steer_block} <= set(preset.hook_points)
    assert preset.app.about and not preset.app.about.endswith(".")  # the status line adds it


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="sd14, sdxl-turbo, toy, tiny"):
        get_preset("sd15")


def test_a_saved_pipeline_loads_through_from_pretrained(tmp_path):
    built = build_tiny_pipeline()
    built.save_pretrained(tmp_path)
    loaded = load_pipeline(get_preset("sd14", model=str(tmp_path)), device="cpu")
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    kwargs = dict(num_inference_steps=3, guidance_scale=7.5, output_type="np")
    a = built("a red cat", generator=seeded(0), **kwargs).images
    b = loaded("a red cat", generator=seeded(0), **kwargs).images
    assert (a == b).all()


def test_tiny_weights_depend_only_on_the_seed():
    torch.manual_seed(123)
    a = build_tiny_pipeline(seed=0).unet.state_dict()
    b = build_tiny_pipeline(seed=0).unet.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_offline_hub_model_says_what_to_do():
    with pytest.raises(ModelNotAvailableError) as error:
        load_pipeline(get_preset("sd14"), device="cpu")
    message = str(error.value)
    assert "CompVis/stable-diffusion-v1-4" in message
    assert "internet" in message and "tiny" in message


def test_start_prints_no_warning_a_user_cannot_act_on():
    code = "import core.diffusion.presets, core.steer.intervene, diffusers.loaders.ip_adapter"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert "torchvision" not in result.stderr, result.stderr


def test_sdxl_turbo_stages_put_each_of_its_four_steps_in_a_stage():
    scheduler = build_tiny_sdxl_pipeline().scheduler  # SDXL-Turbo's: trailing timesteps
    scheduler.set_timesteps(4)
    ts = [float(timestep) / 1000 for timestep in scheduler.timesteps]
    stages = get_preset("sdxl-turbo").stages
    assert [stage_at(t, stages) for t in ts] == ["early", "middle", "middle", "final"]
    assert [stage_at(t, PAPER_STAGES) for t in ts] == ["early", "early", "middle", "middle"]
    scheduler.set_timesteps(1)
    assert stage_at(float(scheduler.timesteps[0]) / 1000, stages) == "early"


def test_sd3_stages_hold_the_papers_share_of_its_shifted_flow_matching_steps():
    """The paper's windows hold 40%, 40% and 20% of DDIM's evenly spaced steps; SD3's shift
    of 3 crowds its 40 steps near the noise, where its own windows give the same shares."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's and SD3.5's config
    scheduler.set_timesteps(40)
    ts = [float(timestep) / 1000 for timestep in scheduler.timesteps]
    shares = Counter(stage_at(t, get_preset("sd3").stages) for t in ts)
    assert shares == {"early": 16, "middle": 16, "final": 8}
    paper = Counter(stage_at(t, PAPER_STAGES) for t in ts)
    assert paper["early"] > 25  # the paper's windows would make most steps early


def test_flux_schnells_four_steps_fall_one_two_one_into_the_stages():
    """FLUX's pipeline passes sigmas 1, 0.75, 0.5, 0.25 for 4 steps (schnell: no shift)."""
    ts = [1.0, 0.75, 0.5, 0.25]
    stages = get_preset("flux").stages
    assert [stage_at(t, stages) for t in ts] == ["early", "middle", "middle", "final"]
