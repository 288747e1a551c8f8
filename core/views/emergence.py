"""The emergence view: where each target word will be, predicted at every denoising step.

One generation is recorded at one block and branch; at every step the SAE of the nearest t
turns the residual update into a concept map and a predicted mask per word
(`core.emergence.composition.predict_over_steps`). Each step's prediction is scored by IoU against a
reference: the word's mask in the final image's annotation, or, without an annotator or
when it does not find the word, the last step's own prediction. Beside it, as a baseline,
the cross-attention heat map of the same word at the same step (`core.emergence.attention_maps`),
thresholded as DAAM does.
"""

import hashlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from core.annotate.tags import OBJECT_VOCABULARY, PromptNounTagger
from core.diffusion.hooks import record
from core.emergence.attention_maps import AttentionTrace, trace_cross_attention
from core.emergence.composition import StepPrediction, iou, predict_over_steps
from core.emergence.concepts import normalize_label
from core.emergence.metrics import label_masks
from core.sae.bank import SAEKey
from core.views.inputs import check_prompt, check_seed, check_step, check_steps, parse_words
from core.views.model_cache import Loaded
from core.views.render import REFERENCE_COLOUR, heat_map, normalised, outline

ATTENTION_THRESHOLD = 0.4
"""DAAM's threshold on the max-normalised heat map."""
DEFAULT_WORDS = 3
SIMILARITY_LABEL = "cosine, top concept vs word"
ATTENTION_LABEL = "share of the step's peak"
MAX_RUNS = 32
"""Emergence results a server keeps for paging through their steps."""


@dataclass
class EmergenceResult:
    prompt: str
    seed: int
    block: str
    branch: str
    image: Image.Image
    words: list[str]
    steps: list[StepPrediction]
    attention: AttentionTrace
    references: dict[str, tuple[torch.Tensor, str]]
    """word -> (bool reference mask, "annotation" or "last step")."""
    ious: dict[str, list[float]]
    """word -> IoU of each step's predicted mask with the reference (NaN: both empty)."""
    attention_ious: dict[str, list[float]]
    """word -> IoU of each step's thresholded cross-attention map (words in the prompt)."""
    notes: list[str] = field(default_factory=list)

    @property
    def ts(self) -> list[float]:
        return [s.step.t for s in self.steps]

    def sae_spans(self) -> list[tuple[SAEKey, int, int]]:
        """Which SAE read which steps: (its key, first step, last step), in step order."""
        spans: list[tuple[SAEKey, int, int]] = []
        for index, step in enumerate(self.steps):
            if spans and spans[-1][0] == step.sae_key:
                spans[-1] = (step.sae_key, spans[-1][1], index)
            else:
                spans.append((step.sae_key, index, index))
        return spans


def labelled_words(loaded: Loaded, block: str, branch: str) -> list[str]:
    """Labels of the block's concepts, most frequent first (over all t)."""
    counts: Counter[str] = Counter()
    for key, dictionary in loaded.dictionaries.items():
        if key.block == block and key.branch == branch:
            for cid in dictionary.evidence:
                counts.update(dictionary.labels(cid))
    return [label for label, _ in counts.most_common()]


def default_words(loaded: Loaded, prompt: str, block: str, branch: str) -> tuple[list[str], str]:
    """The prompt's nouns that have word vectors and concepts, and a note saying so.

    Falls back to the nouns with vectors (compared by word vector, concepts need not carry
    the word), then to the block's most frequent concept labels.
    """
    labels = labelled_words(loaded, block, branch)
    nouns = PromptNounTagger([*OBJECT_VOCABULARY, *labels]).tag(None, prompt)
    vectors = loaded.dictionaries.word_vectors
    with_vectors = [n for n in nouns if n in vectors]
    with_concepts = [n for n in with_vectors if n in labels]
    if with_concepts:
        return with_concepts[:DEFAULT_WORDS], "the prompt's nouns that label concepts"
    if with_vectors:
        note = "no concept is labelled with the prompt's nouns; they are compared by word vector"
        return with_vectors[:DEFAULT_WORDS], note
    if labels:
        return labels[:DEFAULT_WORDS], "the prompt has no known noun; the block's commonest labels"
    raise ValueError(f"No concept of {block} ({branch}) has a label, so nothing can be predicted.")


def run_emergence(
    loaded: Loaded,
    prompt: object,
    seed: object,
    steps: object,
    block: str,
    branch: str,
    words: object = "",
    on_step: Callable[[int, int], None] | None = None,
) -> EmergenceResult:
    """Generate once, recording `block`/`branch` and the cross-attention of the words."""
    prompt, seed, steps = check_prompt(prompt), check_seed(seed), check_steps(steps)
    loaded.check_recorded(block, branch)
    if not loaded.dictionaries:
        raise ValueError(f"The preset {loaded.preset.name!r} has no concept dictionaries.")
    targets, how = _targets(loaded, prompt, block, branch, words)
    with (
        record(loaded.pipe, [block], device=None, site=loaded.bank.site(block)) as recording,
        trace_cross_attention(loaded.pipe, prompt, targets, branch) as attention,
    ):
        image = loaded.generate([prompt], [seed], steps, on_step=on_step)[0]
    predictions = predict_over_steps(
        recording,
        loaded.bank,
        loaded.dictionaries,
        targets,
        loaded.dictionaries.word_vectors,
        block=block,
        branch=branch,
    )
    references, notes = _references(loaded, image, prompt, targets, predictions)
    if attention.unavailable:
        notes.append(f"no cross-attention map: {attention.unavailable}")
    elif attention.missing:
        notes.append(
            f"not in the prompt, so no cross-attention map: {', '.join(attention.missing)}"
        )
    ious = {
        w: [_iou(p.predictions[w].mask[0], references[w][0]) for p in predictions] for w in targets
    }
    attention_ious = {
        w: [_iou(_attention_mask(m), references[w][0]) for m in attention.stacked(w)[:, 0]]
        for w in attention.words
    }
    return EmergenceResult(
        prompt,
        seed,
        block,
        branch,
        image,
        targets,
        predictions,
        attention,
        references,
        ious,
        attention_ious,
        [f"target words: {', '.join(targets)} ({how})", *notes],
    )


def _targets(
    loaded: Loaded, prompt: str, block: str, branch: str, words: object
) -> tuple[list[str], str]:
    chosen = parse_words(words)
    if not chosen:
        return default_words(loaded, prompt, block, branch)
    vectors = loaded.dictionaries.word_vectors
    unknown = [w for w in chosen if w not in vectors]
    if unknown:
        raise ValueError(
            f"No word vector for {', '.join(repr(w) for w in unknown)} in "
            f"{vectors.source!r}; use other words."
        )
    return chosen, "as given"


def _references(
    loaded: Loaded,
    image: Image.Image,
    prompt: str,
    words: Sequence[str],
    predictions: Sequence[StepPrediction],
) -> tuple[dict[str, tuple[torch.Tensor, str]], list[str]]:
    annotator, why_not = loaded.labelling.annotator
    masks = label_masks(annotator.annotate(image, prompt)) if annotator else {}
    references, fallback = {}, []
    for word in words:
        mask = masks.get(normalize_label(word))
        if mask is not None:
            references[word] = (torch.as_tensor(mask), "annotation")
        else:
            references[word] = (predictions[-1].predictions[word].mask[0].cpu(), "last step")
            fallback.append(word)
    notes = []
    if fallback:
        reason = why_not or "not found by the annotator in the final image"
        notes.append(f"IoU against the last step for {', '.join(fallback)}: {reason}")
    return references, notes


def _iou(pred: torch.Tensor, reference: torch.Tensor) -> float:
    return float(iou(pred.cpu(), reference))


def _attention_mask(heat: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(normalised(heat) > ATTENTION_THRESHOLD)


def step_panels(result: EmergenceResult, index: int) -> list[tuple[Image.Image, str]]:
    """For step `index`, four captioned panels per word: the predicted mask outlined on the
    final image, the reference mask it is scored against, the concept-similarity map (grey
    where the most active concept has no label, or none fires) and the cross-attention map,
    each map with its scale."""
    index = check_step(index, len(result.steps))
    step = result.steps[index]
    panels = []
    for word in result.words:
        predicted = step.predictions[word]
        reference, against = result.references[word]
        panels += [
            (
                outline(result.image, predicted.mask[0]),
                f"{word}: predicted mask at t={step.step.t:.2f}{_if_empty(predicted.mask[0])}",
            ),
            (
                outline(result.image, reference, colour=REFERENCE_COLOUR, shade=0.3),
                f"{word}: reference ({against}){_if_empty(reference)}",
            ),
            (
                heat_map(predicted.similarity[0], -1, 1, SIMILARITY_LABEL, cmap="coolwarm"),
                f"{word}: concept similarity",
            ),
            _attention_panel(result, word, index),
        ]
    return panels


def _if_empty(mask: torch.Tensor) -> str:
    return "" if bool(mask.any()) else ": empty"


def _attention_panel(result: EmergenceResult, word: str, index: int) -> tuple[Image.Image, str]:
    if word not in result.attention.maps:
        blank = heat_map(np.full((1, 1), np.nan), 0, 1, ATTENTION_LABEL)
        why = "no cross-attention layer" if result.attention.unavailable else "not in the prompt"
        return blank, f"{word}: {why}"
    heat = normalised(result.attention.stacked(word)[index, 0])
    return heat_map(heat, 0, 1, ATTENTION_LABEL), f"{word}: cross-attention"


def iou_figure(result: EmergenceResult) -> Figure:
    """IoU of each word's predicted mask vs t (solid) and of its cross-attention (dashed).

    Steps where the word is absent from both the prediction and the reference have no IoU
    (NaN): the line leaves a gap there and the legend counts them.
    """
    ax = iou_axes("IoU with the reference mask")
    colours = matplotlib.colormaps["tab10"]
    for i, word in enumerate(result.words):
        label = f"{word} (vs {result.references[word][1]}){_gaps(result.ious[word])}"
        ax.plot(result.ts, result.ious[word], "o-", color=colours(i), label=label)
        if word in result.attention_ious:
            attention = result.attention_ious[word]
            label = f"{word}, cross-attention{_gaps(attention)}"
            ax.plot(result.ts, attention, "--", color=colours(i), label=label)
    return finished(
        ax,
        "IoU of each word's predicted mask with its reference, per step\n"
        "(no IoU, a gap: the word is in neither mask)",
    )


def iou_axes(ylabel: str) -> Axes:
    """The axes of an IoU-vs-t plot: t from 1 (noise) to 0, as generation runs, IoU in [0, 1]."""
    ax = Figure(figsize=(6, 4.4), dpi=100, layout="constrained").subplots()
    t_axis(ax)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return ax


def finished(ax: Axes, title: str) -> Figure:
    """The figure of `iou_axes` with its title and, below the plot, its legend: in two
    columns where they fit the figure's width, else in one."""
    ax.set_title(title, fontsize=10, loc="left")  # clear of the page's buttons, top right
    for columns in (2, 1):
        legend = ax.figure.legend(
            loc="outside lower center", ncol=columns, fontsize=8, frameon=False
        )
        if legend.get_window_extent().width <= ax.figure.bbox.width:
            break
        legend.remove()
    return ax.figure


def t_axis(ax: Axes) -> None:
    """An x axis of denoising time from 1 (noise) on the left to 0, as generation runs."""
    ax.set_xlim(1.02, -0.02)
    ax.set_xlabel("t (1 = noise, generation runs left to right)")


def _gaps(ious: Sequence[float]) -> str:
    """What the legend says about steps with no IoU."""
    missing = int(np.isnan(ious).sum())
    if missing == len(ious):
        return ": no IoU at any step"
    return f": no IoU at {missing} steps" if missing else ""


def run_id(preset: str, result: EmergenceResult) -> str:
    """A short hash of what made a run: the same request (deterministic) has the same id."""
    made_of = (preset, result.prompt, result.seed, len(result.steps), result.block)
    made_of += (result.branch, tuple(result.words))
    return hashlib.sha256(repr(made_of).encode()).hexdigest()[:10]


class EmergenceRuns:
    """The most recently used emergence results by run id, at most `capacity` of them, so
    that any client can page through a run's steps without holding the result."""

    def __init__(self, capacity: int = MAX_RUNS) -> None:
        self.capacity = capacity
        self._runs: OrderedDict[str, tuple[str, EmergenceResult]] = OrderedDict()
        self._lock = threading.Lock()  # handlers run in several threads

    def add(self, preset: str, result: EmergenceResult) -> str:
        """Keep `result` of `preset`, forgetting the least recently used one beyond capacity;
        its id."""
        key = run_id(preset, result)
        with self._lock:
            self._runs[key] = (preset, result)
            self._runs.move_to_end(key)
            if len(self._runs) > self.capacity:
                self._runs.popitem(last=False)
        return key

    def get(self, key: object) -> EmergenceResult:
        """The run with id `key`; an unknown or forgotten id is an error saying what to do."""
        return self.get_with_preset(key)[1]

    def get_with_preset(self, key: object) -> tuple[str, EmergenceResult]:
        """The preset and the run with id `key`, as `get`."""
        key = str(key or "").strip()
        with self._lock:
            if key not in self._runs:
                raise ValueError(
                    f"No emergence run has the id {key!r}: run the emergence view (/emergence) "
                    f"and pass the run id it returns (the app keeps its {self.capacity} most "
                    "recent runs)."
                )
            self._runs.move_to_end(key)
            return self._runs[key]
