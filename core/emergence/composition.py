"""Composition prediction: where will each object be, read from one denoising step.

Paper 1 encodes a block's residual update with the SAE of that step, takes the top
activating concept at every grid position, replaces it by its concept embedding (a
"concept map"; a position whose top concept has no label predicts nothing), and compares
the map by cosine with a noun's word vector; thresholding gives a predicted mask, scored by
IoU against the object's mask in the final image.

    cmap = concept_map(sae, dictionary, delta)            # delta [B, C, H, W]
    mask, similarity = predict_mask(cmap, vectors.vector("cat"), threshold=0.7)
    iou(mask, annotation_mask)                            # any resolution, same aspect
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.diffusion.hooks import Recording, StepInfo
from core.emergence.concepts import ConceptDictionary
from core.emergence.words import WordVectors
from core.sae.bank import SAEBank, SAEKey
from core.sae.model import TopKSAE
from core.training.activations import to_rows

DEFAULT_THRESHOLD = 0.7
READINGS = ("top", "labelled")
"""How `concept_map` picks a position's concept: the paper's top latent, or the top labelled."""


class LatentGrid(NamedTuple):
    """The TopK code of every grid position of a batch of images."""

    top_acts: Tensor
    """[B, H, W, k] activations, largest first."""
    top_indices: Tensor
    """[B, H, W, k] the CIDs they belong to."""

    def spatial_means(self, num_latents: int) -> Tensor:
        """[B, num_latents] each latent's activation averaged over the grid (paper 1 ranks
        top examples by it); computed from the sparse code, without the dense maps."""
        batch, height, width, _ = self.top_acts.shape
        sums = self.top_acts.new_zeros(batch, num_latents)
        sums.scatter_add_(1, self.top_indices.reshape(batch, -1), self.top_acts.reshape(batch, -1))
        return sums / (height * width)

    def activation(self, cids: Sequence[int]) -> Tensor:
        """[B, H, W] the summed activation of `cids` at each position (0 where none fires)."""
        chosen = torch.as_tensor(list(cids), device=self.top_indices.device)
        return (self.top_acts * torch.isin(self.top_indices, chosen)).sum(dim=-1)


class ConceptMap(NamedTuple):
    embeddings: Tensor
    """[B, H, W, e] embedding of the concept chosen at each position; zero where invalid."""
    valid: Tensor
    """[B, H, W] bool: False where no active concept has an embedding."""
    cids: Tensor
    """[B, H, W] the chosen CID; -1 where invalid."""


class MaskPrediction(NamedTuple):
    mask: Tensor
    """[B, H, W] bool: similarity > threshold."""
    similarity: Tensor
    """[B, H, W] cosine similarity with the word; NaN where the concept map is invalid."""


class StepPrediction(NamedTuple):
    step: StepInfo
    sae_key: SAEKey
    """The SAE (and dictionary) used: the one trained nearest to the step's t."""
    concept_map: ConceptMap
    predictions: dict[str, MaskPrediction]
    """Word -> its predicted mask and similarity map at this step."""


def latent_grid(sae: TopKSAE, delta: Tensor, site: str = "delta") -> LatentGrid:
    """Encode a residual update [C, H, W] or [B, C, H, W] position by position.

    Rows follow `to_rows`: image by image, positions (i, j) in row-major order. A 3-D delta
    is one image, and the result keeps a batch dimension of 1. `site` says what `delta` is (a
    record's `site`); an SAE trained on another site is refused.
    """
    sae.check_site(site)
    if delta.ndim == 3:
        delta = delta.unsqueeze(0)
    if delta.ndim != 4:
        raise ValueError(
            f"expected a residual update of shape [C, H, W] or [B, C, H, W], got "
            f"{tuple(delta.shape)}"
        )
    batch, channels, height, width = delta.shape
    if channels != sae.cfg.d_in:
        raise ValueError(
            f"the SAE reads {sae.cfg.d_in} channels but this residual update has {channels}; "
            f"use the SAE trained for this block (bank.get(block, t, branch))"
        )
    with torch.no_grad():
        rows = to_rows(delta.to(sae.b_dec.device))
        top_acts, top_indices, _ = sae.encode(rows)
    top_acts, order = top_acts.sort(dim=-1, descending=True)
    top_indices = top_indices.gather(-1, order)
    shape = (batch, height, width, -1)
    return LatentGrid(top_acts.reshape(shape), top_indices.reshape(shape))


def concept_map(
    sae: TopKSAE,
    dictionary: ConceptDictionary,
    delta: Tensor,
    site: str = "delta",
    reading: str = "top",
) -> ConceptMap:
    """The embedding of one concept at every position of `delta` ([C, H, W] or [B, ...]).

    `reading` "top" is the paper's: the position's most active latent; where that latent has
    no dictionary entry (or no latent is active) the position predicts nothing (invalid, zero
    embedding). "labelled" takes instead the most active latent among the position's active
    (> 0) top k that has an embedding, so unlabelled latents are skipped.
    """
    if reading not in READINGS:
        raise ValueError(f"unknown concept-map reading {reading!r}; choose {' or '.join(READINGS)}")
    dictionary.check_sae(sae)
    grid = latent_grid(sae, delta, site)
    has_embedding = dictionary.has_embedding.to(grid.top_indices.device)
    usable = has_embedding[grid.top_indices] & (grid.top_acts > 0)
    if reading == "top":
        usable[..., 1:] = False
    first = usable.int().argmax(dim=-1, keepdim=True)  # argmax returns the first maximum
    valid = usable.any(dim=-1)
    cids = torch.where(valid, grid.top_indices.gather(-1, first).squeeze(-1), -1)
    embeddings = dictionary.embeddings.to(grid.top_acts.device)[cids.clamp_min(0)]
    return ConceptMap(embeddings * valid.unsqueeze(-1), valid, cids)


def similarity_map(cmap: ConceptMap, word_vector: np.ndarray | Tensor) -> Tensor:
    """[B, H, W] cosine similarity between each position's concept and the word (NaN where
    the concept map is invalid, so no threshold selects it)."""
    vector = torch.as_tensor(word_vector, dtype=cmap.embeddings.dtype).to(cmap.embeddings.device)
    if vector.shape != cmap.embeddings.shape[-1:]:
        raise ValueError(
            f"the word vector has shape {tuple(vector.shape)} but the concept embeddings have "
            f"{cmap.embeddings.shape[-1]} dimensions; use the word vectors the dictionary was "
            "built with (dictionary.word_vectors)"
        )
    if not vector.any():
        raise ValueError("the word vector is all zeros; pick a word the word vectors know")
    similarity = F.cosine_similarity(cmap.embeddings, vector.expand_as(cmap.embeddings), dim=-1)
    return similarity.masked_fill(~cmap.valid, float("nan"))


def predict_mask(
    cmap: ConceptMap, word_vector: np.ndarray | Tensor, threshold: float = DEFAULT_THRESHOLD
) -> MaskPrediction:
    """Positions whose concept has cosine similarity > threshold with the word.

    The paper does not report its threshold; 0.7 is ours, for the bundled GloVe 50d, whose
    similarities run high: cat/dog 0.92, car/truck 0.92, cat/kitten 0.64, cat/tree 0.57,
    cat/car 0.36. It keeps a noun's close neighbours and drops unrelated ones. Other vectors
    (Word2Vec 300d) have other ranges: choose the threshold for the vectors in use.
    """
    similarity = similarity_map(cmap, word_vector)
    return MaskPrediction(similarity > threshold, similarity)


def iou(pred: Tensor, target: Tensor | np.ndarray) -> Tensor:
    """IoU of predicted masks [H, W] or [B, H, W] with target masks at any resolution.

    The prediction is upsampled (or downsampled) to the target with nearest neighbour: each
    grid cell becomes its block of pixels, the same convention `DictionaryBuilder` scores
    latents with. The aspect ratios must match. A 2-D target is compared with every image of
    a batch. An empty target with a non-empty prediction scores 0. The IoU of two empty
    masks is undefined (0 / 0) and comes back NaN: "absent in both" is neither agreement
    about a shape (1) nor a miss (0), so averages leave it out and plots leave a gap.
    """
    target = torch.as_tensor(target).to(pred.device) != 0
    _check_mask_shapes(pred, target)
    (height, width), (target_h, target_w) = pred.shape[-2:], target.shape[-2:]
    if height * target_w != width * target_h:
        raise ValueError(
            f"the prediction is {height}x{width} but the target mask is {target_h}x{target_w}: "
            "their aspect ratios differ; pass the annotation mask of the generated image"
        )
    resized = F.interpolate(
        pred.reshape(-1, 1, height, width).float(), (target_h, target_w), mode="nearest-exact"
    )
    resized = resized.reshape(*pred.shape[:-2], target_h, target_w).bool()
    intersection = (resized & target).sum(dim=(-2, -1))
    union = (resized | target).sum(dim=(-2, -1))
    return torch.where(union > 0, intersection / union.clamp_min(1), float("nan"))


def predict_over_steps(
    recording: Recording,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    words: Sequence[str],
    word_vectors: WordVectors,
    *,
    block: str,
    branch: str = "cond",
    threshold: float = DEFAULT_THRESHOLD,
    reading: str = "top",
) -> list[StepPrediction]:
    """Predicted masks of `words` at every recorded step of one generation (any batch size).

    Each step uses the SAE of (`block`, `branch`) trained nearest to the step's t, and that
    SAE's dictionary, read as `reading` says (`concept_map`). A word need not be a label of
    any concept: the comparison is by word vector, so "kitten" is found through concepts
    labelled "cat".
    """
    vectors = _word_vectors_of(words, word_vectors)
    try:
        records = recording.of(block, branch)
    except KeyError as error:
        hint = "record that block, with guidance_scale > 1 for 'uncond'"
        raise ValueError(f"{error.args[0]}; {hint}") from error
    results = []
    for record in sorted(records, key=lambda r: r.step):
        sae = _nearest_sae(bank, block, record.step.t, branch)
        key = SAEKey(sae.cfg.block, sae.cfg.t, sae.cfg.branch)
        dictionary = _dictionary_for(dictionaries, key)
        cmap = concept_map(sae, dictionary, record.delta, record.site, reading)
        predictions = {word: predict_mask(cmap, vectors[word], threshold) for word in words}
        results.append(StepPrediction(record.step, key, cmap, predictions))
    return results


def _check_mask_shapes(pred: Tensor, target: Tensor) -> None:
    batched_target = target.ndim == 3 and not (pred.ndim == 3 and len(pred) == len(target))
    if pred.ndim not in (2, 3) or target.ndim not in (2, 3) or batched_target:
        raise ValueError(
            f"cannot compare predicted masks of shape {tuple(pred.shape)} with target masks of "
            f"shape {tuple(target.shape)}; pass [H, W] masks, or [B, H, W] predictions with one "
            "[H, W] target for all or a [B, H, W] target, one per image"
        )


def _word_vectors_of(words: Sequence[str], word_vectors: WordVectors) -> dict[str, np.ndarray]:
    lookup = word_vectors.lookup(words)
    if lookup.missing:
        raise ValueError(
            f"no word vector for {lookup.missing} in {word_vectors.source!r}; pick other words "
            "or load word vectors that have them"
        )
    if lookup.partial:
        raise ValueError(
            f"some words of {sorted(lookup.partial)} have no vector in {word_vectors.source!r} "
            f"({lookup.partial}); drop or replace those words"
        )
    return lookup.vectors


def _nearest_sae(bank: SAEBank, block: str, t: float, branch: str) -> TopKSAE:
    try:
        return bank.get(block, t, branch)
    except KeyError as e:
        raise ValueError(f"{e.args[0]}; train one or load a bank that has it") from e


def _dictionary_for(
    dictionaries: Mapping[SAEKey, ConceptDictionary], key: SAEKey
) -> ConceptDictionary:
    dictionary = dictionaries.get(key)
    if dictionary is None:
        raise ValueError(
            f"no concept dictionary for the SAE {key}; build one with DictionaryBuilder or "
            "load it with load_dictionaries"
        )
    if not dictionary.has_embedding.any():
        raise ValueError(
            f"no concept of the SAE {key} has a label with a word vector, so nothing can be "
            "predicted at this t; build the dictionary from more images"
        )
    return dictionary
