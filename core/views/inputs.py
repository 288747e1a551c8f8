"""Checks of the settings a person types (prompt, seed, steps, words, numbers).

Each check returns the value in the type the core uses, or raises a ValueError whose
message is one sentence saying what is wrong and what to enter instead. Values may come
from a web form or an API client, so anything (a string, NaN, None) can arrive.
"""

import math
import re

MAX_PROMPT_CHARS = 1000
"""The text encoder reads 77 tokens, about 300 characters; far longer is a mistake."""
MAX_SEED = 2**32 - 1
MAX_STEPS = 150
MAX_WORDS = 6


def check_prompt(prompt: object) -> str:
    text = "" if prompt is None else str(prompt).strip()
    if not text:
        raise ValueError(
            "The prompt is empty; describe the image to generate, such as 'a red car'."
        )
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"The prompt is {len(text):,} characters long; keep it under {MAX_PROMPT_CHARS:,} "
            "(the text encoder reads only its first 77 tokens)."
        )
    return text


def check_seed(seed: object) -> int:
    return _whole(seed, "The seed", 0, MAX_SEED)


def check_steps(steps: object, maximum: int = MAX_STEPS) -> int:
    return _whole(steps, "The number of steps", 1, maximum)


def check_number(value: object, what: str, low: float, high: float) -> float:
    """A finite number in [low, high]; `what` names it in the message ("The strength")."""
    expected = f"between {low:g} and {high:g}"
    number = _as_number(value, what, expected)
    if not low <= number <= high:
        raise ValueError(f"{what} must be {expected}, got {_shown(value)}.")
    return number


def check_step(index: object, count: int) -> int:
    """A step index of a run of `count` steps (0 = the first, noisiest)."""
    return _whole(index, "The step", 0, count - 1, " for this run")


def check_cid(cid: object, num_latents: int) -> int:
    return _whole(cid, "The concept id (CID)", 0, num_latents - 1, " for this SAE")


def parse_words(text: object) -> list[str]:
    """Comma-separated words ("cat, teddy bear"), case-folded, without repeats."""
    words = [" ".join(w.split()).casefold() for w in re.split(r"[,;\n]", str(text or ""))]
    words = list(dict.fromkeys(w for w in words if w))
    if len(words) > MAX_WORDS:
        raise ValueError(f"Give at most {MAX_WORDS} target words, got {len(words)}.")
    return words


def _whole(value: object, what: str, low: int, high: int, where: str = "") -> int:
    """`value` as a whole number in [low, high], or a ValueError naming the range."""
    expected = f"a whole number from {low} to {high}{where}"
    number = _as_number(value, what, expected)
    if not number.is_integer() or not low <= number <= high:
        raise ValueError(f"{what} must be {expected}, got {_shown(value)}.")
    return int(number)


def _as_number(value: object, what: str, expected: str) -> float:
    """`value` as a finite float (numbers and numeric strings), or a ValueError saying that
    `what` must be `expected`."""
    if value is None:
        raise ValueError(f"{what} must be {expected}, got {_shown(value)}.")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}.")
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number ({expected}), got {_shown(value)}.")
    return number


def _shown(value: object) -> str:
    """How a message names a value; a form sends nothing (None) for an empty box and for a
    number too large to read, such as 1e999."""
    if value is None:
        return "nothing (an empty box, or a number too large to read)"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)
