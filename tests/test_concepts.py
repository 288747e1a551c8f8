import json
import math

import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from core.emergence.concept_measures import cohesion, separability, top_examples
from core.emergence.concepts import (
    CONCEPTS_FILE,
    EMBEDDINGS_FILE,
    ConceptDictionary,
    DictionaryLoadError,
    LabelEvidence,
    concept_cids,
    load_dictionaries,
    save_dictionaries,
)
from core.emergence.dictionary_builder import DictionaryBuilder
from core.emergence.words import WordVectors
from core.sae.bank import SAEBank, SAEKey, bank_subfolder
from core.sae.config import SAEConfig
from core.sae.model import TopKSAE

KEY = SAEKey("up_blocks.1.attentions.0", 1.0, "cond")


def word_vectors(words: dict[str, list[float]], source: str = "test") -> WordVectors:
    keyed_vectors = KeyedVectors(vector_size=len(next(iter(words.values()))))
    keyed_vectors.add_vectors(list(words), np.array(list(words.values()), dtype=np.float32))
    return WordVectors(keyed_vectors, source)


VECTORS = word_vectors({"cat": [1, 0], "dog": [0, 1], "car": [3, 3], "teddy": [2, 0]})


def cells(*positions: tuple[int, int], value: float = 1.0, grid: int = 4) -> torch.Tensor:
    plane = torch.zeros(grid, grid)
    for i, j in positions:
        plane[i, j] = value
    return plane


def block_mask(rows: slice, cols: slice, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return mask


CAT_CELLS = [(0, 0), (0, 1), (1, 0), (1, 1)]
DOG_CELLS = [(2, 2), (2, 3), (3, 2), (3, 3)]
ROW_2 = [(2, 0), (2, 1), (2, 2), (2, 3)]


def known_image() -> tuple[torch.Tensor, list]:
    """A 4x4 latent grid over an 8x8 image: cat in the top-left 2x2 cells, dog bottom-right."""
    planes = [
        cells(*CAT_CELLS),  # 0: exactly the cat -> cat (IoU 1)
        cells(*DOG_CELLS),  # 1: exactly the dog -> dog
        cells(*CAT_CELLS) + cells((0, 2), (1, 2), value=0.5),  # 2: IoU 4/6 -> cat
        cells(*CAT_CELLS, value=2.0) + cells(*ROW_2, value=0.2),  # 3: 0.1 * max is off -> cat
        cells(*CAT_CELLS, value=2.0) + cells(*ROW_2, value=0.25),  # 4: IoU exactly 0.5 -> none
        torch.zeros(4, 4),  # 5: never fires
        cells(*CAT_CELLS[:3]),  # 6: IoU 3/4 -> cat
        cells(*CAT_CELLS[:2]),  # 7: IoU exactly 0.5 -> none
    ]
    objects = [
        ("Cat", block_mask(slice(0, 4), slice(0, 4))),
        ("dog", block_mask(slice(4, 8), slice(4, 8))),
    ]
    return torch.stack(planes, dim=-1), objects


def add_map(builder: DictionaryBuilder, latent_map: torch.Tensor, objects: list) -> int:
    """Add a dense [H, W, n] latent map as a code that keeps every latent of each cell."""
    top_acts, top_indices = latent_map.topk(latent_map.shape[-1], dim=-1)
    return builder.add_codes(top_acts, top_indices, objects)


def test_builder_labels_latents_that_match_an_object(tmp_path):
    latent_map, objects = known_image()
    builder = DictionaryBuilder(KEY, 8)
    assert add_map(builder, latent_map, objects) == 5
    evidence = builder.evidence()
    assert {cid: set(entry) for cid, entry in evidence.items()} == {
        0: {"cat"},
        1: {"dog"},
        2: {"cat"},
        3: {"cat"},
        6: {"cat"},
    }
    assert evidence[2]["cat"] == LabelEvidence(1, pytest.approx(4 / 6))
    assert evidence[6]["cat"].mean_iou == pytest.approx(0.75)


def test_sparse_codes_give_the_same_evidence_as_dense_maps():
    latent_map, objects = known_image()
    top_acts, top_indices = latent_map.topk(6, dim=-1)  # lossless, zeros included
    dense, sparse = DictionaryBuilder(KEY, 8), DictionaryBuilder(KEY, 8)  # every latent / top 6
    for _ in range(3):
        add_map(dense, latent_map, objects)
        sparse.add_codes(top_acts, top_indices, objects)
    assert dense.evidence() == sparse.evidence()
    assert dense.evidence()[0]["cat"] == LabelEvidence(3, 1.0)


def test_builder_iou_is_the_full_resolution_iou_of_the_nearest_upsampled_map():
    generator = torch.Generator().manual_seed(0)
    latent_map = torch.rand(4, 4, 16, generator=generator).relu_().sub_(0.3).clamp_min_(0)
    mask = torch.rand(16, 16, generator=generator) > 0.6
    builder = DictionaryBuilder(KEY, 16, iou_threshold=0.0)
    add_map(builder, latent_map, [("cat", mask)])
    on = latent_map / latent_map.amax(dim=(0, 1)) > 0.1
    upsampled = on.repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)
    for cid in range(16):
        inter = (upsampled[..., cid] & mask).sum().item()
        union = (upsampled[..., cid] | mask).sum().item()
        found = builder.evidence().get(cid, {}).get("cat")
        if inter == 0:
            assert found is None
        else:
            assert found.mean_iou == pytest.approx(inter / union)


def test_builder_rejects_bad_input():
    latent_map, objects = known_image()
    builder = DictionaryBuilder(KEY, 8)
    with pytest.raises(ValueError, match="aspect ratios differ"):
        add_map(builder, latent_map, [("cat", np.ones((8, 16), bool))])
    with pytest.raises(ValueError, match="all of one image's size"):
        add_map(
            builder, latent_map, [("cat", np.ones((8, 8), bool)), ("dog", np.ones((4, 4), bool))]
        )
    with pytest.raises(ValueError, match="is empty"):
        add_map(builder, latent_map, [(" _ ", np.ones((8, 8), bool))])
    with pytest.raises(ValueError, match="outside"):
        builder.add_codes(torch.ones(4, 4, 1), torch.full((4, 4, 1), 8), objects)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\)"):
        DictionaryBuilder(KEY, 8, iou_threshold=1.0)


def test_embeddings_are_count_weighted_means_and_missing_labels_are_reported():
    latent_map, objects = known_image()
    builder = DictionaryBuilder(KEY, 8)
    add_map(builder, latent_map, objects)
    add_map(builder, latent_map, objects + [("zebra", block_mask(slice(4, 8), slice(4, 8)))])
    dictionary = builder.build(VECTORS)
    assert dictionary.labels(1) == {"dog": 2, "zebra": 1}
    assert dictionary.missing_labels == ["zebra"]
    torch.testing.assert_close(dictionary.embeddings[1], torch.tensor([0.0, 1.0]))
    assert dictionary.has_embedding.tolist() == [True, True, True, True, False, False, True, False]
    assert dictionary.embeddings[4].abs().sum() == 0
    assert dictionary.num_images == 2
    assert dictionary.thresholds == {"activation": 0.1, "iou": 0.5}

    mixed = ConceptDictionary.from_labels(KEY, 4, {2: ["cat", "cat", "dog", "zebra"]}, VECTORS)
    torch.testing.assert_close(mixed.embeddings[2], torch.tensor([2 / 3, 1 / 3]))


def test_cids_for_matches_normalised_labels_exactly():
    dictionary = ConceptDictionary.from_labels(
        KEY, 10, {3: ["teddy bear", "cat"], 7: ["Teddy_Bear"], 9: ["cats"]}, VECTORS
    )
    assert dictionary.cids_for("teddy bear") == [3, 7]
    assert dictionary.cids_for(" CAT ") == [3]
    assert dictionary.cids_for("dog") == []
    assert concept_cids({KEY: dictionary}, "cat", KEY.block) == {KEY: [3]}
    with pytest.raises(ValueError, match=r"labelled 'dog'.*teddy bear"):
        concept_cids({KEY: dictionary}, "dog", KEY.block)
    assert dictionary.partial_labels == {"teddy bear": ["bear"]}
    assert dictionary.missing_labels == ["cats"]
    assert ConceptDictionary.from_labels(KEY, 4, {1: ["Cat", "cat"]}, VECTORS).labels(1) == {
        "cat": 2
    }
    twice = {1: {"Cat": LabelEvidence(1, 0.6), "cat": LabelEvidence(2, 0.9)}}
    with pytest.raises(ValueError, match="spellings of one name"):
        ConceptDictionary.from_evidence(KEY, 4, twice, VECTORS)


def test_save_load_round_trip_beside_the_saes(tmp_path):
    latent_map, objects = known_image()
    builder = DictionaryBuilder(KEY, 8)
    add_map(builder, latent_map, objects)
    first = builder.build(VECTORS)
    other_key = SAEKey("mid_block.attentions.0", None, "uncond")
    second = ConceptDictionary.from_labels(other_key, 8, {5: ["car", "car", "dog"]}, VECTORS)

    bank = SAEBank()
    for key in (KEY, other_key):
        cfg = SAEConfig(d_in=4, num_latents=8, k=2, block=key.block, t=key.t, branch=key.branch)
        bank.add(TopKSAE(cfg))
    bank.save_pretrained(tmp_path)
    save_dictionaries([first, second], tmp_path)
    assert (tmp_path / bank_subfolder(KEY) / CONCEPTS_FILE).is_file()
    assert (tmp_path / bank_subfolder(KEY) / EMBEDDINGS_FILE).is_file()
    assert len(SAEBank.from_pretrained(tmp_path)) == 2

    loaded = load_dictionaries(tmp_path)
    assert set(loaded) == {KEY, other_key}
    for original in (first, second):
        copy = loaded[original.key]
        assert copy.evidence == original.evidence
        torch.testing.assert_close(copy.embeddings, original.embeddings)
        assert torch.equal(copy.has_embedding, original.has_embedding)
        for name in ("num_latents", "word_vectors", "missing_labels", "num_images", "thresholds"):
            assert getattr(copy, name) == getattr(original, name)
    assert set(load_dictionaries(tmp_path, blocks=["mid_block.attentions.0"])) == {other_key}
    assert set(load_dictionaries(tmp_path, branches=["cond"])) == {KEY}
    with pytest.raises(ValueError, match="same SAE"):
        save_dictionaries([first, first], tmp_path)


def test_loading_errors_say_what_to_do(tmp_path):
    with pytest.raises(DictionaryLoadError, match=r"offline or not found.*DictionaryBuilder"):
        load_dictionaries("nobody/no-such-dictionaries")
    with pytest.raises(DictionaryLoadError, match="does not exist"):
        load_dictionaries(tmp_path / "missing" / "..." / "x")
    with pytest.raises(DictionaryLoadError, match="no concept dictionaries"):
        load_dictionaries(tmp_path)
    folder = ConceptDictionary.from_labels(KEY, 8, {1: ["cat"]}, VECTORS).save(tmp_path / "d")
    (folder / CONCEPTS_FILE).write_text("{not json")
    with pytest.raises(DictionaryLoadError, match="corrupt"):
        ConceptDictionary.load(folder)
    ConceptDictionary.from_labels(KEY, 8, {1: ["cat"]}, VECTORS).save(folder)
    data = json.loads((folder / CONCEPTS_FILE).read_text())
    ConceptDictionary.from_labels(KEY, 8, {1: ["cat"], 2: ["dog"]}, VECTORS).save(folder)
    (folder / CONCEPTS_FILE).write_text(json.dumps(data))  # CID 2 embedded but unlabelled
    with pytest.raises(DictionaryLoadError, match="different saves"):
        ConceptDictionary.load(folder)


def test_check_sae_rejects_another_saes_dictionary():
    dictionary = ConceptDictionary.from_labels(KEY, 8, {1: ["cat"]}, VECTORS)
    block, t, branch = KEY
    dictionary.check_sae(TopKSAE(SAEConfig(4, 8, 2, block=block, t=t, branch=branch)))
    dictionary.check_sae(TopKSAE(SAEConfig(4, 8, 2)))  # no key in the config: width only
    with pytest.raises(ValueError, match="has 8 CIDs but the SAE has 16 latents"):
        dictionary.check_sae(TopKSAE(SAEConfig(4, 16, 2)))
    with pytest.raises(ValueError, match=r"built for the SAE .*t=1.*but this SAE is .*t=0.5"):
        dictionary.check_sae(TopKSAE(SAEConfig(4, 8, 2, block=block, t=0.5, branch=branch)))


def test_cohesion_on_hand_computed_examples():
    dictionary = ConceptDictionary.from_labels(
        KEY, 4, {0: ["cat", "dog"], 1: ["car"], 2: ["cat", "cat", "dog"], 3: ["zebra"]}, VECTORS
    )
    pair = 1 / math.sqrt(2)  # cat and dog are orthogonal, each at 45 degrees from the centre
    weighted = (2 * (2 / math.sqrt(5)) + 1 / math.sqrt(5)) / 3
    assert cohesion(dictionary, VECTORS) == pytest.approx((pair + 1 + weighted) / 3)
    assert cohesion(dictionary, VECTORS, min_items=2) == pytest.approx((pair + weighted) / 2)
    with pytest.raises(ValueError, match="no concept has 4 or more labels"):
        cohesion(dictionary, VECTORS, min_items=4)


def test_separability_on_hand_computed_examples():
    dictionary = ConceptDictionary.from_labels(
        KEY, 5, {0: ["cat"], 2: ["dog"], 3: ["car"], 4: ["zebra"]}, VECTORS
    )
    # cat . dog = 0, cat . car = dog . car = 1/sqrt(2); zebra has no embedding.
    assert separability(dictionary) == pytest.approx(2 / math.sqrt(2) / 3)
    single = ConceptDictionary.from_labels(KEY, 5, {0: ["cat"], 1: ["zebra"]}, VECTORS)
    with pytest.raises(ValueError, match="two or more concepts"):
        separability(single)


def test_top_examples_rank_images_by_spatial_mean():
    means = torch.tensor([[0.0, 1.0], [0.5, 2.0], [0.2, 0.0], [0.0, 3.0]])
    images, values = top_examples(means, 0, n=3)
    assert images.tolist() == [1, 2] and values.tolist() == [0.5, pytest.approx(0.2)]
    assert top_examples(means, 1, n=2).images.tolist() == [3, 1]
    with pytest.raises(ValueError, match="out of range"):
        top_examples(means, 2)


def test_a_search_ranks_the_concepts_a_word_names_first():
    """CID 1 has "star" most often but is mostly a circle; CID 3 is a star before all else."""
    labels = {
        1: ["circle"] * 10 + ["star"] * 7,
        2: ["star"] * 2 + ["square"] * 2,
        3: ["star"] * 4 + ["dotted"] * 2,
        4: ["cat"],
    }
    dictionary = ConceptDictionary.from_labels(KEY, 8, labels, VECTORS)
    assert dictionary.cids_for("star") == [1, 2, 3]
    assert dictionary.ranked_cids("Star") == [3, 2, 1]
