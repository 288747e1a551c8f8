"""The models that label and score a preset's images for the views, each loaded on first
use and kept: the preset's labeller's reference annotator (the emergence view's reference
masks) and segmenter (where a spatial edit put its object), LPIPS and CLIP (how much a
steered image changed). One that cannot load is (None, why), and the views say why."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cached_property

import torch

from core.annotate.annotation import Annotator
from core.annotate.labellers import AnnotatorConfig, Scorer, Segmenter
from core.annotate.tags import CLIP_ID
from core.emergence.metrics import load_lpips
from core.runtime import ModelNotAvailableError

NOT_LOADED = (OSError, ValueError, ModelNotAvailableError)


def _why(error: BaseException) -> str:
    return str(error.args[0]) if error.args else type(error).__name__


class Labelling:
    def __init__(self, annotator: str, device: torch.device) -> None:
        self.config = AnnotatorConfig(annotator=annotator)
        """The labeller named by the preset, with its default models."""
        self.device = device

    @cached_property
    def annotator(self) -> tuple[Annotator | None, str | None]:
        """(the annotator of the final image, None), or (None, why there is none): it looks
        for the prompt's objects, whose masks the emergence view scores against."""
        try:
            return self.config.load_reference(self.device), None
        except NOT_LOADED as error:
            return None, f"no annotator ({_why(error)})"

    @cached_property
    def dictionary_annotator(self) -> tuple[Annotator | None, str]:
        """(the annotator that labels images for concept dictionaries, its labeller's name),
        or (None, why there is none): the preset's labeller, else its fallback where that
        does not load. It labels what it sees, not the prompt's words."""
        try:
            return self.config.load_annotator(self.device), self.config.annotator
        except NOT_LOADED as error:
            first = f"{self.config.annotator} ({_why(error)})"
        fallback = self.config.labeller.fallback
        if fallback is None:
            return None, f"the labeller does not load: {first}"
        try:
            config = replace(self.config, annotator=fallback)
            return config.load_annotator(self.device), fallback
        except NOT_LOADED as error:
            return None, f"no labeller loads: {first}, {fallback} ({_why(error)})"

    @cached_property
    def segmenter(self) -> tuple[Segmenter | None, str]:
        """(the spatial-edit evaluator's segmenter, what it is), or (None, why there is none):
        the shapes world's pixels for its presets, else CLIPSeg, as the emergence paper."""
        evaluator = self.config.labeller.evaluator
        try:
            return self.config.load_segmenter(self.device), evaluator
        except NOT_LOADED as error:
            return None, f"{evaluator} does not load ({_why(error)})"

    @cached_property
    def lpips(self) -> tuple[Callable | None, str | None]:
        """(LPIPS distance, None), or (None, why it is unavailable)."""
        return load_lpips(self.device)

    @cached_property
    def clip(self) -> tuple[Scorer | None, str | None]:
        """(CLIP's similarity of images and a text, None), or (None, why it does not load)."""
        from core.annotate.scorers import ClipScorer

        try:
            return ClipScorer(device=self.device), None
        except NOT_LOADED:
            return (
                None,
                f"unavailable: the CLIP model {CLIP_ID!r} is neither cached nor downloadable",
            )
