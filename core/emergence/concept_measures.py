"""What a concept dictionary is worth (paper 1): cohesion and separability of its concepts'
embeddings, and the images a concept fires on most."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from core.emergence.concepts import ConceptDictionary
from core.emergence.words import WordVectors, cosines


def cohesion(dictionary: ConceptDictionary, word_vectors: WordVectors, min_items: int = 1) -> float:
    """Paper 1's concept cohesion (higher = entries hold related names).

    For each concept: the mean cosine similarity between each item's word vector and the
    concept's mean vector, items counted with multiplicity; then the mean over concepts.
    Items are the labels that have a vector in `word_vectors`, and the mean vector is
    recomputed from them, so the result is consistent for whatever vectors are passed.
    Concepts with fewer than `min_items` such items are skipped; with the default 1, a
    concept with a single item (or one name repeated) counts with cohesion 1, as the paper's
    definition gives it. Raises if no concept qualifies.
    """
    lookup = word_vectors.lookup(dictionary.vocabulary())
    per_concept = []
    for cid in dictionary.evidence:
        items = [
            (lookup.vectors[label], n)
            for label, n in dictionary.labels(cid).items()
            if label in lookup.vectors
        ]
        if sum(n for _, n in items) < max(min_items, 1):
            continue
        vectors, counts = (np.stack(x) for x in zip(*items, strict=True))
        centre = np.average(vectors, axis=0, weights=counts)
        per_concept.append(np.average(cosines(vectors, centre), weights=counts))
    if not per_concept:
        raise ValueError(
            f"no concept has {min_items} or more labels with word vectors in "
            f"{word_vectors.source!r}; lower min_items or use other word vectors"
        )
    return float(np.mean(per_concept))


def separability(dictionary: ConceptDictionary) -> float:
    """Paper 1's separability: mean cosine similarity between the embeddings of two different
    concepts, over all ordered pairs (lower = more distinct concepts).

    Only concepts with an embedding take part; concepts with identical entries are different
    concepts and count as similarity 1. Raises with fewer than two such concepts.
    """
    centres = dictionary.embeddings[dictionary.has_embedding].double()
    count = len(centres)
    if count < 2:
        raise ValueError(
            f"separability needs two or more concepts with embeddings; the dictionary of "
            f"{dictionary.key.describe()} has {count}; build it from more images"
        )
    unit = F.normalize(centres, dim=1)
    similarities = unit @ unit.T
    return float((similarities.sum() - similarities.diagonal().sum()) / (count * (count - 1)))


class TopExamples(NamedTuple):
    images: Tensor
    """Indices of the images, most activating first."""
    values: Tensor
    """The latent's spatial mean on each of them (all > 0)."""


def top_examples(spatial_means: Tensor, cid: int, n: int = 9) -> TopExamples:
    """The n images on which latent `cid` has the largest spatial mean (paper 1).

    spatial_means: [num_images, num_latents], each image's latents averaged over its grid
    (`LatentGrid.spatial_means`), which is all ranking needs: 40k images x 5120 latents is
    800 MB in float32, against 200 GB for the full maps. Images where the latent never fires
    are left out, so fewer than n may come back.
    """
    if not 0 <= cid < spatial_means.shape[1]:
        raise ValueError(f"CID {cid} is out of range: there are {spatial_means.shape[1]} latents")
    values, images = spatial_means[:, cid].topk(min(n, len(spatial_means)))
    firing = values > 0
    return TopExamples(images[firing], values[firing])
