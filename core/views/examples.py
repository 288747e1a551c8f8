"""A preset's example index: generated images whose latents' spatial means rank a concept's
top examples (paper 1). The index shipped beside the SAEs (examples.json and the spatial
means `build_dictionary` writes) when there is one, else one built once, on demand, from a
few prompts of the preset's kind."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from torch import Tensor

from core.diffusion.presets import PRESETS, Preset
from core.emergence.gathering import (
    EXAMPLES_FILE,
    SPATIAL_MEANS_FILE,
    gather,
    load_spatial_means,
)
from core.files import local_or_snapshot
from core.sae.bank import SAEBank, SAEKey
from core.training.activations import read_prompts

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

ON_DEMAND_PROMPTS = PRESETS["tiny"].prompts
"""The prompts of an on-demand index for a preset that ships none."""
ON_DEMAND_COUNT = 16
"""Images generated for an on-demand example index (when none is shipped)."""


@dataclass
class ExampleIndex:
    """Generated images whose latents' spatial means rank a concept's top examples."""

    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance_scale: float
    means: dict[SAEKey, Tensor]
    """Per SAE, [num_images, num_latents] spatial means (row i: prompts[i], seeds[i])."""
    source: str
    """Where it comes from: "shipped" with the SAEs, or "built" on demand."""


class _NoObjects:
    """An annotator that finds nothing: gathering then only ranks examples."""

    def annotate(self, image, prompt=None) -> list:
        return []


class Examples:
    def __init__(self, preset: Preset, pipe: DiffusionPipeline, bank: SAEBank, side: int):
        self.preset, self.pipe, self.bank, self.side = preset, pipe, bank, side

    @cached_property
    def shipped(self) -> ExampleIndex | None:
        """The index shipped beside the SAEs, or None."""
        patterns = [EXAMPLES_FILE, f"*{SPATIAL_MEANS_FILE}"]
        try:
            root = local_or_snapshot(self.preset.sae_source, patterns)
        except FileNotFoundError:
            return None
        if not (root / EXAMPLES_FILE).is_file():
            return None
        info = json.loads((root / EXAMPLES_FILE).read_text())
        means = {}
        for key in self.bank:
            try:
                means[key] = load_spatial_means(root, key)
            except FileNotFoundError:
                continue
        return ExampleIndex(
            info["prompts"],
            info["seeds"],
            int(info.get("steps", self.preset.steps)),
            float(info.get("guidance_scale", self.preset.guidance_scale)),
            means,
            "shipped",
        )

    @cached_property
    def index(self) -> ExampleIndex:
        """The shipped index, or one built once from ON_DEMAND_COUNT prompts."""
        return self.shipped or self._build()

    def _build(self) -> ExampleIndex:
        preset = self.preset
        prompts = read_prompts(preset.prompts or ON_DEMAND_PROMPTS)[:ON_DEMAND_COUNT]
        keys = [key for key in self.bank if key.t is not None]
        gathered = gather(
            self.pipe,
            self.bank,
            prompts,
            _NoObjects(),
            keys=keys,
            steps=preset.steps,
            guidance_scale=preset.guidance_scale,
            resolution=self.side,
        )
        means = {key: gathered.means(key) for key in gathered.builders}
        seeds = list(range(len(prompts)))
        return ExampleIndex(prompts, seeds, preset.steps, preset.guidance_scale, means, "built")
