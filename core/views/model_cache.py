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

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from core.diffusion.layouts import check_sae_fits, denoiser_of, layout_of
from core.diffusion.presets import PRESETS, Preset, get_preset
from core.diffusion.sampling import generate_images, image_size, on_each_step
from core.emergence.concepts import (
    ConceptDictionary,
    DictionaryLoadError,
    load_dictionaries,
)
from core.runtime import default_device
from core.sae.bank import SAEBank, SAEKey
from core.sae.config import SAELoadError
from core.sae.model import TopKSAE
from core.steer.strength import read_strengths
from core.views.dictionaries import Dictionaries
from core.views.dictionary_cache import cached_dictionaries, published_dictionaries
from core.views.examples import Examples
from core.views.labelling import Labelling

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

NO_DICTIONARIES = "No concept dictionaries"
"""How the note that a preset has none begins (it goes once they are built)."""


@dataclass
class Loaded:
    """One preset's models, as the app uses them: what generates, records and edits images
    (the pipeline, the SAEs and their steering strengths) here, and one part each for the
    dictionaries and word vectors, the models that label and score images, and the example
    index."""

    preset: Preset
    pipe: DiffusionPipeline
    bank: SAEBank
    dictionaries: Mapping[SAEKey, ConceptDictionary]
    """Kept as `Dictionaries`, which also give the word vectors they were built with."""
    notes: list[str] = field(default_factory=list)
    """What is missing and what that disables, one sentence each."""
    strengths: dict[str, dict[str, float]] | None = None
    """Steering strengths calibrated for the SAEs (kind -> stage); None: the paper's."""
    _cached: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep_dictionaries(self.dictionaries)
        self.labelling = Labelling(self.preset.annotator, self.device)
        self.examples = Examples(self.preset, self.pipe, self.bank, self.image_size()[0])

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def image_size(self) -> tuple[int, int]:
        return image_size(self.pipe, self.preset.resolution)

    def warm_up(self) -> tuple:
        """The word vectors and the labeller's annotator, loaded now rather than on first use."""
        return self.dictionaries.word_vectors, self.labelling.annotator

    def keep_dictionaries(self, by_key: Mapping[SAEKey, ConceptDictionary]) -> None:
        """Use these dictionaries, on the pipeline's device (where concept maps are made)."""
        for dictionary in by_key.values():
            dictionary.to(self.device)
        self.dictionaries = Dictionaries(by_key, self.preset.word_vectors)

    def find_built_dictionaries(self) -> None:
        """Take the dictionaries built for these SAEs since they were loaded (by another
        process, as ZeroGPU's worker, or another request), where the preset has none."""
        if not self.dictionaries:
            built = cached_dictionaries(self.preset)
            if built:
                self.keep_dictionaries(built)
                self.notes = [n for n in self.notes if not n.startswith(NO_DICTIONARIES)]

    def cached(self, name: str, load: Callable[[], object]) -> object:
        """`load()` once per name (what a view derives from the models); an exception is
        not cached."""
        if name not in self._cached:
            self._cached[name] = load()
        return self._cached[name]

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
        return generate_images(
            self.pipe,
            prompts,
            seeds,
            steps=steps,
            guidance_scale=guidance,
            resolution=self.image_size()[0],
            callback_on_step_end=on_each_step(on_step, steps) if on_step else None,
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
        if branch == "uncond" and not layout_of(denoiser_of(self.pipe)).batched_cfg:
            raise ValueError(
                "The uncond branch does not exist here: this model's guidance is distilled "
                "into it (FLUX.1), so every step runs the cond branch only."
            )
        if branch == "uncond" and self.preset.guidance_scale <= 1:
            raise ValueError("The uncond branch exists only with classifier-free guidance.")
        self.check_block(block, branch)

    def sae(self, block: str, t: float, branch: str) -> tuple[SAEKey, TopKSAE]:
        """The SAE of (block, branch) trained nearest to t, and its key."""
        self.check_block(block, branch)
        key = self.bank.nearest_key(block, t, branch)
        return key, self.bank[key]


class ModelCache:
    """Presets loaded on first use and kept (the `max_loaded` most recently used)."""

    def __init__(
        self,
        sae_sources: Mapping[str, str] | None = None,
        *,
        device: str | None = None,
        max_loaded: int = 2,
        presets: Mapping[str, Preset] | None = None,
    ) -> None:
        sources = {name: os.environ.get(p.sae_env) for name, p in PRESETS.items() if p.sae_env}
        sources.update({k: v for k, v in (sae_sources or {}).items() if v})
        self.sae_sources = {k: v for k, v in sources.items() if v}
        self.presets = dict(presets or {})
        """Presets served under a name in place of the one `PRESETS` has (a stand-in model)."""
        self.device = device
        self.max_loaded = max_loaded
        self.lock = threading.RLock()
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._loading: set[str] = set()
        self._failed: dict[str, str] = {}
        """Preset -> why its last load failed (until one succeeds)."""

    def preset(self, name: str) -> Preset:
        if name in self.presets:
            return self.presets[name]
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
            loaded = self.get(name, on_load)
            loaded.find_built_dictionaries()
            yield loaded

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
                f"The preset {preset.name!r} has no SAEs configured; set {preset.sae_env} (or "
                f"pass --saes {preset.name}=REPO) to a Hub repo or folder of SAEs, or train "
                "them with `python -m core.training.train`."
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
        for key, sae in bank.items():
            check_sae_fits(sae.cfg, denoiser_of(pipe), key.block)
        notes = []
        try:
            dictionaries = load_dictionaries(preset.sae_source, preset.hook_points)
        except DictionaryLoadError as error:
            dictionaries = published_dictionaries(preset) or cached_dictionaries(preset)
            if not dictionaries:
                notes.append(
                    f"{NO_DICTIONARIES} ({error.args[0]}): concepts can be chosen by CID only, "
                    "and the emergence view is unavailable until they are built."
                )
        strengths, note = read_strengths(preset.sae_source)
        notes.extend([note] if note else [])
        return Loaded(preset, pipe, bank, dictionaries, notes, strengths)
