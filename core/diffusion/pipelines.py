"""Turn a preset into a diffusers pipeline, exactly as a user with internet access would
(`DiffusionPipeline.from_pretrained`), except for `tiny`, which is built from configs with
random weights."""

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from core.diffusion.checksums import verify_assets
from core.diffusion.presets import TINY_MODEL, Preset
from core.diffusion.tiny import build_tiny_pipeline
from core.runtime import ModelNotAvailableError, default_device


def load_pipeline(
    preset: Preset, device: str | None = None, dtype: torch.dtype | None = None
) -> DiffusionPipeline:
    """Load the preset's pipeline onto `device` (fp16 on CUDA unless `dtype` says otherwise)."""
    device = device or default_device()
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if preset.model == TINY_MODEL:
        pipe = build_tiny_pipeline()
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
    kwargs = {"dtype": dtype}
    try:
        return DiffusionPipeline.from_pretrained(model, safety_checker=None, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(
            f"could not load the pipeline {model!r} ({type(error).__name__}): it is not in the "
            "local Hugging Face cache and could not be downloaded. Run once with internet "
            f"access (or `hf download {model}`), pass a local pipeline folder instead, "
            "or use the offline preset `tiny`."
        ) from error
