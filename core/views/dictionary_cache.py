"""Concept dictionaries for SAEs published without them (SDLens's): published ones a preset
names, or those built on first use (`core.views.dictionary_build`) and kept in a local cache
that every later start reads instead of building.

The cache lives beside the Hugging Face cache (`HF_HOME`, on a Space the persistent one
where it has storage), one folder per SAE source; `python -m core.emergence.build_dictionary
--push-to-hub` publishes such a folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import constants

from core.emergence.concepts import ConceptDictionary, DictionaryLoadError, load_dictionaries
from core.sae.bank import SAEKey

if TYPE_CHECKING:
    from core.diffusion.presets import Preset

CACHE_ROOT = Path(constants.HF_HOME) / "concept-dictionaries"
"""Where first-use builds are kept, one folder per SAE source (`cache_folder`)."""


def cache_folder(preset: Preset) -> Path:
    """Where the dictionaries built for the preset's SAEs are kept."""
    source = f"{preset.sae_source}--{preset.sae_variant or 'all'}"
    return CACHE_ROOT / re.sub(r"[^A-Za-z0-9._-]+", "--", source).strip("-")


def cached_dictionaries(preset: Preset) -> dict[SAEKey, ConceptDictionary]:
    """The dictionaries built earlier for the preset's SAEs; empty where none were."""
    folder = cache_folder(preset)
    if not folder.is_dir():
        return {}
    try:
        return load_dictionaries(folder, preset.hook_points)
    except DictionaryLoadError:
        return {}


def published_dictionaries(preset: Preset) -> dict[SAEKey, ConceptDictionary]:
    """The dictionaries published for the preset's SAEs (its `dictionary_source`); empty
    where it names none or they cannot be had (offline, say: they are built then)."""
    if not preset.dictionary_source:
        return {}
    try:
        return load_dictionaries(preset.dictionary_source, preset.hook_points)
    except DictionaryLoadError:
        return {}
