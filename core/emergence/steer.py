"""Steer generation by editing residual updates with SAE concept vectors (paper 1).

Let Z be the SAE code of a block's residual update Delta at each position (i, j), C the
concept's CIDs, f_c the concept vector of CID c (row c of W_dec) and S the target region.

- spatial: inside S every c in C is set to beta_ij = beta * ||Z_ij||, outside S to 0. On
  Delta this is Delta_ij += sum_c (beta_ij - Z_ijc) f_c inside S and
  Delta_ij -= sum_c Z_ijc f_c outside, i.e. exactly D(Z_edited) - D(Z).
- global: Delta_ij += beta * ||Z_ij|| / sum_ij ||Z_ij|| * sum_c f_c, everywhere (style).
- ablate: Delta_ij -= beta * sum_c Z_ijc f_c with beta in [0, 1]: scales the concept down
  where it fires (beta = 1 removes it).

An SAE that ships each latent's mean activation m_c (SDLens's mean.pt) measures beta in it,
as the SDLens demo does (it adds strength * m_c * f_c where painted): spatial sets Z_ijc to
beta * m_c inside S, global adds beta * m_c * f_c at every position.

Delta is edited directly with concept vectors, never replaced by the SAE's reconstruction,
so whatever the SAE does not explain passes through untouched. Edits apply only at steps
whose t lies in the stage window (bounds included) and only on the chosen branches, each
step using the SAE trained nearest to its t. ||Z_ij|| is the L2 norm of the position's
k-sparse code. The paper's strengths are the defaults. An SAE trained on the block's output
(SAeUron's) edits the output the same way; an SAE is never applied to another site.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.annotate.quadrants import QUADRANTS
from core.diffusion.hooks import BRANCHES, edit, resolve_blocks
from core.diffusion.presets import STAGES
from core.sae.bank import SAEBank, SAEKey
from core.sae.model import TopKSAE
from core.training.activations import to_rows

KINDS = ("spatial", "global", "ablate")
DEFAULT_STRENGTH = {
    "spatial": {"early": 4000.0, "middle": 400.0, "final": 1000.0},
    "global": {"early": 8.0, "middle": 10.0, "final": 10.0},
    "ablate": {"early": 1.0, "middle": 1.0, "final": 1.0},
}
MAX_STRENGTH = 1e5

CIDs = Sequence[int] | Mapping[SAEKey, Sequence[int]]
"""The concept's CIDs: the same for every SAE, or per SAE (a dictionary's CIDs differ by t)."""


@dataclass(frozen=True)
class Intervention:
    kind: str
    """"spatial", "global" or "ablate"."""
    cids: CIDs
    strength: float
    """beta; see the module docstring for what it scales."""
    window: tuple[float, float]
    """(t_min, t_max): steps with t in this range are edited (1 = noise)."""
    branches: tuple[str, ...] = ("cond",)
    region: np.ndarray | None = None
    """Spatial only: bool/float mask at image resolution (> 0.5 = inside)."""


def stage_window(stage: str | tuple[float, float]) -> tuple[float, float]:
    """A named stage ("early", "middle", "final") or an explicit (t_min, t_max)."""
    if isinstance(stage, str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose {', '.join(STAGES)} or a t range")
        return STAGES[stage]
    low, high = (float(v) for v in stage)
    if not 0 <= low <= high <= 1:
        raise ValueError(f"a t range needs 0 <= t_min <= t_max <= 1, got ({low}, {high})")
    return low, high


def default_strength(kind: str, stage: str | tuple[float, float]) -> float:
    """The paper's strength for a named stage; for a custom range, that of its midpoint."""
    if isinstance(stage, str):
        return DEFAULT_STRENGTH[kind][stage]
    middle = sum(stage_window(stage)) / 2
    name = next(n for n, (lo, hi) in STAGES.items() if lo <= middle <= hi)
    return DEFAULT_STRENGTH[kind][name]


def quadrant_mask(name: str, size: tuple[int, int]) -> np.ndarray:
    """A bool mask of one image quadrant, e.g. "top_left", at image size (H, W)."""
    if name not in QUADRANTS:
        raise ValueError(f"unknown quadrant {name!r}; choose one of {', '.join(QUADRANTS)}")
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    rows = slice(0, height // 2) if name.startswith("top") else slice(height // 2, height)
    cols = slice(0, width // 2) if name.endswith("left") else slice(width // 2, width)
    mask[rows, cols] = True
    return mask


def region_on_grid(region: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """Resize an image-resolution mask to a block's grid: area average, then > 0.5."""
    mask = torch.as_tensor(np.asarray(region, dtype=np.float32))[None, None]
    return F.interpolate(mask, size=grid, mode="area")[0, 0] > 0.5


def validate(intervention: Intervention, image_size: tuple[int, int]) -> None:
    """Refuse, with one sentence, anything that cannot be applied as asked."""
    iv = intervention
    if iv.kind not in KINDS:
        raise ValueError(f"unknown intervention {iv.kind!r}; choose one of {', '.join(KINDS)}")
    beta = iv.strength
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"the strength must be a finite number >= 0, got {beta}")
    if beta > MAX_STRENGTH or (iv.kind == "ablate" and beta > 1):
        limit = 1 if iv.kind == "ablate" else MAX_STRENGTH
        raise ValueError(f"the strength {beta} is too large for {iv.kind!r}; use at most {limit}")
    unknown = [b for b in iv.branches if b not in BRANCHES]
    if unknown or not iv.branches:
        raise ValueError(f"branches must be among {BRANCHES}, got {iv.branches}")
    stage_window(iv.window)
    if not _all_cids(iv.cids):
        raise ValueError("the concept has no CIDs at any t; pick another word or a CID")
    if iv.kind == "spatial":
        _validate_region(iv.region, image_size)


def _all_cids(cids: CIDs) -> list[int]:
    if isinstance(cids, Mapping):
        return [c for group in cids.values() for c in group]
    return list(cids)


def _validate_region(region: np.ndarray | None, image_size: tuple[int, int]) -> None:
    if region is None:
        raise ValueError("a spatial edit needs a region: a mask or a quadrant name")
    region = np.asarray(region)
    if region.shape != tuple(image_size):
        raise ValueError(
            f"the mask has shape {region.shape} but the image is {tuple(image_size)}; "
            "draw it at image resolution"
        )
    inside = region > 0.5
    if not inside.any():
        raise ValueError("the mask is empty; mark the region where the object should go")
    if inside.all():
        raise ValueError("the mask covers the whole image; use a global edit instead")


def concept_codes(sae: TopKSAE, rows: Tensor, cids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(Z restricted to cids [N, |C|], ||Z|| per row [N]) from the rows' k-sparse codes."""
    with torch.no_grad():
        acts, indices, _ = sae.encode(rows)
    cid_tensor = torch.as_tensor(list(cids), device=rows.device)
    matches = indices[:, :, None] == cid_tensor
    z_c = (acts[:, :, None] * matches).sum(dim=1)
    return z_c, acts.norm(dim=-1)


def delta_change(
    kind: str, sae: TopKSAE, delta: Tensor, cids: Sequence[int], beta: float, inside: Tensor | None
) -> Tensor:
    """The edit's change to `delta` [B, C, H, W] (same shape); `inside` is [H, W] bool."""
    batch, channels, height, width = delta.shape
    rows = to_rows(delta).to(sae.W_dec.dtype)
    z_c, norms = concept_codes(sae, rows, cids)
    vectors = sae.concept_vectors[list(cids)]
    means = None if sae.mean_acts is None else sae.mean_acts[list(cids)].to(rows.dtype)
    if kind == "spatial":
        inside_rows = inside.to(rows.device).flatten().repeat(batch)
        target = beta * (norms[:, None] if means is None else means)
        coeff = torch.where(inside_rows[:, None], target - z_c, -z_c)
    elif kind == "global" and means is not None:
        coeff = (beta * means).expand(len(rows), -1)
    elif kind == "global":
        per_image = norms.view(batch, -1)
        weight = beta * per_image / per_image.sum(dim=1, keepdim=True).clamp_min(1e-12)
        coeff = weight.reshape(-1, 1).expand(-1, len(vectors))
    else:
        coeff = -beta * z_c
    change = coeff @ vectors
    return change.view(batch, height, width, channels).permute(0, 3, 1, 2).to(delta.dtype)


@contextmanager
def intervene(
    pipe,
    bank: SAEBank,
    blocks: str | Sequence[str],
    intervention: Intervention,
    image_size: tuple[int, int],
    site: str | None = None,
) -> Iterator[None]:
    """Apply `intervention` to the residual updates of `blocks` while the `with` block runs.

    Everything is checked before generation starts, so a bad input edits nothing. A
    strength of 0 edits nothing for every kind (for "spatial" the formula would otherwise
    still remove the concept outside and inside the region). The activation edited is the
    one the bank's SAEs read; a `site` other than theirs is refused.
    """
    blocks = [blocks] if isinstance(blocks, str) else list(blocks)
    validate(intervention, image_size)
    for block in blocks:
        _check_bank(bank, pipe, block, intervention.branches, site)
    if intervention.strength == 0:
        yield
        return
    edits = {block: _edit_fn(bank, block, intervention) for block in blocks}
    with edit(pipe, edits, site=bank.sites(blocks)):
        yield


def _edit_fn(bank: SAEBank, block: str, intervention: Intervention):
    """The hooks' edit function for one block: (delta, t, branch) -> new delta or None."""
    low, high = stage_window(intervention.window)
    regions: dict[tuple[int, int], Tensor] = {}

    def apply(delta: Tensor, t: float, branch: str) -> Tensor | None:
        if branch not in intervention.branches or not low <= t <= high:
            return None
        sae = bank.get(block, t, branch)
        cids = _cids_for(intervention.cids, sae)
        if not cids:
            return None
        inside = None
        if intervention.kind == "spatial":
            grid = tuple(delta.shape[-2:])
            if grid not in regions:
                regions[grid] = region_on_grid(intervention.region, grid)
            inside = regions[grid]
        kind, beta = intervention.kind, intervention.strength
        return delta + delta_change(kind, sae, delta, cids, beta, inside)

    return apply


def _check_bank(bank: SAEBank, pipe, block: str, branches: Sequence[str], site: str | None) -> None:
    """The bank has SAEs for `block` on `branches`, all as wide as the block (and reading
    `site`, if given)."""
    channels = resolve_blocks(pipe.unet, [block])[block].config.in_channels
    saes = [sae for key, sae in bank.items() if key.block == block and key.branch in branches]
    if not saes:
        raise ValueError(f"there is no SAE for {block} on the {'/'.join(branches)} branch")
    for sae in saes:
        if sae.cfg.d_in != channels:
            raise ValueError(
                f"the SAE for {block} (t={sae.cfg.t}, {sae.cfg.branch}) reads width "
                f"{sae.cfg.d_in} but the block has {channels} channels; it was trained for "
                "another block"
            )
        if site is not None:
            sae.check_site(site)


def _cids_for(cids: CIDs, sae: TopKSAE) -> list[int]:
    """The concept's CIDs in the SAE in use at this step."""
    if not isinstance(cids, Mapping):
        return list(cids)
    return list(cids.get(SAEKey(sae.cfg.block, sae.cfg.t, sae.cfg.branch), ()))
