"""Write the vocabulary files of a small CLIP tokenizer.

Small pipelines built from configs (the `tiny` preset, the toy world) need a tokenizer
that `CLIPTokenizer.from_pretrained` can load like any real one. The vocabulary holds
CLIP's 512 byte-level symbols (each alone and as a word end), the two special tokens,
and, for every word given, the chain of merges that spells it out, so those words
become single tokens and anything else falls back to characters.
"""

import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length, as in Stable Diffusion


def _byte_symbols() -> list[str]:
    """CLIP/GPT-2's printable stand-ins for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Merges that build `word</w>` from its characters, left to right."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges, left = [], pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left += right
    return merges


def write_clip_tokenizer(folder: str | Path, words: Iterable[str] = ()) -> Path:
    """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` into `folder`.

    Words must be lower-case ASCII without spaces (CLIP lower-cases its input).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        if not word.isascii() or not word.isalpha() or word != word.lower():
            raise ValueError(f"tokenizer words must be lower-case letters, got {word!r}")
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
