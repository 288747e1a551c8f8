"""Watch concepts emerge inside a text-to-image diffusion model, and steer with them.

    python app.py                       # the offline default preset, on 127.0.0.1:7860
    python app.py --preset sd14 --saes sd14=user/sd14-saes

The entry point only: the page is the `page` package (one module per tab, its handlers beside
its layout), every computation is in `core.views` (one module per tab), what a preset's page
opens with is in its preset (`core.diffusion.presets.AppDefaults`).
"""

import argparse
import os
import sys
import threading
from collections.abc import Mapping

import torch

from core.diffusion.presets import PRESETS, default_preset_name
from core.runtime import USER_ERRORS
from core.views.model_cache import ModelCache
from page.assembly import build_demo
from page.serving import sentence
from page.texts import CSS

TRUE = ("1", "true", "yes", "on")
"""How environment flags say yes (as huggingface_hub reads them)."""
PRESET_ENV = "APP_PRESET"
SPACE_ENV = "SPACE_ID"
"""Set by Hugging Face Spaces in a Space's environment."""
ZERO_GPU_ENV = "SPACES_ZERO_GPU"
"""Set to "true" by Hugging Face Spaces on ZeroGPU hardware (its main process sees no CUDA)."""
GPU_PRESET = "sdxl-turbo"
"""The preset the page opens on where a GPU is present: a real model with published SAEs."""


def opening_preset(environ: Mapping[str, str], cuda: bool) -> str:
    """The preset the page opens on unless --preset or APP_PRESET name one: `GPU_PRESET`
    where CUDA is available or in a ZeroGPU Space, unless the Hub is offline; else the
    shipped offline model."""
    zero_gpu = bool(environ.get(SPACE_ENV)) and environ.get(ZERO_GPU_ENV, "").lower() in TRUE
    offline = environ.get("HF_HUB_OFFLINE", "").lower() in TRUE
    return GPU_PRESET if (cuda or zero_gpu) and not offline else default_preset_name()


def sae_source(text: str) -> tuple[str, str]:
    """`PRESET=REPO` as (preset, repo); anything else refused with what is expected."""
    preset, equals, source = text.partition("=")
    if not equals or preset not in PRESETS or not source:
        raise argparse.ArgumentTypeError(
            f"expected PRESET=REPO with a preset among {', '.join(PRESETS)}, got {text!r}"
        )
    return preset, source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python app.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        default=os.environ.get(PRESET_ENV) or opening_preset(os.environ, torch.cuda.is_available()),
        choices=list(PRESETS),
        help=f"preset selected when the page opens (env {PRESET_ENV}; default: {GPU_PRESET} "
        "where a GPU is present (CUDA or ZeroGPU) and the Hub reachable, else the offline one)",
    )
    p.add_argument(
        "--saes",
        action="append",
        default=[],
        type=sae_source,
        metavar="PRESET=REPO",
        help="SAE repo or folder for a preset whose SAEs a user trains (sd14, pixart, sd3, "
        "flux; or env <PRESET>_SAES, e.g. SD14_SAES); repeat for several",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, help="port (default 7860, or GRADIO_SERVER_PORT)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (on a busy small machine, 2 threads spinning against "
        "other processes can make a generation 100 times slower than 1)",
    )
    p.add_argument("--no-preload", action="store_true", help="load the preset on first use only")
    p.add_argument(
        "--mcp-server",
        action=argparse.BooleanOptionalAction,
        default=bool(os.environ.get(SPACE_ENV)),
        help="also serve the model events as tools to MCP clients at /gradio_api/mcp/ "
        f"(default: on in a Hugging Face Space, where {SPACE_ENV} is set; off elsewhere)",
    )
    return p.parse_args(argv)


def preload(cache: ModelCache, preset: str) -> None:
    """Load the first preset in the background once the page is served (the model libraries
    are imported here, not before), so that neither the page nor the first request waits."""
    try:
        with cache.using(preset) as loaded:
            loaded.warm_up()
    except USER_ERRORS as error:
        print(f"could not preload {preset}: {sentence(error)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = ModelCache(dict(args.saes), device=args.device)
    demo = build_demo(cache, args.preset)
    demo.queue(max_size=64).launch(
        server_name=args.host,
        server_port=args.port,
        mcp_server=args.mcp_server,
        css=CSS,
        prevent_thread_lock=True,  # serve the page first, then load the preset
    )
    if not args.no_preload:
        threading.Thread(target=preload, args=(cache, args.preset), daemon=True).start()
    demo.block_thread()


if __name__ == "__main__":
    main()
