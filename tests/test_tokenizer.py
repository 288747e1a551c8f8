import pytest
from transformers import CLIPTokenizer

from core.diffusion.tokenizer import write_clip_tokenizer


def test_written_vocabulary_loads_as_a_clip_tokenizer(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, ["red", "circle"]))
    assert tokenizer.model_max_length == 77
    tokens = tokenizer.tokenize("A red circle, reddish")
    assert tokens[:3] == ["a</w>", "red</w>", "circle</w>"]
    assert "reddish</w>" not in tokens and "".join(tokens[4:]) == "reddish</w>"
    ids = tokenizer("red").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_words_must_be_lower_case_letters(tmp_path):
    with pytest.raises(ValueError, match="lower-case letters"):
        write_clip_tokenizer(tmp_path, ["Red"])


def test_every_word_is_one_token_even_when_words_share_letter_pairs(tmp_path):
    words = ["diamond", "gradient", "green", "gray", "an", "and", "background", "checkered"]
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path, words))
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"]
