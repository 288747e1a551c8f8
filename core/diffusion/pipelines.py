"""Turn a preset into a diffusers pipeline, exactly as a user with internet access would
(`DiffusionPipeline.from_pretrained`), except for `tiny` and the tiny DiTs, which are built
from configs with random weights."""

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from core.diffusion.checksums import verify_assets
from core.diffusion.presets import TINY_MODEL, Preset
from core.diffusion.tiny import build_tiny_pipeline
from core.diffusion.tiny_dit import (
    build_tiny_flux_pipeline,
    build_tiny_pixart_pipeline,
    build_tiny_sd3_pipeline,
)
from core.runtime import ModelNotAvailableError, default_device

BUILT = {
    TINY_MODEL: build_tiny_pipeline,
    "tiny-pixart": build_tiny_pixart_pipeline,
    "tiny-sd3": build_tiny_sd3_pipeline,
    "tiny-flux": build_tiny_flux_pipeline,
}
"""Models built from configs, by name."""


def load_pipeline(
    preset: Preset, device: str | None = None, dtype: torch.dtype | None = None
) -> DiffusionPipeline:
    """Load the preset's pipeline onto `device` (fp16 on CUDA unless `dtype` says otherwise)."""
    device = device or default_device()
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if preset.model in BUILT:
        pipe = BUILT[preset.model]()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        if preset.assets and Path(preset.model).resolve().is_relative_to(preset.assets):
            verify_assets(preset.assets)
        pipe = _from_pretrained(preset.model, dtype)
    if preset.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_pretrained(model: str, dtype: torch.dtype) -> DiffusionPipeline:
    try:
        # no safety checker, where the pipeline has one (SD v1.4's)
        index = DiffusionPipeline.load_config(model)
        unchecked = {"safety_checker": None} if "safety_checker" in index else {}
        return DiffusionPipeline.from_pretrained(model, dtype=dtype, **unchecked)
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(
            f"could not load the pipeline {model!r} ({type(error).__name__}): it is not in the "
            "local Hugging Face cache and could not be downloaded. Run once with internet "
            f"access (or `hf download {model}`), pass a local pipeline folder instead, "
            "or use the offline preset `tiny`."
        ) from error
