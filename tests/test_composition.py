import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from core.diffusion.hooks import record
from core.emergence.composition import (
    concept_map,
    iou,
    latent_grid,
    predict_mask,
    predict_over_steps,
    similarity_map,
)
from core.emergence.concepts import ConceptDictionary
from core.emergence.words import WordVectors, load_word_vectors
from core.sae.bank import SAEBank, SAEKey
from core.sae.config import SAEConfig
from core.sae.model import TopKSAE
from tests.helpers import dense_latents, seeded

UP = "up_blocks.1.attentions.0"
NARROW = "down_blocks.0.attentions.0"  # 32 channels in the tiny model, against 64 for UP
TIMES = (1.0, 0.5, 0.0)
T, F_ = True, False

keyed_vectors = KeyedVectors(vector_size=3)
keyed_vectors.add_vectors(["cat", "dog", "car"], np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1.0]]))
VECTORS = WordVectors(keyed_vectors, "test")


def identity_sae(k: int = 2) -> TopKSAE:
    """d = n = 4 with identity encoder and decoder: latent i is ReLU(channel i)."""
    sae = TopKSAE(SAEConfig(d_in=4, num_latents=4, k=k))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    return sae


def known_delta() -> torch.Tensor:
    """[4, 2, 3]: one column of channel values per position, positions in row-major order."""
    positions = [
        [3, 1, 0, 0],  # (0, 0): cat first
        [0, 2, 0, 0],  # (0, 1): dog, then a zero
        [1, 0, 0, 5],  # (0, 2): unlabelled latent 3 first, then cat
        [0, 0, 0, 4],  # (1, 0): only unlabelled latent 3 -> invalid
        [0, 0, 2, 0],  # (1, 1): car
        [-1, -1, -1, -1],  # (1, 2): nothing fires -> invalid
    ]
    return torch.tensor(positions, dtype=torch.float32).T.reshape(4, 2, 3)


@pytest.fixture
def dictionary() -> ConceptDictionary:
    key = SAEKey("", None, "cond")
    return ConceptDictionary.from_labels(key, 4, {0: ["cat"], 1: ["dog"], 2: ["car"]}, VECTORS)


def test_latent_grid_follows_to_rows_and_sorts_each_code():
    grid = latent_grid(identity_sae(), known_delta())
    assert grid.top_indices.shape == (1, 2, 3, 2)
    assert grid.top_indices[0, 0, 0].tolist() == [0, 1]
    assert grid.top_acts[0, 0, 2].tolist() == [5.0, 1.0]
    assert grid.top_indices[0, 0, 2].tolist() == [3, 0]
    dense = dense_latents(grid, 4)
    assert dense[0, 1, 1].tolist() == [0, 0, 2, 0]
    torch.testing.assert_close(grid.spatial_means(4), dense.mean(dim=(1, 2)))


def test_concept_map_takes_the_top_concept_as_the_paper_does(dictionary):
    """At (0, 2) the top latent, 3, has no label: the paper's map predicts nothing there."""
    cmap = concept_map(identity_sae(), dictionary, known_delta())
    assert cmap.cids.tolist() == [[[0, 1, -1], [-1, 2, -1]]]
    assert cmap.valid.tolist() == [[[T, T, F_], [F_, T, F_]]]
    torch.testing.assert_close(cmap.embeddings[0, 0, 1], torch.tensor([0.8, 0.6, 0.0]))
    assert cmap.embeddings[0, 0, 2].abs().sum() == 0


def test_the_labelled_reading_skips_unlabelled_concepts(dictionary):
    cmap = concept_map(identity_sae(), dictionary, known_delta(), reading="labelled")
    assert cmap.cids.tolist() == [[[0, 1, 0], [-1, 2, -1]]]
    assert cmap.valid.tolist() == [[[T, T, T], [F_, T, F_]]]
    assert cmap.embeddings[0, 1, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="unknown concept-map reading 'first'; choose top or"):
        concept_map(identity_sae(), dictionary, known_delta(), reading="first")


def test_predicted_masks_and_similarity(dictionary):
    cmap = concept_map(identity_sae(), dictionary, known_delta(), reading="labelled")
    cat = VECTORS.vector("cat")
    strict = predict_mask(cmap, cat, threshold=0.9)
    assert strict.mask.tolist() == [[[T, F_, T], [F_, F_, F_]]]
    similarity = strict.similarity[0]
    assert similarity[0, 1].item() == pytest.approx(0.8)
    assert similarity[1, 1].item() == pytest.approx(0.0)
    assert similarity[1, 0].isnan() and similarity[1, 2].isnan()
    loose = predict_mask(cmap, cat, threshold=0.7)
    assert loose.mask.tolist() == [[[T, T, T], [F_, F_, F_]]]
    torch.testing.assert_close(similarity_map(cmap, cat), strict.similarity, equal_nan=True)
    with pytest.raises(ValueError, match="3 dimensions; use the word vectors"):
        predict_mask(cmap, np.ones(50))
    with pytest.raises(ValueError, match="all zeros"):
        predict_mask(cmap, np.zeros(3))


def test_iou_upsamples_the_prediction_to_the_target():
    pred = torch.tensor([[T, F_, T], [F_, F_, F_]])
    target = torch.zeros(4, 6, dtype=torch.bool)
    target[:2, :2] = True  # the first predicted cell exactly
    target[:2, 2] = True  # half of an unpredicted cell
    assert iou(pred, target).item() == pytest.approx(4 / 10)
    assert iou(pred, target.numpy()).item() == pytest.approx(0.4)
    assert iou(pred, torch.ones(2, 3)).item() == pytest.approx(2 / 6)
    batch = torch.stack([pred, torch.zeros_like(pred)])
    assert iou(batch, target).tolist() == [pytest.approx(0.4), 0.0]
    empty = torch.zeros(4, 6, dtype=torch.bool)
    assert iou(pred, empty).item() == 0.0


def test_iou_of_two_empty_masks_is_undefined_not_perfect():
    pred = torch.tensor([[T, F_, T], [F_, F_, F_]])
    batch = torch.stack([pred, torch.zeros_like(pred)])
    empty = torch.zeros(4, 6, dtype=torch.bool)
    target = torch.zeros(4, 6, dtype=torch.bool)
    target[:2, :2] = True
    scores = iou(batch, torch.stack([target, empty]))
    assert scores[0].item() == pytest.approx(0.5) and scores[1].isnan()


def test_iou_rejects_masks_of_the_wrong_shape():
    pred = torch.zeros(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="aspect ratios differ"):
        iou(pred, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="one per image"):
        iou(pred.expand(2, 2, 3), torch.zeros(3, 4, 6))
    with pytest.raises(ValueError, match="cannot compare"):
        iou(pred[0], torch.zeros(4, 6))


def test_an_sae_for_another_block_or_dictionary_is_refused(dictionary):
    with pytest.raises(ValueError, match="reads 4 channels but this residual update has 5"):
        latent_grid(identity_sae(), torch.zeros(5, 2, 3))
    wide = TopKSAE(SAEConfig(d_in=4, num_latents=8, k=2))
    with pytest.raises(ValueError, match="has 4 CIDs but the SAE has 8 latents"):
        concept_map(wide, dictionary, known_delta())


@pytest.fixture(scope="module")
def generation(tiny_pipe):
    with record(tiny_pipe, [UP, NARROW]) as recording:
        tiny_pipe(
            "a cat",
            num_inference_steps=4,
            guidance_scale=7.5,
            generator=seeded(0),
            output_type="latent",
        )
    return recording


def tiny_bank(block: str = UP, num_latents: int = 128) -> SAEBank:
    torch.manual_seed(0)
    saes = [
        TopKSAE(SAEConfig(d_in=64, num_latents=num_latents, k=8, block=block, t=t)) for t in TIMES
    ]
    return SAEBank(saes)


def tiny_dictionaries(bank: SAEBank, vectors: WordVectors) -> dict:
    words = ["cat", "dog", "car", "tree", "house", "bird", "teddy bear"]
    dictionaries = {}
    for key, sae in bank.items():
        n = sae.cfg.num_latents
        labels = {cid: [words[(cid + int(key.t * 10)) % len(words)]] for cid in range(0, n, 2)}
        dictionaries[key] = ConceptDictionary.from_labels(key, n, labels, vectors)
    return dictionaries


def test_predictions_over_the_steps_of_a_tiny_generation(generation):
    glove = load_word_vectors()
    bank = tiny_bank()
    dictionaries = tiny_dictionaries(bank, glove)
    words = ["cat", "teddy bear"]
    steps = predict_over_steps(generation, bank, dictionaries, words, glove, block=UP)
    assert [s.step.t for s in steps] == [0.751, 0.501, 0.251, 0.001]
    assert [s.sae_key.t for s in steps] == [1.0, 0.5, 0.5, 0.0]
    cat_positions = 0
    for result in steps:
        delta = generation.at(UP, result.step.t, "cond").delta
        sae = bank[result.sae_key]
        cmap = concept_map(sae, dictionaries[result.sae_key], delta)
        assert cmap.valid.any()
        torch.testing.assert_close(result.concept_map.embeddings, cmap.embeddings)
        for word in words:
            expected = predict_mask(cmap, glove.vector(word))
            prediction = result.predictions[word]
            assert prediction.mask.shape == (1, 4, 4)
            assert torch.equal(prediction.mask, expected.mask)
        cat_cids = torch.tensor(dictionaries[result.sae_key].cids_for("cat"))
        cat_cells = torch.isin(result.concept_map.cids, cat_cids)
        assert result.predictions["cat"].mask[cat_cells].all()
        cat_positions += int(cat_cells.sum())
    assert cat_positions > 0


def test_bad_requests_over_steps_say_what_to_do(generation):
    glove = load_word_vectors()
    bank = tiny_bank()
    dictionaries = tiny_dictionaries(bank, glove)

    def run(words=("cat",), block=UP, branch="cond", bank=bank, dictionaries=dictionaries):
        return predict_over_steps(
            generation, bank, dictionaries, list(words), glove, block=block, branch=branch
        )

    with pytest.raises(ValueError, match=r"no word vector for \['qzxvw'\]"):
        run(["cat", "qzxvw"])
    with pytest.raises(ValueError, match="drop or replace those words"):
        run(["qzxvw cat"])
    with pytest.raises(ValueError, match="nothing was recorded for block 'mid_block"):
        run(block="mid_block.attentions.0")
    with pytest.raises(ValueError, match="no SAE for block .* branch 'uncond'"):
        run(branch="uncond")
    with pytest.raises(ValueError, match="no concept dictionary for the SAE"):
        run(dictionaries={})
    first = bank.keys()[0]
    unlabelled = ConceptDictionary.from_labels(first, 128, {}, glove)
    with pytest.raises(ValueError, match="has a label with a word vector"):
        run(dictionaries={**dictionaries, first: unlabelled})
    narrow_bank = tiny_bank(block=NARROW)
    with pytest.raises(ValueError, match="reads 64 channels but this residual update has 32"):
        run(block=NARROW, bank=narrow_bank, dictionaries=tiny_dictionaries(narrow_bank, glove))
