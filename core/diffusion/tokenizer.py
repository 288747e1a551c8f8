"""Write the vocabulary files of a small CLIP tokenizer.

Small pipelines built from configs (the `tiny` preset, the toy world) need a tokenizer
that `CLIPTokenizer.from_pretrained` can load like any real one. The vocabulary holds
CLIP's 512 byte-level symbols (each alone and as a word end), the two special tokens,
and the merges that BPE learns from the words given, so those words become single
tokens and anything else falls back to characters and shorter pieces.
"""

import json
from collections import Counter
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


def _learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges, in rank order, that turn each word (`word</w>`) into one token.

    Learnt as BPE learns them: merge the most frequent adjacent pair everywhere, again and
    again. Encoding a word applies the lowest-ranked merge first, which replays this very
    sequence, so every word ends as one token. (Chaining each word's letters on its own
    does not: "diamond"'s merge d+i would fire inside "gradient" and split it.)
    """
    pieces = {word: [*word[:-1], word[-1] + "</w>"] for word in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter(
            pair for parts in pieces.values() for pair in zip(parts, parts[1:], strict=False)
        )
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        for word, parts in pieces.items():
            pieces[word] = _merge(parts, pair)


def _merge(parts: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


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
    words = list(words)
    for word in words:
        if not word.isascii() or not word.isalpha() or word != word.lower():
            raise ValueError(f"tokenizer words must be lower-case letters, got {word!r}")
    merges = _learn_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
