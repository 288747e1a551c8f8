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
    value = _as_number(seed, "The seed")
    if not value.is_integer() or not 0 <= value <= MAX_SEED:
        raise ValueError(f"The seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")
    return int(value)


def check_steps(steps: object, maximum: int = MAX_STEPS) -> int:
    value = _as_number(steps, "The number of steps")
    if not value.is_integer() or not 1 <= value <= maximum:
        raise ValueError(
            f"The number of steps must be a whole number from 1 to {maximum}, got {steps!r}."
        )
    return int(value)


def check_number(value: object, what: str, low: float, high: float) -> float:
    """A finite number in [low, high]; `what` names it in the message ("The strength")."""
    number = _as_number(value, what)
    if not low <= number <= high:
        raise ValueError(f"{what} must be between {low:g} and {high:g}, got {value!r}.")
    return number


def check_step(index: object, count: int) -> int:
    """A step index of a run of `count` steps (0 = the first, noisiest)."""
    value = _as_number(index, "The step")
    if not value.is_integer() or not 0 <= value < count:
        raise ValueError(
            f"The step must be a whole number from 0 to {count - 1} for this run, got {index!r}."
        )
    return int(value)


def check_cid(cid: object, num_latents: int) -> int:
    value = _as_number(cid, "The concept id (CID)")
    if not value.is_integer() or not 0 <= value < num_latents:
        raise ValueError(
            f"The concept id (CID) must be a whole number from 0 to {num_latents - 1} for this "
            f"SAE, got {cid!r}."
        )
    return int(value)


def parse_words(text: object) -> list[str]:
    """Comma-separated words ("cat, teddy bear"), case-folded, without repeats."""
    words = [" ".join(w.split()).casefold() for w in re.split(r"[,;\n]", str(text or ""))]
    words = list(dict.fromkeys(w for w in words if w))
    if len(words) > MAX_WORDS:
        raise ValueError(f"Give at most {MAX_WORDS} target words, got {len(words)}.")
    return words


def _as_number(value: object, what: str) -> float:
    """`value` as a finite float (numbers and numeric strings), or a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}.")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}.")
    return number
