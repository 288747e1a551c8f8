"""Many SAEs of one model, keyed by (block, t, branch), saved and loaded as one folder tree.

A bank's folder holds one SAE folder per key, `<block>/t<t:.2f>/<branch>/` (or
`<block>/<branch>/` for an SAE of every t), in either layout `core.sae.checkpoints` reads. Banks
published by others load too: SAeUron's (sparsify's `unet.<block>/` folders, one SAE of
the block's output for every t, cond branch) and SDLens's (`unet.<block>_<run>/final/`).
All SAEs of one block in a bank read the same activation site.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from core.sae.checkpoints import (
    SDLENS_FILES,
    SDLENS_FINAL,
    checkpoint_folders,
    folder_block,
    push_folder,
    read_config,
    resolve_source,
    unknown_layout,
)
from core.sae.config import SITES, SAELoadError, describe_sae
from core.sae.model import TopKSAE, load_folder


class SAEKey(NamedTuple):
    block: str
    t: float | None
    """None for SAEs trained on all times (e.g. SDLens)."""
    branch: str

    def describe(self) -> str:
        """As messages name an SAE: `mid_block.attentions.0 (t=0.5, cond)`."""
        return describe_sae(*self)


class SAEBank:
    """SAEs for several (block, denoising time, branch) triples.

    `get` returns the SAE trained nearest to a requested time.
    """

    def __init__(self, saes: Iterable[TopKSAE] = ()) -> None:
        self._saes: dict[SAEKey, TopKSAE] = {}
        for sae in saes:
            self.add(sae)

    def add(self, sae: TopKSAE) -> SAEKey:
        if not sae.cfg.block:
            raise ValueError("set sae.cfg.block before adding the SAE to a bank")
        key = SAEKey(sae.cfg.block, sae.cfg.t, sae.cfg.branch)
        if key in self._saes:
            raise ValueError(f"the bank already has an SAE for {key}")
        if any(k.block == key.block for k in self._saes) and sae.cfg.site != self.site(key.block):
            raise ValueError(
                f"the bank's SAEs of {key.block} read the {SITES[self.site(key.block)]} but the "
                f"SAE for {key.describe()} reads the {SITES[sae.cfg.site]}; keep them in two banks"
            )
        self._saes[key] = sae
        return key

    def site(self, block: str) -> str:
        """The activation of `block` that the bank's SAEs of it read (a key of SITES)."""
        sae = next((s for k, s in self._saes.items() if k.block == block), None)
        if sae is None:
            raise KeyError(f"no SAE for block {block!r}; available: {self.keys()}")
        return sae.cfg.site

    def sites(self, blocks: Iterable[str]) -> dict[str, str]:
        """The site of each block, as `core.diffusion.hooks` takes them."""
        return {block: self.site(block) for block in blocks}

    def get(self, block: str, t: float, branch: str = "cond") -> TopKSAE:
        """The SAE for (block, branch) whose training time is nearest to t (see `nearest_key`)."""
        return self._saes[self.nearest_key(block, t, branch)]

    def nearest_key(self, block: str, t: float, branch: str = "cond") -> SAEKey:
        """The key of the SAE for (block, branch) whose training time is nearest to t.

        Ties (t halfway between two times, up to 1e-9) go to the larger, noisier time; an SAE
        trained on all times (t None) is used only when there is no time-specific one.
        """
        candidates = [key for key in self._saes if key.block == block and key.branch == branch]
        if not candidates:
            raise KeyError(
                f"no SAE for block {block!r}, branch {branch!r}; available: {self.keys()}"
            )

        def distance(key: SAEKey) -> tuple[bool, float, float]:
            if key.t is None:
                return (True, 0.0, 0.0)
            return (False, round(abs(key.t - t), 9), -key.t)

        return min(candidates, key=distance)

    def keys(self) -> list[SAEKey]:
        return list(self._saes)

    def items(self) -> list[tuple[SAEKey, TopKSAE]]:
        return list(self._saes.items())

    def __getitem__(self, key: SAEKey) -> TopKSAE:
        return self._saes[key]

    def __contains__(self, key: object) -> bool:
        return key in self._saes

    def __iter__(self) -> Iterator[SAEKey]:
        return iter(self._saes)

    def __len__(self) -> int:
        return len(self._saes)

    def save_pretrained(self, root: str | os.PathLike) -> None:
        """Write each SAE to root/{block}/t{t:.2f}/{branch}/ (root/{block}/{branch}/ if t=None)."""
        folders = {key: Path(root) / bank_subfolder(key) for key in self._saes}
        if len(set(folders.values())) < len(folders):
            raise ValueError("two SAEs' times round to the same t{t:.2f} folder; keep them apart")
        for key, folder in folders.items():
            self._saes[key].save_pretrained(folder)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload TopK SAEs",
    ) -> object:
        """Upload the bank (as save_pretrained writes it) to the root of `repo_id`."""
        return push_folder(self.save_pretrained, repo_id, None, private, token, commit_message)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        blocks: Iterable[str] | None = None,
        branches: Iterable[str] | None = None,
        *,
        variant: str | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
    ) -> SAEBank:
        """Load every SAE below a local root or Hub repo, optionally only some blocks/branches.

        block, t, branch and site come from each SAE's config. An SAE whose config names no
        block gets it from its folder (`folder_block`): SAeUron's `unet.<block>/` and SDLens's
        `unet.<block>_k10_hidden5120_.../final` hold the SAE of `<block>`. Where a repo holds
        several SDLens runs of a block, `variant` (e.g. `"k10_hidden5120"`) picks the folders
        whose name carries it. Of an SDLens run only final/ is loaded.
        """
        blocks = list(blocks) if blocks is not None else None
        branches = list(branches) if branches is not None else None
        patterns = hub_patterns(blocks, variant) if blocks else None
        root = resolve_source(path_or_repo_id, patterns, revision)
        bank = cls()
        for folder in checkpoint_folders(root):
            cfg = read_config(folder)
            relative = folder.relative_to(root).as_posix()
            if not cfg.block:
                if variant and f"_{variant}_" not in f"{relative.split('/')[0]}_":
                    continue
                cfg.block = folder_block(folder.name if relative == "." else relative)
            if (blocks and cfg.block not in blocks) or (branches and cfg.branch not in branches):
                continue
            key = SAEKey(cfg.block, cfg.t, cfg.branch)
            if key in bank:
                raise SAELoadError(
                    f"{root} holds more than one SAE for {key.block} (another at {relative}); "
                    "pass variant= (e.g. 'k10_hidden5120') to pick one"
                )
            bank.add(load_folder(folder, device, cfg))
        if not bank:
            raise SAELoadError(f"{unknown_layout(root)} (blocks={blocks}, branches={branches})")
        return bank


def hub_patterns(blocks: Iterable[str], variant: str | None = None) -> list[str]:
    """The files of a Hub repo that `SAEBank.from_pretrained` downloads for `blocks`: this
    project's `<block>/` folders, SAeUron's `unet.<block>/` and, of the SDLens runs
    `unet.<block>_<variant>...`, the files of final/ that are loaded."""
    run = f"_{variant}" if variant else "_"
    patterns = []
    for block in blocks:
        patterns += [f"{block}/*", f"unet.{block}/*"]
        patterns += [f"unet.{block}{run}*/{SDLENS_FINAL}/{name}" for name in SDLENS_FILES]
    return patterns


def bank_subfolder(key: SAEKey) -> str:
    """Where a bank keeps the SAE of `key`, relative to its root."""
    if key.t is None:
        return f"{key.block}/{key.branch}"
    return f"{key.block}/t{key.t:.2f}/{key.branch}"
