"""Many SAEs of one model, keyed by (block, t, branch), saved and loaded as one folder tree.

A bank's folder holds one SAE folder per key, `<block>/t<t:.2f>/<branch>/` (or
`<block>/<branch>/` for an SAE of every t), in either layout `core.sae.model` reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from core.sae.model import (
    EXPECTED_FILES,
    SAELoadError,
    TopKSAE,
    checkpoint_folders,
    load_folder,
    push_folder,
    read_config,
    resolve_source,
    sdlens_block,
)


class SAEKey(NamedTuple):
    block: str
    t: float | None
    """None for SAEs trained on all times (e.g. SDLens)."""
    branch: str

    def describe(self) -> str:
        """As messages name an SAE: `mid_block.attentions.0 (t=0.5, cond)`."""
        t = "any t" if self.t is None else f"t={self.t:g}"
        return f"{self.block or '?'} ({t}, {self.branch})"


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
        self._saes[key] = sae
        return key

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

        block, t and branch come from each SAE's config. An SAE whose config names no block
        (SDLens) gets it from its folder: `unet.<block>_k10_hidden5120_.../final` holds the
        SAE of `<block>`. Where a repo holds several such variants of a block, `variant`
        (e.g. `"k10_hidden5120"`) picks the folders whose name carries it.
        """
        blocks = list(blocks) if blocks is not None else None
        branches = list(branches) if branches is not None else None
        sdlens = f"_{variant}" if variant else "_"
        patterns = [p for b in blocks for p in (f"{b}/*", f"unet.{b}{sdlens}*")] if blocks else None
        root = resolve_source(path_or_repo_id, patterns, revision)
        bank = cls()
        for folder in checkpoint_folders(root):
            cfg = read_config(folder)
            relative = folder.relative_to(root).as_posix()
            if not cfg.block:
                if variant and f"_{variant}_" not in f"{relative.split('/')[0]}_":
                    continue
                cfg.block = folder.name if relative == "." else sdlens_block(relative)
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
            raise SAELoadError(
                f"no SAEs found under {root} for blocks={blocks}, branches={branches}: expected "
                f"folders with {EXPECTED_FILES}"
            )
        return bank


def bank_subfolder(key: SAEKey) -> str:
    """Where a bank keeps the SAE of `key`, relative to its root."""
    if key.t is None:
        return f"{key.block}/{key.branch}"
    return f"{key.block}/t{key.t:.2f}/{key.branch}"
