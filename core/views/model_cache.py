"""What a long-running process (the app) serves: per preset, a pipeline, its SAEs and
concept dictionaries, loaded lazily, once, and kept.

    cache = ModelCache(sae_sources={"sd14": "user/sd14-saes"})
    with cache.using("tiny") as loaded:      # one model job at a time, process-wide
        loaded.pipe(...), loaded.bank, loaded.dictionaries

The pipeline is shared by every request, and the core's hooks and interventions attach
to it for the duration of a `with` block, so two generations must never overlap on it:
`using` holds one process-wide lock while the caller works. Loading failures are not
cached, so files put in place later are found on the next request.

Model libraries (diffusers, and through it transformers) are imported when a preset first
loads, not with this module, so that the app serves its page before they are.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor

from core.annotate.annotation import Annotator
from core.annotate.labellers import AnnotatorConfig, Segmenter
from core.diffusion.presets import SD14_SAES_ENV, Preset, get_preset
from core.diffusion.sampling import generate_images
from core.emergence.concepts import (
    ConceptDictionary,
    DictionaryLoadError,
    concept_cids,
    load_dictionaries,
)
from core.emergence.gathering import EXAMPLES_FILE, SPATIAL_MEANS_FILE, load_spatial_means
from core.emergence.words import WordVectors, load_word_vectors
from core.files import local_or_snapshot
from core.runtime import ModelNotAvailableError, default_device
from core.sae.bank import SAEBank, SAEKey
from core.sae.config import SAELoadError
from core.sae.model import TopKSAE
from core.steer.strength import read_strengths

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


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


@dataclass
class Loaded:
    """One preset's models, as the app uses them."""

    preset: Preset
    pipe: DiffusionPipeline
    bank: SAEBank
    dictionaries: dict[SAEKey, ConceptDictionary]
    notes: list[str] = field(default_factory=list)
    """What is missing and what that disables, one sentence each."""
    strengths: dict[str, dict[str, float]] | None = None
    """Steering strengths calibrated for the SAEs (kind -> stage); None: the paper's."""
    _cached: dict[str, object] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def image_size(self) -> tuple[int, int]:
        side = self.preset.resolution or (
            self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        )
        return side, side

    def cached(self, name: str, load: Callable[[], object]) -> object:
        """`load()` once per name; an exception is not cached."""
        if name not in self._cached:
            self._cached[name] = load()
        return self._cached[name]

    def word_vectors(self) -> WordVectors:
        """The word vectors the dictionaries were built with (else the preset's)."""
        sources = {d.word_vectors for d in self.dictionaries.values()}
        source = sources.pop() if len(sources) == 1 else self.preset.word_vectors
        return self.cached(f"words:{source}", lambda: load_word_vectors(source))

    def annotator(self) -> tuple[Annotator | None, str | None]:
        """(annotator, None), or (None, why there is none) when its models cannot load."""
        return self.cached("annotator", self._load_annotator)

    def _load_annotator(self) -> tuple[Annotator | None, str | None]:
        """The emergence view scores the prompt's words against the final image's annotation,
        so the labeller's reference annotator looks for the prompt's objects."""
        try:
            return self.labelling().load_reference(self.device), None
        except (OSError, ValueError, ModelNotAvailableError) as error:
            return None, f"no annotator ({error.args[0] if error.args else error})"

    def segmenter(self) -> tuple[object | None, str]:
        """(the spatial-edit evaluator's segmenter, what it is), or (None, why there is none):
        the shapes world's pixels for its presets, else CLIPSeg, as the emergence paper."""
        return self.cached("segmenter", self._load_segmenter)

    def _load_segmenter(self) -> tuple[Segmenter | None, str]:
        labelling = self.labelling()
        evaluator = labelling.labeller.evaluator
        try:
            return labelling.load_segmenter(self.device), evaluator
        except (OSError, ValueError, ModelNotAvailableError) as error:
            return None, f"{evaluator} does not load ({error.args[0] if error.args else error})"

    def labelling(self) -> AnnotatorConfig:
        """The preset's labeller with its default models."""
        return AnnotatorConfig(annotator=self.preset.annotator)

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        steps: int,
        *,
        guidance_scale: float | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """One image per prompt, prompt i from seed i; `on_step(done, total)` after each step."""
        guidance = self.preset.guidance_scale if guidance_scale is None else guidance_scale

        def step_end(pipe, index: int, timestep, callback_kwargs: dict) -> dict:
            if on_step is not None:
                on_step(index + 1, steps)
            return callback_kwargs

        return generate_images(
            self.pipe,
            prompts,
            seeds,
            steps=steps,
            guidance_scale=guidance,
            resolution=self.image_size()[0],
            callback_on_step_end=step_end,
        )

    def check_block(self, block: str, branch: str = "cond") -> None:
        """Raise a ValueError unless the bank has SAEs for `block` on `branch`."""
        if block not in self.preset.hook_points:
            raise ValueError(
                f"The block {block!r} is not a hook point of the preset {self.preset.name!r}; "
                f"choose one of {', '.join(self.preset.hook_points)}."
            )
        if not any(k.block == block and k.branch == branch for k in self.bank):
            have = sorted({f"{k.block} ({k.branch})" for k in self.bank})
            raise ValueError(
                f"There is no SAE for {block} on the {branch} branch; this preset has SAEs for "
                f"{', '.join(have)}."
            )

    def check_recorded(self, block: str, branch: str) -> None:
        """That a generation runs `branch`, so that it can be recorded or edited, and
        `check_block`."""
        if branch == "uncond" and self.preset.guidance_scale <= 1:
            raise ValueError("The uncond branch exists only with classifier-free guidance.")
        self.check_block(block, branch)

    def word_cids(self, word: str, block: str, branches: Sequence[str]) -> dict[SAEKey, list[int]]:
        """The CIDs labelled `word` in each dictionary of `block` on `branches`
        (`concept_cids`); an error when the preset has no dictionaries."""
        if not self.dictionaries:
            raise ValueError("This preset has no concept dictionaries; choose a concept by CID.")
        found: dict[SAEKey, list[int]] = {}
        for branch in branches:
            found.update(concept_cids(self.dictionaries, word, block, branch))
        return found

    def sae(self, block: str, t: float, branch: str) -> tuple[SAEKey, TopKSAE]:
        """The SAE of (block, branch) trained nearest to t, and its key."""
        self.check_block(block, branch)
        key = self.bank.nearest_key(block, t, branch)
        return key, self.bank[key]

    def example_index(self) -> ExampleIndex | None:
        """The index shipped beside the SAEs (examples.json + spatial means), or None."""
        return self.cached("examples", self._shipped_index)

    def _shipped_index(self) -> ExampleIndex | None:
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


class ModelCache:
    """Presets loaded on first use and kept (the `max_loaded` most recently used)."""

    def __init__(
        self,
        sae_sources: Mapping[str, str] | None = None,
        *,
        device: str | None = None,
        max_loaded: int = 2,
    ) -> None:
        sources = {"sd14": os.environ.get(SD14_SAES_ENV) or None}
        sources.update({k: v for k, v in (sae_sources or {}).items() if v})
        self.sae_sources = {k: v for k, v in sources.items() if v}
        self.device = device
        self.max_loaded = max_loaded
        self.lock = threading.RLock()
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._loading: set[str] = set()
        self._failed: dict[str, str] = {}
        """Preset -> why its last load failed (until one succeeds)."""

    def preset(self, name: str) -> Preset:
        source = self.sae_sources.get(name)
        return get_preset(name, sae_source=source) if source else get_preset(name)

    def loaded_now(self, name: str) -> Loaded | None:
        """The preset's models if they are loaded, without waiting for the model lock."""
        return self._loaded.get(name)

    def state(self, name: str) -> tuple[str, str | None]:
        """("loaded" | "loading" | "not loaded", None) or ("failed", why), without waiting
        for the model lock."""
        if name in self._loaded:
            return "loaded", None
        if name in self._loading:
            return "loading", None
        return ("failed", self._failed[name]) if name in self._failed else ("not loaded", None)

    @contextmanager
    def using(self, name: str, on_load: Callable[[str], None] | None = None) -> Iterator[Loaded]:
        """Hold the model lock and yield the preset's models, loading them if needed."""
        with self.lock:
            yield self.get(name, on_load)

    def get(self, name: str, on_load: Callable[[str], None] | None = None) -> Loaded:
        with self.lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            self._loading.add(name)
            try:
                if on_load:
                    on_load(name)
                loaded = self._loaded[name] = self._load(self.preset(name))
                self._failed.pop(name, None)
            except Exception as error:
                self._failed[name] = str(error.args[0]) if error.args else type(error).__name__
                raise
            finally:
                self._loading.discard(name)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return loaded

    def _load(self, preset: Preset) -> Loaded:
        if not preset.sae_source:
            raise ValueError(
                f"The preset {preset.name!r} has no SAEs configured; set {SD14_SAES_ENV} (or "
                "pass --sd14-saes) to a Hub repo or folder of SAEs, or train them with "
                "`python -m core.training.train`."
            )
        from core.diffusion.pipelines import load_pipeline

        pipe = load_pipeline(preset, device=self.device or default_device())
        try:
            source, blocks = preset.sae_source, preset.hook_points
            bank = SAEBank.from_pretrained(
                source, blocks, variant=preset.sae_variant, device=pipe.device
            )
        except SAELoadError as error:
            message = f"the SAEs of the preset {preset.name!r} are not available: {error.args[0]}"
            raise ValueError(message) from error
        notes = []
        try:
            dictionaries = load_dictionaries(preset.sae_source, preset.hook_points)
        except DictionaryLoadError as error:
            dictionaries = {}
            notes.append(
                f"No concept dictionaries ({error.args[0]}): concepts can be chosen by CID only, "
                "and the emergence view is unavailable."
            )
        for dictionary in dictionaries.values():
            dictionary.to(pipe.device)
        strengths, note = read_strengths(preset.sae_source)
        notes.extend([note] if note else [])
        return Loaded(preset, pipe, bank, dictionaries, notes, strengths)
