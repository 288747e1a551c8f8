"""Image tagging, the first step of the labeller: which object names to look for.

The emergence paper tags images with RAM, which takes no words from the prompt and which
transformers does not ship. Both taggers here are restricted to a vocabulary of object names
(by default `vocabulary.txt` beside this file: COCO's 80 classes and 73 common things that
COCO leaves out):

- `ClipTagger`: zero-shot CLIP over the vocabulary, standing in for RAM. Vision only: it
  sees the image, so it catches unprompted objects (sky, grass, a table), at the cost of one
  CLIP forward pass and some wrong guesses. The default where the paper's numbers are
  reproduced.
- `PromptNounTagger`: the vocabulary's names that occur in the prompt. Free, and exact
  for what was asked, but blind to what the model added unasked; not the paper's labeller,
  since its labels come from the words the image was generated from.

`UnionTagger` combines them; wrong tags are cheap, because the detector that follows
finds no box for an absent object. `make_tagger` builds one of `TAGS` by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

from core.annotate.loading import HubModel, Source, model_inputs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

CLIP_ID = "openai/clip-vit-base-patch32"
VOCABULARY_FILE = Path(__file__).with_name("vocabulary.txt")
TAGS = ("vision", "prompt", "prompt+vision")
"""Taggers by name: CLIP over the vocabulary (the paper's vision-only labelling), the
prompt's nouns, or both."""


def normalise_vocabulary(names: Iterable[str]) -> tuple[str, ...]:
    """Lower-case, single-spaced, de-duplicated names, in their first order."""
    cleaned = (" ".join(re.findall(r"[a-z0-9]+", name.lower())) for name in names)
    return tuple(dict.fromkeys(name for name in cleaned if name))


def load_vocabulary(path: str | Path) -> tuple[str, ...]:
    """The names of a text file, one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the tag vocabulary {path} is not a file")
    lines = (line.strip() for line in path.read_text().splitlines())
    names = normalise_vocabulary(line for line in lines if not line.startswith("#"))
    if not names:
        raise ValueError(f"the tag vocabulary {path} has no names (one a line)")
    return names


OBJECT_VOCABULARY = load_vocabulary(VOCABULARY_FILE)
"""The default tag vocabulary, read from `VOCABULARY_FILE`."""


class Tagger(Protocol):
    """Names the objects in an image (or its prompt) that the detector should look for."""

    def tag(self, image: Image.Image, prompt: str | None = None) -> list[str]: ...


IRREGULAR_PLURALS = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "shelves": "shelf",
}


def singular_forms(word: str) -> list[str]:
    """`word` and the singulars it might be the plural of, most literal first.

    Naive on purpose: candidates are checked against a vocabulary, which filters the
    nonsense ("bus" -> "bu").
    """
    forms = [word]
    if word in IRREGULAR_PLURALS:
        forms.append(IRREGULAR_PLURALS[word])
    if word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if word.endswith("ves"):
        forms += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        forms.append(word[:-1])
    return forms


class PromptNounTagger:
    """Names from `vocabulary` that occur in the prompt, longest match first.

    Words are matched after lower-casing and splitting on anything not a letter or digit
    (so "Traffic-Lights" finds "traffic light"), with the last word of a phrase allowed
    to be a plural. There is no part-of-speech tagging: "an orange cat" yields "orange"
    and "cat", and the detector then finds no orange.
    """

    def __init__(self, vocabulary: Iterable[str] = OBJECT_VOCABULARY):
        self.vocabulary = normalise_vocabulary(vocabulary)
        self._names = set(self.vocabulary)
        self._longest = max((len(name.split()) for name in self.vocabulary), default=0)

    def tag(self, image: Image.Image | None = None, prompt: str | None = None) -> list[str]:
        """Vocabulary names in `prompt`, in order of appearance; the image is not looked at."""
        words = re.findall(r"[a-z0-9]+", (prompt or "").lower())
        found: dict[str, None] = {}
        start = 0
        while start < len(words):
            name, length = self._match(words, start)
            if name:
                found[name] = None
            start += length
        return list(found)

    def _match(self, words: Sequence[str], start: int) -> tuple[str | None, int]:
        """The longest vocabulary name starting at `words[start]`, and how many words it spans."""
        for length in range(min(self._longest, len(words) - start), 0, -1):
            *head, last = words[start : start + length]
            for form in singular_forms(last):
                name = " ".join([*head, form])
                if name in self._names:
                    return name, length
        return None, 1


def select_tags(
    names: Sequence[str], probs: Sequence[float], threshold: float | None, top_k: int | None
) -> list[str]:
    """Names by falling probability, those at or above `threshold`, at most `top_k` of them.

    None disables either limit.
    """
    order = np.argsort(-np.asarray(probs, dtype=float), kind="stable")
    kept = [names[i] for i in order if threshold is None or probs[i] >= threshold]
    return kept if top_k is None else kept[:top_k]


class ClipTagger(HubModel):
    """Zero-shot CLIP tagging: softmax over "a photo of a {name}." for every vocabulary name.

    Vision only, as the paper's RAM tagger: the prompt is never read, so every tag is a
    vocabulary name, ranked by CLIP's probability for the image. A softmax spreads
    probability over everything in the picture, so an image of several objects gives each a
    modest share: the default keeps up to `top_k` = 5 names with at least `threshold` = 0.05
    probability.
    """

    model_class = "CLIPModel"
    source = CLIP_ID
    what = "CLIP tagger"

    def __init__(
        self,
        model: Source | PreTrainedModel | None = None,
        processor: Source | ProcessorMixin | None = None,
        *,
        vocabulary: Iterable[str] = OBJECT_VOCABULARY,
        template: str = "a photo of a {}.",
        threshold: float | None = 0.05,
        top_k: int | None = 5,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(model, processor, device=device, dtype=dtype)
        self.vocabulary = normalise_vocabulary(vocabulary)
        self.threshold, self.top_k = threshold, top_k
        self._text_features = self._encode_texts([template.format(n) for n in self.vocabulary])

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, padding=True, return_tensors="pt")
        features = self.model.get_text_features(**model_inputs(inputs, self.device, self.dtype))
        features = features.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def probabilities(self, image: Image.Image) -> dict[str, float]:
        """CLIP's zero-shot probability of every vocabulary name for `image`."""
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        inputs = model_inputs(inputs, self.device, self.dtype)
        features = self.model.get_image_features(**inputs).pooler_output
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        logits = self.model.logit_scale.exp().float() * features @ self._text_features.T
        return dict(zip(self.vocabulary, logits.softmax(-1)[0].tolist(), strict=True))

    def tag(self, image: Image.Image, prompt: str | None = None) -> list[str]:
        """The selected vocabulary names for `image`; the prompt is not used."""
        probs = self.probabilities(image)
        return select_tags(list(probs), list(probs.values()), self.threshold, self.top_k)


class UnionTagger:
    """Every tag any of `taggers` gives, de-duplicated, in the taggers' order."""

    def __init__(self, *taggers: Tagger):
        self.taggers = taggers

    def tag(self, image: Image.Image, prompt: str | None = None) -> list[str]:
        found = dict.fromkeys(t for tagger in self.taggers for t in tagger.tag(image, prompt))
        return list(found)


def make_tagger(
    tags: str,
    clip_model: Source = CLIP_ID,
    vocabulary: Sequence[str] = OBJECT_VOCABULARY,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Tagger:
    """The tagger `tags` names (one of `TAGS`) over `vocabulary`; CLIP is loaded only if needed."""
    if tags not in TAGS:
        raise ValueError(f"unknown tags {tags!r}; choose one of {', '.join(TAGS)}")
    if tags == "prompt":
        return PromptNounTagger(vocabulary)
    clip = ClipTagger(clip_model, vocabulary=vocabulary, device=device, dtype=dtype)
    return clip if tags == "vision" else UnionTagger(PromptNounTagger(vocabulary), clip)
