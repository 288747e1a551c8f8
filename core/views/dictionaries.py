"""A preset's concept dictionaries, by SAE, with the word vectors they were built with."""

from collections.abc import Mapping, Sequence
from functools import cached_property

from core.emergence.concepts import ConceptDictionary, concept_cids
from core.emergence.words import WordVectors, load_word_vectors
from core.sae.bank import SAEKey


class Dictionaries(dict[SAEKey, ConceptDictionary]):
    """One dictionary per SAE that has one (empty when the preset has none)."""

    def __init__(self, by_key: Mapping[SAEKey, ConceptDictionary], word_source: str) -> None:
        super().__init__(by_key)
        self.word_source = word_source
        """The preset's word vectors, used where the dictionaries name no one source."""

    @cached_property
    def word_vectors(self) -> WordVectors:
        """The word vectors the dictionaries were built with (else the preset's)."""
        sources = {d.word_vectors for d in self.values()}
        return load_word_vectors(sources.pop() if len(sources) == 1 else self.word_source)

    def word_cids(self, word: str, block: str, branches: Sequence[str]) -> dict[SAEKey, list[int]]:
        """The CIDs labelled `word` in each dictionary of `block` on `branches`
        (`concept_cids`); an error when the preset has no dictionaries."""
        if not self:
            raise ValueError("This preset has no concept dictionaries; choose a concept by CID.")
        found: dict[SAEKey, list[int]] = {}
        for branch in branches:
            found.update(concept_cids(self, word, block, branch))
        return found
