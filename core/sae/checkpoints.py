"""Reading and publishing SAE checkpoints, in every layout the project loads.

Checkpoints use EleutherAI sparsify's layout (cfg.json + sae.safetensors). A cfg.json that
sparsify itself wrote (no `block` key) is read as SAeUron publishes its SAEs: site `output`,
every t, branch `cond`, the block named by the folder (`unet.<block>`). SDLens checkpoints
(config.json + state_dict.pth, in a run folder's `final/`) load as well, with their per-latent
mean activations (mean.pt), which set the unit of steering strengths. SDLens's files are torch
pickles: they are read with `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import torch
from torch import Tensor

from core import files
from core.files import local_or_snapshot
from core.runtime import CorruptFileError
from core.sae.config import CFG_FILE, STATS_FILE, WEIGHTS_FILE, SAEConfig, SAELoadError

SDLENS_CFG_FILE, SDLENS_WEIGHTS_FILE, SDLENS_MEAN_FILE = "config.json", "state_dict.pth", "mean.pt"
SDLENS_FILES = (SDLENS_CFG_FILE, SDLENS_WEIGHTS_FILE, SDLENS_MEAN_FILE)
"""What is loaded of an SDLens checkpoint (its std.pt is not)."""
SDLENS_FINAL = "final"
"""The subfolder of an SDLens run that holds the finished SAE, beside numbered step folders."""
EXPECTED_FILES = (
    f"{CFG_FILE} + {WEIGHTS_FILE} (sparsify, SAeUron, this project) or {SDLENS_CFG_FILE} + "
    f"{SDLENS_WEIGHTS_FILE} (SDLens, also in a run's {SDLENS_FINAL}/)"
)
TRAIN_HINT = "train one with `python -m core.training.train` or pass a local folder"

logger = logging.getLogger(__name__)


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of an SAE file; a damaged file is an SAELoadError that says what to do."""
    try:
        return files.read_safetensors(path, device)
    except CorruptFileError as e:
        raise _corrupt(path, e.__cause__) from e


def _corrupt(path: Path, error: Exception) -> SAELoadError:
    return SAELoadError(
        f"the checkpoint at {path} is corrupt or truncated ({error}); re-download it or retrain"
    )


def push_folder(
    save: Callable[[str], object],
    repo_id: str,
    subfolder: str | None,
    private: bool,
    token: str | None,
    commit_message: str,
) -> object:
    """save(tmp_folder), then upload that folder to `repo_id` (created if needed)."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, path_in_repo=subfolder, commit_message=commit_message
        )


def resolve_source(
    path_or_repo_id: str | os.PathLike,
    allow_patterns: list[str] | None,
    revision: str | None,
    subfolder: str | None = None,
) -> Path:
    what = f"{path_or_repo_id}/{subfolder}" if subfolder else str(path_or_repo_id)
    try:
        return local_or_snapshot(path_or_repo_id, allow_patterns, revision, what)
    except FileNotFoundError as e:
        raise SAELoadError(f"{e}; {TRAIN_HINT}") from e


def _checkpoint_format(folder: Path) -> str | None:
    if (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return "native"
    if (folder / SDLENS_CFG_FILE).is_file() and (folder / SDLENS_WEIGHTS_FILE).is_file():
        return "sdlens"
    return None


def _intermediate(folder: Path) -> bool:
    """An SDLens checkpoint of a training step: a numbered folder beside its run's final/."""
    return folder.name.isdigit() and _checkpoint_format(folder) == "sdlens"


def checkpoint_folders(root: Path) -> list[Path]:
    """Every SAE checkpoint at or below `root`; of an SDLens run, only its final one."""
    candidates = {p.parent for name in (CFG_FILE, SDLENS_CFG_FILE) for p in root.rglob(name)}
    found = sorted(folder for folder in candidates if _checkpoint_format(folder))
    steps = [folder for folder in found if folder != root and _intermediate(folder)]
    for run in sorted({step.parent for step in steps}):
        _final_of(run, [step for step in steps if step.parent == run])
    return [folder for folder in found if folder not in steps]


def resolve_checkpoint(folder: Path) -> Path:
    """`folder` if it holds an SAE, else the final checkpoint of the SDLens run it is."""
    if _checkpoint_format(folder):
        return folder
    steps = sorted(p for p in folder.iterdir() if _intermediate(p)) if folder.is_dir() else []
    if not steps and not _checkpoint_format(folder / SDLENS_FINAL):
        raise SAELoadError(unknown_layout(folder))
    return _final_of(folder, steps)


def _final_of(run: Path, steps: list[Path]) -> Path:
    """The final/ checkpoint of an SDLens run; says which intermediate ones are passed over."""
    final = run / SDLENS_FINAL
    names = ", ".join(step.name for step in steps)
    if not _checkpoint_format(final):
        raise SAELoadError(
            f"the SDLens run {run} holds checkpoints of intermediate steps only ({names}) and "
            f"no {SDLENS_FINAL}/; pass the folder of the step to load"
        )
    passed_over = f", not those of steps {names}" if steps else ""
    logger.info("Loading the final checkpoint of the SDLens run %s%s.", run, passed_over)
    return final


def unknown_layout(folder: Path) -> str:
    """One sentence: no SAE at `folder`, what was expected and what is there instead."""
    return f"no SAE found at {folder}: expected {EXPECTED_FILES}, found {_contents(folder)}"


def _contents(folder: Path, shown: int = 6) -> str:
    if not folder.is_dir():
        return "no such folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _require_format(folder: Path) -> str:
    fmt = _checkpoint_format(folder)
    if fmt is None:
        raise SAELoadError(unknown_layout(folder))
    return fmt


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from e


SPARSIFY_OPTIONS = ("transcode", "skip_connection", "embed_skip", "gram_lookup", "input_unit_norm")
"""Options of sparsify's (and SAeUron's) cfg.json that make the SAE compute something other
than a plain TopK SAE; an SAE with any of them set is refused."""


def read_config(folder: Path) -> SAEConfig:
    """The config of the checkpoint in `folder`, in any layout this module reads.

    A cfg.json without a `block` key was written by sparsify: SAeUron publishes its SAEs that
    way, trained on the block's output, so its site is `output` unless the file says otherwise.
    SAeUron's `batch_topk` and `sample_topk` only shape training; it encodes with a per-position
    TopK, as this SAE does.
    """
    if _require_format(folder) == "sdlens":
        return _read_sdlens_config(folder)
    raw = _read_json(folder / CFG_FILE)
    options = [name for name in SPARSIFY_OPTIONS if raw.get(name)]
    if raw.get("activation", "topk") != "topk":
        options.append(f"activation={raw['activation']}")
    if options:
        raise SAELoadError(
            f"the SAE at {folder} uses {', '.join(options)}, which this project's TopK SAE does "
            "not implement"
        )
    if "block" not in raw:
        raw = {"site": "output", **raw}
    return SAEConfig.from_dict(raw)


def _read_sdlens_config(folder: Path) -> SAEConfig:
    raw = _read_json(folder / SDLENS_CFG_FILE)
    try:
        return SAEConfig(d_in=raw["d_model"], num_latents=raw["n_dirs_local"], k=raw["k"])
    except KeyError as e:
        raise SAELoadError(f"{folder / SDLENS_CFG_FILE} is not an SDLens config: no {e}") from e


def folder_block(relative: str) -> str:
    """The block an SAE folder is named after, for configs that do not name it: sparsify's
    hookpoint folder (SAeUron) `unet.up_blocks.1.attentions.1` and SDLens's run folder
    `unet.mid_block.attentions.0_k10_hidden5120_.../final` name `up_blocks.1.attentions.1` and
    `mid_block.attentions.0`."""
    name = relative.split("/")[0]
    name = name.removeprefix("unet.")
    return re.sub(r"_k\d+_.*$", "", name)


def _read_sdlens_tensors(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        state = state.get("state_dict", state)  # SDLens saves {"state_dict": ...}
        return {
            "encoder.weight": state["encoder.weight"],
            "encoder.bias": state["latent_bias"],
            "W_dec": state["decoder.weight"].T.contiguous(),
            "b_dec": state["pre_bias"],
        }
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, KeyError) as e:
        raise _corrupt(path, e) from e


def _read_mean_acts(path: Path, num_latents: int) -> Tensor:
    """SDLens's mean.pt: one mean activation per latent, saved from a GPU, read on the CPU."""
    try:
        mean = torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        raise _corrupt(path, e) from e
    if not torch.is_tensor(mean) or mean.numel() != num_latents:
        found = f"shape {tuple(mean.shape)}" if torch.is_tensor(mean) else type(mean).__name__
        raise SAELoadError(
            f"{path} should hold one mean activation per latent ({num_latents} values) but "
            f"holds {found}; it belongs to another SAE"
        )
    return mean.reshape(num_latents).float()


def _check_tensors(tensors: dict[str, Tensor], cfg: SAEConfig, folder: Path) -> None:
    n, d = cfg.num_latents, cfg.d_in
    expected = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if tensors.keys() != expected.keys():
        raise SAELoadError(
            f"the weights at {folder} are not a TopK SAE: they hold {sorted(tensors)}, "
            f"expected {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAELoadError(
                f"{name} at {folder} has shape {tuple(tensors[name].shape)} but the config "
                f"(d_in={d}, num_latents={n}) implies {shape}; the config and weights do not match"
            )


def read_weights(folder: Path, cfg: SAEConfig) -> tuple[dict[str, Tensor], Tensor | None]:
    """The checked weights of the checkpoint in `folder` (state-dict names of `TopKSAE`) and,
    for an SDLens checkpoint that ships them, its latents' mean activations."""
    if _require_format(folder) == "native":
        tensors = read_safetensors(folder / WEIGHTS_FILE)
    else:
        tensors = _read_sdlens_tensors(folder / SDLENS_WEIGHTS_FILE)
    _check_tensors(tensors, cfg, folder)
    mean_path = folder / SDLENS_MEAN_FILE
    return tensors, _read_mean_acts(mean_path, cfg.num_latents) if mean_path.is_file() else None


def stats_path(folder: Path) -> Path | None:
    """The latent statistics file of the checkpoint in `folder`, if it has one."""
    path = folder / STATS_FILE
    return path if path.is_file() else None
