"""Concept dictionaries: what each SAE latent (CID) stands for, in words.

Paper 1 labels latents from generated images alone: each final image is annotated with
(object name, mask) pairs, and a latent whose normalised activation map, binarised at 0.1,
overlaps an object's mask with IoU > 0.5 gets that object's name added to its entry. The
entry is a multiset of names; the concept's embedding is the mean word vector of the names.
`core.emergence.dictionary_builder` builds one; `core.emergence.concept_measures` measures it.

One dictionary belongs to one SAE, i.e. one (block, t, branch).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.emergence.words import WordVectors
from core.files import atomic_write, local_or_snapshot, write_json
from core.sae.bank import SAEKey, bank_subfolder
from core.sae.model import TopKSAE

CONCEPTS_FILE = "concepts.json"
EMBEDDINGS_FILE = "concept_embeddings.safetensors"
FORMAT_VERSION = 1
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
        counts = {cid: Counter(map(checked_label, names)) for cid, names in labels.items()}
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

    def ranked_cids(self, word: str) -> list[int]:
        """`cids_for(word)`, best first: the concepts that `word` labels most often (their
        first label), then the others; within each, the more images `word` labels, the
        earlier."""
        label = normalize_label(word)

        def rank(cid: int) -> tuple:
            counts = self.labels(cid)
            return (counts[label] < max(counts.values()), -counts[label], cid)

        return sorted(self.cids_for(word), key=rank)

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


def _normalized(entry: Mapping[str, LabelEvidence]) -> dict[str, LabelEvidence]:
    normalized = {checked_label(label): LabelEvidence(*ev) for label, ev in entry.items()}
    if len(normalized) < len(entry):
        raise ValueError(
            f"labels {sorted(entry)} include spellings of one name (see normalize_label); "
            "merge their evidence first"
        )
    return normalized


def checked_label(name: str) -> str:
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
