"""Time the app as a user meets it: cold starts, then each tab's requests.

    python -m scripts.bench_app                  # the default (offline) preset
    python -m scripts.bench_app --repeats 5 --starts 7
    SD14_SAES=user/repo python -m scripts.bench_app --preset sd14 --prompt "a cat"

Cold starts: `--starts` times each, alternating, a process that only imports torch and
gradio (the floor: the page cannot come sooner) and `python app.py` on a free port of
127.0.0.1, timed from process start to the page served and to the preset loaded (the status
line says "(loaded)"); the medians and the page's ratio to the floor. Then it calls each
endpoint through gradio_client: the first call (warm-up) and the median of the next
`--repeats`. Prints Markdown tables.
"""

import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from gradio_client import Client

from core.diffusion.presets import get_preset
from core.runtime import command
from scripts.app_server import start_app, stop


@dataclass
class BenchAppConfig:
    """Settings of `python -m scripts.bench_app`."""

    repeats: int = 3
    """Timed calls of each request after its first (warm-up) call."""
    starts: int = 5
    """Cold starts of the app, and of the import floor, each."""
    preset: str = "tiny"
    """Preset the app opens with and every request uses."""
    prompt: str = "a red circle and a blue star"
    """Prompt of the generating requests."""
    word: str | None = None
    """A concept label at `block`, to search and steer with; None: the preset's steering word."""
    block: str | None = None
    """Block of every request; None: the block the preset's steer tab opens on."""
    steps: int = 10
    """Denoising steps of the emergence request."""

    def __post_init__(self) -> None:
        defaults = get_preset(self.preset).app
        self.block = self.block or defaults.steer_block
        self.word = self.word or defaults.word


def wait_for(check: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get ready in time")
        time.sleep(0.05)


FLOOR = [sys.executable, "-c", "import torch, gradio"]
"""What every page of the app waits for: Python importing torch and gradio."""


def floor_seconds() -> float:
    start = time.monotonic()
    subprocess.run(FLOOR, check=True)
    return time.monotonic() - start


def cold_start(preset: str) -> tuple[str, subprocess.Popen, float, float]:
    """(url, process, seconds to the page, seconds to the loaded preset), from process
    start."""
    start = time.monotonic()
    url, process = start_app("--preset", preset)
    page = time.monotonic() - start
    with urllib.request.urlopen(url) as response:
        assert response.status == 200
    client = Client(url, verbose=False)
    wait_for(lambda: "(loaded)" in client.predict(preset, api_name="/status"))
    return url, process, page, time.monotonic() - start


def cold_starts(config: BenchAppConfig) -> tuple[str, subprocess.Popen]:
    """Print the medians of `config.starts` alternating cold starts of the floor and the
    app; the last app's (url, process) stays up for the requests."""
    floors, pages, loads = [], [], []
    for i in range(config.starts):
        floors.append(floor_seconds())
        url, process, page, loaded = cold_start(config.preset)
        pages.append(page)
        loads.append(loaded)
        if i < config.starts - 1:
            stop(process)
    floor, page = statistics.median(floors), statistics.median(pages)
    print(f"| cold start, median of {config.starts} (s) | |")
    print("| --- | --- |")
    print(f"| floor: `python -c 'import torch, gradio'` | {floor:.1f} |")
    print(f"| `python app.py` to the page served | {page:.1f} ({page / floor:.2f}x the floor) |")
    print(f"| `python app.py` to the preset loaded | {statistics.median(loads):.1f} |\n")
    return url, process


RUN_ID = object()
"""Stands for the run id that the emergence request (timed before it) returned."""


def requests(config: BenchAppConfig, cid: int) -> dict[str, tuple]:
    """(arguments, endpoint) per request, by what the table calls it."""
    preset, prompt, block, word = config.preset, config.prompt, config.block, config.word
    steer = (
        preset,
        prompt,
        0,
        block,
        "cond",
        "word",
        word,
        [],
        0,
        1.0,
        "spatial",
        "early",
        0.6,
        1.0,
        4000,
        "stage",
        "quadrant",
        "top_left",
        None,
    )
    key = (preset, block, 0.5, "cond", cid)
    steps = config.steps
    return {
        f"emergence ({steps} steps)": ((preset, prompt, 0, steps, block, "cond", ""), "/emergence"),
        "emergence: move the step slider": ((RUN_ID, 3), "/emergence_step"),
        "steer (before + after, the preset's steps twice)": (steer, "/steer"),
        "inspect: search by word": ((preset, block, 0.5, "cond", word), "/search_concepts"),
        "inspect: dictionary entry, statistics, neighbours": (key, "/inspect_concept"),
        "inspect: top examples (6 regenerated)": (key, "/top_examples"),
        "inspect: activation on a new generation": ((*key, prompt, 0), "/activation_map"),
        "inspect: feature icon": ((*key, 10.0, 0), "/feature_icon"),
    }


def timed(client: Client, args: tuple, api_name: str) -> tuple[float, object]:
    """Seconds the request took, and what it returned."""
    start = time.perf_counter()
    result = client.predict(*args, api_name=api_name)
    return time.perf_counter() - start, result


def bench_app(config: BenchAppConfig) -> None:
    """Print the cold start, then a Markdown table of each request's times, row by row."""
    url, process = cold_starts(config)
    client = Client(url, verbose=False)
    search = (config.preset, config.block, 0.5, "cond", config.word)
    _, cid, _ = client.predict(*search, api_name="/search_concepts")
    print(f"| request | first call (s) | median of next {config.repeats} (s) |")
    print("| --- | --- | --- |")
    run_id = None
    for name, (call_args, api_name) in requests(config, cid).items():
        call_args = tuple(run_id if arg is RUN_ID else arg for arg in call_args)
        first, result = timed(client, call_args, api_name)
        run_id = result[-1] if api_name == "/emergence" else run_id
        rest = [timed(client, call_args, api_name)[0] for _ in range(config.repeats)]
        print(f"| {name} | {first:.2f} | {statistics.median(rest):.2f} |")
    stop(process)


main = command(BenchAppConfig, bench_app, "python -m scripts.bench_app", __doc__)

if __name__ == "__main__":
    sys.exit(main())
