"""What several test files share: seeded generators, random SAEs, hook counts, tiny CLIP
models saved as a user's folders, synthetic feature caches, and a command's `--help` as a
person sees it."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    ViTImageProcessorPil,
)

from core.diffusion.layouts import denoiser_of
from core.diffusion.tokenizer import write_clip_tokenizer
from core.emergence.composition import LatentGrid
from core.files import REPO_ROOT
from core.revelio.feature_cache import FeatureMeta, save_features, save_meta
from core.sae.config import SAEConfig
from core.sae.model import TopKSAE

MID = "mid_block.attentions.0"
LAYERS = ["mid_block", "up_blocks.1"]
TIMESTEPS = [25, 200]


def write_cache(
    root: Path,
    *,
    num_classes: int = 3,
    per_class: int = 12,
    channels: int = 8,
    size: int = 8,
    maps: bool = True,
    noise: float = 0.3,
    seed: int = 0,
) -> FeatureMeta:
    """A cache whose features are a class prototype plus Gaussian noise.

    Maps put the prototype at every position (times a fixed random spatial pattern), so a
    classifier can read the class anywhere; pooled features are the maps' spatial means.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    meta = FeatureMeta(
        model="synthetic",
        layers=LAYERS,
        timesteps=TIMESTEPS,
        classes=[f"class{c}" for c in range(num_classes)],
        labels=labels,
        images=[f"img{i:03d}.png" for i in range(len(labels))],
    )
    save_meta(root, meta)
    label_tensor = torch.tensor(labels)
    for layer in LAYERS:
        for timestep in TIMESTEPS:
            prototypes = 2 * torch.randn(num_classes, channels, 1, 1, generator=generator)
            pattern = 1 + 0.2 * torch.rand(1, 1, size, size, generator=generator)
            shape = (len(labels), channels, size, size)
            x = prototypes[label_tensor] * pattern + noise * torch.randn(shape, generator=generator)
            save_features(root, layer, timestep, x.mean(dim=(2, 3)), "pooled")
            if maps:
                save_features(root, layer, timestep, x, "maps")
    return meta


def module_name(path: Path) -> str:
    """`core/training/train.py` -> `core.training.train`."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


COMMANDS = tuple(
    module_name(path)
    for path in sorted((REPO_ROOT / "core").rglob("*.py"))
    if 'if __name__ == "__main__":' in path.read_text()
)
"""Every command of the core: the modules that run as `python -m`."""
_RUN_HELPS = """
import contextlib, io, json, runpy, sys
found = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    text, code = io.StringIO(), None
    with contextlib.redirect_stdout(text):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code
    found[module] = [code, text.getvalue()]
print(json.dumps(found))
"""


@functools.cache
def _command_helps() -> dict[str, list]:
    """Each command's `--help`, run as `python -m` runs it (`runpy` as `__main__`), all in one
    fresh process: one interpreter start instead of one per command."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", _RUN_HELPS, *COMMANDS],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def command_help(module: str) -> str:
    """`python -m <module> --help` as a person sees it, from a process of its own."""
    code, text = _command_helps()[module]
    assert code == 0, text
    assert text.startswith(f"usage: python -m {module} ")
    return text


def option_helps(help_text: str) -> dict[str, str]:
    """Each option's help text (wrapped lines joined), keyed by its long option string."""
    entries: list[str] = []
    for line in help_text.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries and line.startswith("      "):
            entries[-1] += " " + line.strip()
    found = {}
    for entry in entries:
        names = [word.rstrip(",") for word in entry.split() if word.startswith("--")]
        found[names[0]] = entry
    return found


def config_defaults(config_type: type) -> dict[str, object]:
    """`--option`: default of every field of a config, nested configs' fields included."""
    found = {}
    for field in dataclasses.fields(config_type):
        if dataclasses.is_dataclass(field.type):
            found.update(config_defaults(field.type))
        elif field.default is not dataclasses.MISSING:
            found["--" + field.name.replace("_", "-")] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            found["--" + field.name.replace("_", "-")] = field.default_factory()
    return found


def assert_defaults_stated_once(help_text: str, config_type: type) -> None:
    """No option names a default twice, and every default is named except None and False,
    which the help leaves out (as it does 0, which equals False)."""
    helps = option_helps(help_text)
    for option, default in config_defaults(config_type).items():
        text = helps[option]
        assert text.count("default") <= 1, text
        if default not in (None, False):
            assert "default" in text, text


VOCABULARY = ("cat", "dog", "car", "tree", "person", "traffic light")


WORDS = sorted({"a", "photo", "of", *(w for name in VOCABULARY for w in name.split())})


def tiny_clip_configs(tokenizer: CLIPTokenizer) -> tuple[dict, dict]:
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        **ids,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return text, vision


def save_clip(folder: Path) -> Path:
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, WORDS))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor, tokenizer).save_pretrained(folder)
    text, vision = tiny_clip_configs(tokenizer)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


def save_clipseg(folder: Path) -> Path:
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, WORDS))
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    CLIPSegProcessor(image_processor, tokenizer).save_pretrained(folder)
    text, vision = tiny_clip_configs(tokenizer)
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=16,
        extract_layers=[0, 1],
        reduce_dim=8,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=16,
    )
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    return folder


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def recorded_steps(recording) -> list:
    """The distinct steps of a recording, in order."""
    return sorted({r.step for r in recording.records})


def hook_count(pipe) -> int:
    denoiser = denoiser_of(pipe)
    modules = [denoiser, *dict(denoiser.named_modules()).values()]
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)


def dense_latents(grid: LatentGrid, num_latents: int) -> torch.Tensor:
    """[B, H, W, num_latents] latents of a grid's TopK code, zero outside each position's top k."""
    shape = (*grid.top_acts.shape[:-1], num_latents)
    return grid.top_acts.new_zeros(shape).scatter_(-1, grid.top_indices, grid.top_acts)


def write_saeuron(folder: Path, d: int, expansion: int = 4, k: int = 4, seed: int = 0) -> dict:
    """An SAE saved as SAeUron publishes them, in sparsify's layout, with random weights:
    cfg.json with the fields of SAeUron's SaeConfig plus d_in (num_latents 0 means
    expansion_factor * d_in), and sae.safetensors with sparsify's tensor names."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    n = d * expansion
    tensors = {
        "encoder.weight": torch.randn(n, d, generator=generator),
        "encoder.bias": torch.rand(n, generator=generator) * 0.5,
        "W_dec": torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1),
        "b_dec": torch.randn(d, generator=generator) * 0.1,
    }
    save_file(tensors, folder / "sae.safetensors")
    cfg = {
        "expansion_factor": expansion,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": k,
        "batch_topk": True,
        "sample_topk": False,
        "input_unit_norm": False,
        "multi_topk": False,
        "d_in": d,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def random_sae(
    d: int, n: int, k: int, t: float | None = None, seed: int = 0, block: str = MID, **cfg
) -> TopKSAE:
    """A random SAE whose encoder biases keep k latents positive on every row."""
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d, n, k, block=block, t=t, **cfg))
    with torch.no_grad():
        sae.encoder.bias.uniform_(0.0, 0.5)  # every row keeps k positive latents
    return sae


SDLENS_RUN = "_k{k}_hidden{n}_auxk256_bs4096_lr0.0001"
"""How SDLens names the run folder of a block's SAE: unet.<block><run>/final/."""


def write_sdlens(
    folder: Path,
    d: int = 8,
    n: int = 32,
    k: int = 3,
    nested: bool = False,
    mean: torch.Tensor | None = None,
    constant: bool = False,
) -> dict[str, torch.Tensor]:
    """An SDLens checkpoint; `nested` wraps the weights in {"state_dict": ...} as SDLens saves,
    `mean` is saved as its mean.pt. `constant`: an encoder of zeros and decreasing latent
    biases, so that latents 0 to k - 1 fire at every position, whatever the input."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "encoder.weight": torch.randn(n, d),
        "decoder.weight": torch.randn(d, n),
        "pre_bias": torch.randn(d),
        "latent_bias": torch.randn(n) * 0.1,
        "stats_last_nonzero": torch.zeros(n, dtype=torch.long),
    }
    if constant:
        state["encoder.weight"] = torch.zeros(n, d)
        state["latent_bias"] = torch.linspace(1.0, 0.1, n)
    torch.save({"state_dict": state} if nested else state, folder / "state_dict.pth")
    config = {"n_dirs_local": n, "d_model": d, "k": k, "auxk": 16, "dead_steps_threshold": 100}
    (folder / "config.json").write_text(json.dumps(config))
    if mean is not None:
        torch.save(mean, folder / "mean.pt")
    return state


def write_sdlens_bank(root: Path, blocks: dict[str, int], n: int = 32, k: int = 4) -> Path:
    """SAEs in SDLens's repo layout (unet.<block>_k10_hidden5120_.../final/, one per block,
    for every step, named as the published runs whatever their size), `constant` ones of
    each block's width in `blocks`, with mean activations."""
    for block, width in blocks.items():
        run = root / f"unet.{block}{SDLENS_RUN.format(k=10, n=5120)}" / "final"
        write_sdlens(run, d=width, n=n, k=k, mean=torch.ones(n), constant=True)
    return root
