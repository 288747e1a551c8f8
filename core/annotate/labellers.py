"""Labellers by name: what labels and scores the images of one world, in one registry that
the commands and the page both choose from.

A labeller gives the annotator that concept dictionaries are built with, the annotator of the
emergence view's reference masks (it looks for the prompt's objects), the segmenter that
finds where a spatial edit's object went, the scorer of global edits, and what the paper's
evaluations ask of its world's images. Three are registered: the paper's ("grounded-sam":
tags -> Grounding DINO -> SAM, CLIPSeg, CLIP; models downloaded once), a lighter one
("clipseg": tags -> CLIPSeg's thresholded maps; grounded-sam's fallback where its models do
not load) and the shapes world's ("toy": read from pixels, offline). `register` adds
another; every factory imports its models when called, so the page is served before any of
them loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image
from simple_parsing import field

from core.annotate.annotation import Annotator
from core.annotate.clipseg import CLIPSEG_ID
from core.annotate.grounded_sam import DINO_ID, SAM_ID
from core.annotate.tags import CLIP_ID, OBJECT_VOCABULARY, TAGS, VOCABULARY_FILE, load_vocabulary
from core.files import REPO_ROOT
from core.shapes.world import SHAPES, STYLES

if TYPE_CHECKING:
    from core.diffusion.presets import Preset

Device = str | torch.device | None
PAPER_OBJECTS = ("cat", "dog", "car", "bird", "horse", "boat", "apple", "chair", "tree", "cup")
"""Ten everyday objects (the paper uses 10 objects but does not list them)."""


class Segmenter(Protocol):
    def segment(self, image: Image.Image, words: Sequence[str]) -> dict[str, np.ndarray]:
        """A map per word, at image resolution, high where its object is."""


class Scorer(Protocol):
    def similarity(self, images: Sequence[Image.Image], text: str) -> list[float]:
        """How much each image shows `text`."""


@dataclass(frozen=True)
class World:
    """What the evaluations ask of the images a labeller reads."""

    targets: str
    """Composition words: "nouns" of the prompt or every annotation "labels"."""
    objects: tuple[str, ...]
    """What spatial edits move."""
    template: str
    """The prompt of a spatial edit's image, with the object in place of {}."""
    concepts: tuple[str, ...]
    """What global edits add."""


@dataclass(frozen=True)
class Labeller:
    name: str
    annotator: Callable[[AnnotatorConfig, Device], Annotator]
    """Labels generated images for concept dictionaries."""
    reference: Callable[[AnnotatorConfig, Device], Annotator]
    """Labels the emergence view's final image: it looks for the prompt's objects."""
    segmenter: Callable[[AnnotatorConfig, Device], Segmenter]
    """Finds where a spatial edit's object is."""
    evaluator: str
    """What the segmenter is, in a few words ("CLIPSeg")."""
    scorer: Callable[[AnnotatorConfig, Device], Scorer]
    """Scores whether a global edit's image shows the added concept."""
    world: World
    options: tuple[str, ...] = ()
    """The `AnnotatorConfig` fields that say, beside its name, what labelled the images."""
    fallback: str | None = None
    """The labeller whose annotator labels images for dictionaries where this one's does
    not load (its models neither cached nor downloadable)."""


LABELLERS: dict[str, Labeller] = {}


def register(labeller: Labeller) -> Labeller:
    """Add `labeller` to the registry (the commands and the page choose from it)."""
    LABELLERS[labeller.name] = labeller
    return labeller


def get_labeller(name: str) -> Labeller:
    """The labeller called `name`; an error listing the labellers if there is none."""
    if name not in LABELLERS:
        raise ValueError(f"unknown annotator {name!r}; choose one of {', '.join(LABELLERS)}")
    return LABELLERS[name]


PAPER_WORLD = World("nouns", PAPER_OBJECTS, "a photo of a {}", ("snow", "painting", "flower"))


def grounded_sam(config: AnnotatorConfig, device: Device) -> Annotator:
    from core.annotate.grounded_sam import GroundedSamAnnotator
    from core.annotate.tags import make_tagger

    vocabulary = load_vocabulary(config.vocabulary) if config.vocabulary else OBJECT_VOCABULARY
    tagger = make_tagger(config.tags, config.clip_model, vocabulary, device=device)
    return GroundedSamAnnotator(tagger, config.dino_model, config.sam_model, device=device)


def clipseg_annotator(config: AnnotatorConfig, device: Device) -> Annotator:
    from core.annotate.clipseg import ClipSegAnnotator
    from core.annotate.tags import make_tagger

    vocabulary = load_vocabulary(config.vocabulary) if config.vocabulary else OBJECT_VOCABULARY
    tagger = make_tagger(config.tags, config.clip_model, vocabulary, device=device)
    return ClipSegAnnotator(tagger, clipseg(config, device))


def clipseg(config: AnnotatorConfig, device: Device) -> Segmenter:
    from core.annotate.clipseg import ClipSegSegmenter

    return ClipSegSegmenter(config.clipseg_model, device=device)


def clip_scorer(config: AnnotatorConfig, device: Device) -> Scorer:
    from core.annotate.scorers import ClipScorer

    return ClipScorer(config.clip_model, device=device)


def paper_world(
    name: str, annotator: Callable[[AnnotatorConfig, Device], Annotator], **fields
) -> Labeller:
    """A labeller of everyday images from its annotator: the reference annotator adds the
    prompt's nouns to the tags, CLIPSeg finds an edited object, CLIP scores global edits."""

    def of_prompt(config: AnnotatorConfig, device: Device) -> Annotator:
        return annotator(replace(config, tags="prompt+vision"), device)

    return Labeller(
        name,
        annotator=annotator,
        reference=of_prompt,
        segmenter=clipseg,
        evaluator="CLIPSeg",
        scorer=clip_scorer,
        world=PAPER_WORLD,
        options=("tags", "vocabulary"),
        **fields,
    )


register(paper_world("grounded-sam", grounded_sam, fallback="clipseg"))
register(paper_world("clipseg", clipseg_annotator))


TOY_WORLD = World("labels", SHAPES, "a red {} on a gray plain background", STYLES)
"""The shapes world's: its captions name a colour, a shape and a background."""


def shapes_annotator(background: bool) -> Callable[[AnnotatorConfig, Device], Annotator]:
    """The shapes world's annotator, labelling the background's style too if `background`;
    scipy, which it needs, is imported when it is made."""

    def make(config: AnnotatorConfig, device: Device) -> Annotator:
        from core.annotate.shapes import ToyAnnotator

        return ToyAnnotator(with_background=background)

    return make


def shapes_segmenter(config: AnnotatorConfig, device: Device) -> Segmenter:
    from core.annotate.shapes import ToySegmenter

    return ToySegmenter()


def style_scorer(config: AnnotatorConfig, device: Device) -> Scorer:
    from core.annotate.shapes import StyleScorer

    return StyleScorer()


register(
    Labeller(
        "toy",
        annotator=shapes_annotator(background=True),
        reference=shapes_annotator(background=False),
        segmenter=shapes_segmenter,
        evaluator="the shapes world's pixels",
        scorer=style_scorer,
        world=TOY_WORLD,
    )
)


@dataclass(kw_only=True)
class AnnotatorConfig:
    """The labeller of generated images, and its models."""

    annotator: str | None = field(default=None, choices=tuple(LABELLERS))
    """grounded-sam: tags -> Grounding DINO -> SAM (CLIPSeg finds edited objects, CLIP scores
    global edits); clipseg: tags -> CLIPSeg's maps above 0.5, lighter; toy reads
    shapes-world pixels (default: the preset's, toy for tiny and toy, else grounded-sam)."""
    tags: str = field(default="vision", choices=TAGS)
    """grounded-sam's and clipseg's tags: vision (zero-shot CLIP over the vocabulary, no
    prompt words, as the paper's RAM), prompt (the prompt's nouns) or prompt+vision."""
    vocabulary: str | None = None
    """Tag vocabulary, a text file with one object name a line (default:
    core/annotate/vocabulary.txt, COCO's 80 classes and 73 common things)."""
    clip_model: str = CLIP_ID
    """CLIP id or folder: the tagger and the scorer of global edits."""
    dino_model: str = DINO_ID
    """Grounding DINO id or folder."""
    sam_model: str = SAM_ID
    """SAM id or folder."""
    clipseg_model: str = CLIPSEG_ID
    """CLIPSeg id or folder: finds where a spatial edit's object is."""

    def __post_init__(self) -> None:
        if self.annotator is not None:
            get_labeller(self.annotator)
        if self.tags not in TAGS:
            raise ValueError(f"unknown tags {self.tags!r}; choose one of {', '.join(TAGS)}")

    def for_preset(self, preset: Preset) -> AnnotatorConfig:
        """This config, with the preset's annotator where it names none."""
        return replace(self, annotator=self.annotator or preset.annotator)

    @property
    def labeller(self) -> Labeller:
        return get_labeller(self.annotator)

    def load_annotator(self, device: Device = None) -> Annotator:
        return self.labeller.annotator(self, device)

    def load_reference(self, device: Device = None) -> Annotator:
        return self.labeller.reference(self, device)

    def load_segmenter(self, device: Device = None) -> Segmenter:
        return self.labeller.segmenter(self, device)

    def load_scorer(self, device: Device = None) -> Scorer:
        return self.labeller.scorer(self, device)

    def record(self) -> dict[str, str]:
        """What labelled the images, for the files written beside the results."""
        default_vocabulary = str(VOCABULARY_FILE.resolve().relative_to(REPO_ROOT))
        values = {**vars(self), "vocabulary": self.vocabulary or default_vocabulary}
        return {"annotator": self.annotator, **{o: values[o] for o in self.labeller.options}}

    def describe(self) -> str:
        """`record()` as one line: "annotator grounded-sam, tags vision, vocabulary ..."."""
        return ", ".join(f"{what} {value}" for what, value in self.record().items())
