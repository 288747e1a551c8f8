"""Time the app as a user meets it: cold start, then each tab's requests.

    python -m scripts.bench_app                  # the default (offline) preset
    python -m scripts.bench_app --repeats 5
    SD14_SAES=user/repo python -m scripts.bench_app --preset sd14 --word cat --prompt "a cat"

Starts `python app.py` on a free port of 127.0.0.1 and measures, from process start, when
the page is served and when the preset is loaded (the status line says "(loaded)"), then
calls each endpoint through gradio_client: the first call (warm-up) and the median of the
next `--repeats`. Prints a Markdown table.
"""

import argparse
import statistics
import time
import urllib.request
from collections.abc import Callable

from gradio_client import Client

from tests.app_server import app_url


def wait_for(check: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get ready in time")
        time.sleep(0.05)


def cold_start(preset: str) -> tuple[str, float, float]:
    """(url, seconds to the page, seconds to the loaded preset), from process start."""
    start = time.monotonic()
    url = app_url("--preset", preset)
    page = time.monotonic() - start
    with urllib.request.urlopen(url) as response:
        assert response.status == 200
    client = Client(url, verbose=False)
    wait_for(lambda: "(loaded)" in client.predict(preset, api_name="/status"))
    return url, page, time.monotonic() - start


def requests(args: argparse.Namespace, cid: int) -> dict[str, tuple]:
    preset, prompt, block, word = args.preset, args.prompt, args.block, args.word
    steer = (
        preset,
        prompt,
        0,
        block,
        "cond",
        "word",
        word,
        0,
        1.0,
        "spatial",
        "early",
        0.6,
        1.0,
        4000,
        "quadrant",
        "top_left",
        None,
    )
    key = (preset, block, 0.5, "cond", cid)
    steps = args.steps
    return {
        f"emergence ({steps} steps)": ((preset, prompt, 0, steps, block, "cond", ""), "/emergence"),
        "emergence: move the step slider": ((3,), "/emergence_step"),
        "steer (before + after, the preset's steps twice)": (steer, "/steer"),
        "inspect: search by word": ((preset, block, 0.5, "cond", word), "/search_concepts"),
        "inspect: dictionary entry, statistics, neighbours": (key, "/inspect_concept"),
        "inspect: top examples (6 regenerated)": (key, "/top_examples"),
        "inspect: activation on a new generation": ((*key, prompt, 0), "/activation_map"),
        "inspect: feature icon": ((*key, 10.0, 0), "/feature_icon"),
    }


def timed(client: Client, args: tuple, api_name: str) -> float:
    start = time.perf_counter()
    client.predict(*args, api_name=api_name)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_app")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompt", default="a red circle and a blue star")
    parser.add_argument("--word", default="star", help="a concept label of the preset")
    parser.add_argument("--block", default="up_blocks.1.attentions.0")
    parser.add_argument("--steps", type=int, default=10, help="emergence steps")
    args = parser.parse_args()
    url, page, loaded = cold_start(args.preset)
    print(f"cold start: page served after {page:.1f} s, preset loaded after {loaded:.1f} s\n")
    client = Client(url, verbose=False)
    search = (args.preset, args.block, 0.5, "cond", args.word)
    _, cid, _ = client.predict(*search, api_name="/search_concepts")
    print(f"| request | first call (s) | median of next {args.repeats} (s) |")
    print("| --- | --- | --- |")
    for name, (call_args, api_name) in requests(args, cid).items():
        first = timed(client, call_args, api_name)
        rest = [timed(client, call_args, api_name) for _ in range(args.repeats)]
        print(f"| {name} | {first:.2f} | {statistics.median(rest):.2f} |")


if __name__ == "__main__":
    main()
