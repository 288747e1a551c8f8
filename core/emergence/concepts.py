"""Concept dictionaries: what each SAE latent (CID) stands for, in words.

Paper 1 labels latents from generated images alone: each final image is annotated with
(object name, mask) pairs, and a latent whose normalised activation map, binarised at 0.1,
overlaps an object's mask with IoU > 0.5 gets that object's name added to its entry. The
entry is a multiset of names; the concept's embedding is the mean word vector of the names.

    builder = DictionaryBuilder(key, sae.cfg.num_latents)
    for grid, objects in annotated_images:     # LatentGrid of one image, [(name, mask), ...]
        builder.add_codes(grid.top_acts[0], grid.top_indices[0], objects)
    dictionary = builder.build(load_word_vectors())
    dictionary.save(root / bank_subfolder(key))        # beside the SAE

One dictionary belongs to one SAE, i.e. one (block, t, branch).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.emergence.words import WordVectors, cosines
from core.files import atomic_write, local_or_snapshot, write_json
from core.sae.bank import SAEKey, bank_subfolder
from core.sae.model import TopKSAE

CONCEPTS_FILE = "concepts.json"
EMBEDDINGS_FILE = "concept_embeddings.safetensors"
FORMAT_VERSION = 1
ACTIVATION_THRESHOLD = 0.1
IOU_THRESHOLD = 0.5
BUILD_HINT = "build one with DictionaryBuilder and save_dictionaries, or pass a local folder"


class DictionaryLoadError(ValueError):
    """A saved concept dictionary is missing, corrupt or inconsistent."""


class LabelEvidence(NamedTuple):
    count: int
    """How many times the label was added to the entry (image-object matches)."""
    mean_iou: float | None
    """Mean IoU of those matches; None for entries written by hand."""


def normalize_label(name: str) -> str:
    """The form labels are stored and matched in: case-folded, underscores as spaces,
    whitespace collapsed ("Teddy_Bear " -> "teddy bear")."""
    return " ".join(name.casefold().replace("_", " ").split())


@dataclass(eq=False)
class ConceptDictionary:
    """The concept dictionary of one SAE: CID -> object names with their IoU evidence.

    Build one with `DictionaryBuilder`, `from_evidence` or `from_labels`, which also compute
    the embeddings.
    """

    key: SAEKey
    """The SAE this dictionary describes."""
    num_latents: int
    evidence: dict[int, dict[str, LabelEvidence]]
    """CID -> {label: evidence}; CIDs that never matched an object are absent."""
    embeddings: Tensor
    """[num_latents, dim] float32 mean word vector of each entry (its multiset of labels),
    zero where `has_embedding` is False."""
    has_embedding: Tensor
    """[num_latents] bool: False for CIDs without labels or none of whose labels has a vector."""
    word_vectors: str
    """Source of the word vectors (see core.emergence.words.load_word_vectors)."""
    missing_labels: list[str] = field(default_factory=list)
    """Labels with no word vector: they stay in the entries but not in the embeddings."""
    partial_labels: dict[str, list[str]] = field(default_factory=dict)
    """Multi-word labels embedded from some of their words: label -> the words left out."""
    num_images: int = 0
    """Number of annotated images the evidence comes from (0 for hand-written entries)."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """The activation and IoU thresholds the evidence was gathered with."""

    @classmethod
    def from_evidence(
        cls,
        key: SAEKey,
        num_latents: int,
        evidence: Mapping[int, Mapping[str, LabelEvidence]],
        word_vectors: WordVectors,
        **metadata,
    ) -> ConceptDictionary:
        """Embed each entry as the count-weighted mean of its labels' word vectors."""
        evidence = {int(cid): _normalized(entry) for cid, entry in sorted(evidence.items())}
        _check_cids(evidence, num_latents)
        lookup = word_vectors.lookup(sorted({label for e in evidence.values() for label in e}))
        embeddings = torch.zeros(num_latents, word_vectors.dim)
        has_embedding = torch.zeros(num_latents, dtype=torch.bool)
        for cid, entry in evidence.items():
            found = [
                (lookup.vectors[label], ev.count)
                for label, ev in entry.items()
                if label in lookup.vectors
            ]
            if found:
                vectors, counts = zip(*found, strict=True)
                embeddings[cid] = torch.from_numpy(np.average(vectors, axis=0, weights=counts))
                has_embedding[cid] = True
        return cls(
            key,
            num_latents,
            evidence,
            embeddings,
            has_embedding,
            word_vectors.source,
            missing_labels=lookup.missing,
            partial_labels=lookup.partial,
            **metadata,
        )

    @classmethod
    def from_labels(
        cls,
        key: SAEKey,
        num_latents: int,
        labels: Mapping[int, Iterable[str]],
        word_vectors: WordVectors,
    ) -> ConceptDictionary:
        """A hand-written dictionary: CID -> names (repeat a name to weigh it more)."""
        counts = {cid: Counter(map(_checked_label, names)) for cid, names in labels.items()}
        evidence = {
            cid: {label: LabelEvidence(n, None) for label, n in entry.items()}
            for cid, entry in counts.items()
        }
        return cls.from_evidence(key, num_latents, evidence, word_vectors)

    def to(self, device: str | torch.device) -> ConceptDictionary:
        """Move the embeddings to `device` (in place), so concept maps there copy nothing."""
        self.embeddings = self.embeddings.to(device)
        self.has_embedding = self.has_embedding.to(device)
        return self

    @property
    def embedding_dim(self) -> int:
        return self.embeddings.shape[1]

    def labels(self, cid: int) -> Counter[str]:
        """The entry of `cid` as a multiset of names (empty if it has none)."""
        return Counter({label: ev.count for label, ev in self.evidence.get(cid, {}).items()})

    def vocabulary(self) -> list[str]:
        """Every label in the dictionary, most frequent first."""
        totals = Counter()
        for cid in self.evidence:
            totals.update(self.labels(cid))
        return [label for label, _ in totals.most_common()]

    def cids_for(self, word: str) -> list[int]:
        """CIDs whose entry contains `word`, in increasing order.

        Matching is exact on `normalize_label` forms: no stemming, so "cats" does not find
        "cat" (annotators name objects in the singular).
        """
        label = normalize_label(word)
        return [cid for cid, entry in self.evidence.items() if label in entry]

    def check_sae(self, sae: TopKSAE) -> None:
        """Raise if `sae` is not the SAE this dictionary was built for."""
        if sae.cfg.num_latents != self.num_latents:
            raise ValueError(
                f"the concept dictionary of {self.key.describe()} has {self.num_latents} CIDs "
                f"but the SAE has {sae.cfg.num_latents} latents; use the dictionary built "
                "with this SAE"
            )
        sae_key = SAEKey(sae.cfg.block, sae.cfg.t, sae.cfg.branch)
        if sae.cfg.block and sae_key != self.key:
            raise ValueError(
                f"the concept dictionary was built for the SAE {self.key.describe()} but this "
                f"SAE is {sae_key.describe()}; load the dictionary saved beside this SAE"
            )

    def save(self, folder: str | os.PathLike) -> Path:
        """Write concepts.json and concept_embeddings.safetensors (rows with an embedding
        only), each atomically; concepts.json last, so its presence marks a complete save."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cids = self.has_embedding.nonzero().squeeze(1)
        tensors = {"cids": cids, "embeddings": self.embeddings[cids].float().contiguous()}
        atomic_write(folder / EMBEDDINGS_FILE, lambda tmp: save_file(tensors, tmp))
        write_json(folder / CONCEPTS_FILE, self._to_json())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ConceptDictionary:
        folder = Path(folder)
        if not (folder / CONCEPTS_FILE).is_file():
            raise DictionaryLoadError(f"no {CONCEPTS_FILE} in {folder}; {BUILD_HINT}")
        try:
            data = json.loads((folder / CONCEPTS_FILE).read_text())
            return cls._from_json(data, load_file(folder / EMBEDDINGS_FILE))
        except DictionaryLoadError:
            raise
        except (ValueError, KeyError, TypeError, SafetensorError, OSError) as e:
            raise DictionaryLoadError(
                f"the concept dictionary in {folder} is corrupt ({e!r}); rebuild or re-download it"
            ) from e

    def _to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "sae": self.key._asdict(),
            "num_latents": self.num_latents,
            "word_vectors": {"source": self.word_vectors, "dim": self.embedding_dim},
            "num_images": self.num_images,
            "thresholds": self.thresholds,
            "missing_labels": self.missing_labels,
            "partial_labels": self.partial_labels,
            "concepts": {
                str(cid): {label: ev._asdict() for label, ev in entry.items()}
                for cid, entry in self.evidence.items()
            },
        }

    @classmethod
    def _from_json(cls, data: dict, tensors: dict[str, Tensor]) -> ConceptDictionary:
        if data["format_version"] != FORMAT_VERSION:
            raise DictionaryLoadError(
                f"concept dictionary format {data['format_version']} is not supported (this "
                f"code reads {FORMAT_VERSION}); rebuild the dictionary"
            )
        num_latents, dim = data["num_latents"], data["word_vectors"]["dim"]
        evidence = {
            int(cid): {label: LabelEvidence(**ev) for label, ev in entry.items()}
            for cid, entry in data["concepts"].items()
        }
        _check_cids(evidence, num_latents)
        cids, rows = tensors["cids"].long(), tensors["embeddings"].float()
        if rows.shape != (len(cids), dim) or not set(cids.tolist()) <= evidence.keys():
            raise DictionaryLoadError(
                f"{EMBEDDINGS_FILE} does not match {CONCEPTS_FILE} ({num_latents} CIDs, "
                f"dim {dim}); the two files come from different saves, rebuild the dictionary"
            )
        embeddings = torch.zeros(num_latents, dim).index_copy_(0, cids, rows)
        has_embedding = torch.zeros(num_latents, dtype=torch.bool).index_fill_(0, cids, True)
        return cls(
            SAEKey(**data["sae"]),
            num_latents,
            evidence,
            embeddings,
            has_embedding,
            data["word_vectors"]["source"],
            missing_labels=data["missing_labels"],
            partial_labels=data["partial_labels"],
            num_images=data["num_images"],
            thresholds=data["thresholds"],
        )


def concept_cids(
    dictionaries: Mapping[SAEKey, ConceptDictionary], word: str, block: str, branch: str = "cond"
) -> dict[SAEKey, list[int]]:
    """The CIDs labelled `word` in each dictionary of `block`/`branch` (what steering takes).

    A t at which no concept carries the word maps to []: steps using that SAE are not
    edited. No CIDs at any t is an error naming the labels that do exist.
    """
    mine = {
        key: d for key, d in dictionaries.items() if key.block == block and key.branch == branch
    }
    if not mine:
        raise ValueError(f"there is no concept dictionary for {block} on the {branch} branch")
    found = {key: d.cids_for(word) for key, d in mine.items()}
    if not any(found.values()):
        known = sorted({label for d in mine.values() for label in d.vocabulary()[:5]})
        raise ValueError(
            f"no concept of {block} ({branch}) is labelled {word!r} at any t; try one of "
            f"{', '.join(known) or 'none'}, or a CID"
        )
    return found


def save_dictionaries(dictionaries: Iterable[ConceptDictionary], root: str | os.PathLike) -> None:
    """Save each dictionary beside its SAE: root/bank_subfolder(key), as SAEBank lays out."""
    dictionaries = list(dictionaries)
    folders = {Path(root) / bank_subfolder(d.key): d for d in dictionaries}
    if len(folders) < len(dictionaries):
        raise ValueError("two dictionaries are for the same SAE (or t{t:.2f} folder); keep one")
    for folder, dictionary in folders.items():
        dictionary.save(folder)


def load_dictionaries(
    path_or_repo_id: str | os.PathLike,
    blocks: Iterable[str] | None = None,
    branches: Iterable[str] | None = None,
    *,
    revision: str | None = None,
) -> dict[SAEKey, ConceptDictionary]:
    """Every dictionary below a local bank folder or Hub repo, keyed by its SAE.

    From the Hub only the dictionary files are downloaded (of `blocks`, if given), not the SAEs.
    """
    blocks = list(blocks) if blocks is not None else None
    branches = list(branches) if branches is not None else None
    prefixes = [f"{block}/" for block in blocks] if blocks else [""]
    patterns = [f"{p}*{name}" for p in prefixes for name in (CONCEPTS_FILE, EMBEDDINGS_FILE)]
    root = _resolve(path_or_repo_id, patterns, revision)
    dictionaries = {}
    for path in sorted(root.rglob(CONCEPTS_FILE)):
        dictionary = ConceptDictionary.load(path.parent)
        key = dictionary.key
        if (blocks and key.block not in blocks) or (branches and key.branch not in branches):
            continue
        if key in dictionaries:
            raise DictionaryLoadError(f"two concept dictionaries under {root} are for {key}")
        dictionaries[key] = dictionary
    if not dictionaries:
        raise DictionaryLoadError(
            f"no concept dictionaries ({CONCEPTS_FILE}) under {root} for blocks={blocks}, "
            f"branches={branches}; {BUILD_HINT}"
        )
    return dictionaries


class DictionaryBuilder:
    """Gathers the IoU evidence of paper 1, one annotated image at a time.

    Resolution: the latent grid is coarse (16x16 for SD v1.4's down/up blocks) and the masks
    fine (512x512); the paper does not say how it compares them. Here the binarised map stays
    on the latent grid and each mask becomes the fraction of every grid cell it covers (area
    averaging). Counting each "on" cell as its whole block of pixels, the IoU is then exactly
    the IoU at mask resolution of the map upsampled with nearest neighbour, when the mask
    size is a multiple of the grid (512 = 32 x 16); otherwise cells overlap slightly and it is
    a close approximation. Nearest rather than bilinear because the SAE has no information
    below a cell, and because it costs O(H*W) per latent instead of O(512*512): an image
    costs a sum over its (cell, active latent) pairs, about 2.5 ms on a 2-core CPU
    (16x16 grid, n = 5120, k = 20, four 512x512 masks), most of it reading the masks.

    Both thresholds are strict: a cell is on if activation / max > activation_threshold, a
    label is added if IoU > iou_threshold.
    """

    def __init__(
        self,
        key: SAEKey,
        num_latents: int,
        *,
        activation_threshold: float = ACTIVATION_THRESHOLD,
        iou_threshold: float = IOU_THRESHOLD,
    ) -> None:
        for name, value in (("activation", activation_threshold), ("iou", iou_threshold)):
            if not 0 <= value < 1:
                raise ValueError(f"the {name} threshold must be in [0, 1), got {value}")
        self.key = key
        self.num_latents = num_latents
        self.activation_threshold = activation_threshold
        self.iou_threshold = iou_threshold
        self.num_images = 0
        self._counts: Counter[tuple[int, str]] = Counter()
        self._iou_sums: Counter[tuple[int, str]] = Counter()

    def add_codes(
        self,
        top_acts: Tensor,
        top_indices: Tensor,
        objects: Sequence[tuple[str, np.ndarray | Tensor]],
    ) -> int:
        """Add the evidence of one image; returns the number of (CID, label) matches.

        top_acts, top_indices: the image's TopK code on its latent grid, [H, W, k], as in
        `LatentGrid` (grid.top_acts[i], grid.top_indices[i] for image i of a batch).
        objects: (name, mask) pairs, each mask 2-D at the image's resolution, non-zero on
        the object.

        Per CID: on cells = activation / the CID's max in the image > threshold;
        intersection = sum of the objects' coverage over its on cells, union = on cells +
        object area - intersection, all in cells; only CIDs with an activation > 0 count.
        """
        if top_acts.ndim != 3 or top_acts.shape != top_indices.shape:
            raise ValueError(
                f"expected top_acts and top_indices of one shape [H, W, k], got "
                f"{tuple(top_acts.shape)} and {tuple(top_indices.shape)}"
            )
        if (
            top_indices.numel()
            and not 0 <= int(top_indices.min()) <= int(top_indices.max()) < self.num_latents
        ):
            raise ValueError(
                f"the code has CIDs outside [0, {self.num_latents}); is it from the SAE of "
                f"{self.key.describe()}?"
            )
        self.num_images += 1
        if not objects:
            return 0
        height, width, k = top_acts.shape
        labels = [_checked_label(name) for name, _ in objects]
        coverage = _cell_coverage([mask for _, mask in objects], (height, width))  # [HW, objects]
        cells = torch.arange(height * width).repeat_interleave(k)
        cids, acts = top_indices.flatten().cpu().long(), top_acts.detach().flatten().cpu().float()
        firing = acts > 0
        cells, cids, acts = cells[firing], cids[firing], acts[firing]
        maxima = torch.zeros(self.num_latents).scatter_reduce_(0, cids, acts, reduce="amax")
        on = acts / maxima[cids] > self.activation_threshold
        cells, cids = cells[on], cids[on]
        active = cids.unique()
        intersection = torch.zeros(self.num_latents, len(objects))
        intersection.index_add_(0, cids, coverage[cells])
        intersection = intersection[active]
        size = torch.bincount(cids, minlength=self.num_latents)[active, None]
        ious = intersection / (size + coverage.sum(dim=0) - intersection)
        matches = (ious > self.iou_threshold).nonzero().tolist()
        for row, obj in matches:
            match = (int(active[row]), labels[obj])
            self._counts[match] += 1
            self._iou_sums[match] += float(ious[row, obj])
        return len(matches)

    def evidence(self) -> dict[int, dict[str, LabelEvidence]]:
        """The entries gathered so far."""
        evidence: dict[int, dict[str, LabelEvidence]] = {}
        for (cid, label), count in sorted(self._counts.items()):
            mean_iou = self._iou_sums[cid, label] / count
            evidence.setdefault(cid, {})[label] = LabelEvidence(count, mean_iou)
        return evidence

    def build(self, word_vectors: WordVectors) -> ConceptDictionary:
        return ConceptDictionary.from_evidence(
            self.key,
            self.num_latents,
            self.evidence(),
            word_vectors,
            num_images=self.num_images,
            thresholds={"activation": self.activation_threshold, "iou": self.iou_threshold},
        )


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


def _cell_coverage(masks: Sequence[np.ndarray | Tensor], grid: tuple[int, int]) -> Tensor:
    """[H * W, num_masks]: fraction of each latent-grid cell that each mask covers."""
    masks = [torch.as_tensor(m) for m in masks]
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"object masks must be 2-D and all of one image's size, got shapes {sorted(shapes)}"
        )
    (mask_h, mask_w), (height, width) = shapes.pop(), grid
    if mask_h * width != mask_w * height:
        raise ValueError(
            f"the object masks are {mask_h}x{mask_w} but the latent grid is {height}x{width}: "
            "their aspect ratios differ; pass masks at the generated image's resolution"
        )
    stacked = torch.stack([m.cpu().bool() for m in masks]).float()  # .bool() is free on bool masks
    return F.adaptive_avg_pool2d(stacked, grid).reshape(len(masks), -1).T


def _normalized(entry: Mapping[str, LabelEvidence]) -> dict[str, LabelEvidence]:
    normalized = {_checked_label(label): LabelEvidence(*ev) for label, ev in entry.items()}
    if len(normalized) < len(entry):
        raise ValueError(
            f"labels {sorted(entry)} include spellings of one name (see normalize_label); "
            "merge their evidence first"
        )
    return normalized


def _checked_label(name: str) -> str:
    label = normalize_label(name)
    if not label:
        raise ValueError(f"object name {name!r} is empty; give every mask a name")
    return label


def _check_cids(evidence: Mapping[int, object], num_latents: int) -> None:
    bad = [cid for cid in evidence if not 0 <= cid < num_latents]
    if bad:
        raise ValueError(f"CIDs {bad[:5]} are out of range for an SAE with {num_latents} latents")


def _resolve(path_or_repo_id: str | os.PathLike, patterns: list[str], revision: str | None) -> Path:
    try:
        root = local_or_snapshot(path_or_repo_id, patterns, revision)
    except FileNotFoundError as e:
        raise DictionaryLoadError(f"{e}; {BUILD_HINT}") from e
    if not root.exists():
        raise DictionaryLoadError(f"the folder {str(root)!r} does not exist; {BUILD_HINT}")
    return root
