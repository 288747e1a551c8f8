"""Apply an intervention while a pipeline generates (paper 1's steering).

Delta is edited directly with concept vectors, `Delta_ij += sum_c a_ijc f_c` with the
coefficients of the intervention's kind (`core.steer.kinds`), never replaced by the SAE's
reconstruction, so whatever the SAE does not explain passes through untouched. Edits apply
only at steps whose t lies in the window (bounds included) and only on the chosen branches;
each step edits with its stage's SAE and strength (`core.steer.windows`); a bank without
an SAE at a stage's t edits with the nearest one, and the record says so. `intervene`
yields an `EditRecord` of which steps were edited with which SAE and CIDs, and which were
skipped and why. An SAE trained on the block's output (SAeUron's) edits the output the same
way; an SAE is never applied to another site.
"""

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from core.diffusion.hooks import BRANCHES, edit, schedule_t, step_index
from core.diffusion.layouts import check_sae_fits, denoiser_of
from core.diffusion.presets import PAPER_STAGES, Stages
from core.sae.bank import SAEBank, SAEKey
from core.sae.model import TopKSAE
from core.steer.kinds import Codes, get_kind
from core.steer.record import EditRecord, StepEdit
from core.steer.regions import check_region, region_missed, region_on_grid
from core.steer.windows import SAE_CHOICES, Window, sae_t, stage_window, stages_in, step_stage
from core.training.activations import to_rows

CIDs = Sequence[int] | Mapping[SAEKey, Sequence[int]]
"""The concept's CIDs: the same for every SAE, or per SAE (a dictionary's CIDs differ by t)."""


@dataclass(frozen=True)
class Intervention:
    kind: str
    """A name in the kinds table (`core.steer.kinds.KINDS`), e.g. "spatial"."""
    cids: CIDs
    strength: float | Mapping[str, float] | None
    """beta; see the kind's formula for what it scales. A mapping: each edited step's
    stage's (`core.steer.strength.stage_strengths`); None: the paper's for the kind in each
    step's stage."""
    window: Window
    """A named stage ("early", "middle", "final"), whose steps all edit as that stage, or a
    custom (t_min, t_max), whose steps each edit as the stage of their t (1 = noise)."""
    branches: tuple[str, ...] = ("cond",)
    region: np.ndarray | None = None
    """For kinds that need one: bool/float mask at image resolution (> 0.5 = inside)."""
    sae_choice: str = "stage"
    """"stage": every step uses the SAE at its stage's t (`stages.sae_t`); "nearest": each
    step uses the SAE trained nearest to its own t."""
    concept: str = "the concept"
    """How the record names the concept, e.g. "'cat'"."""
    stages: Stages = PAPER_STAGES
    """The t windows the stage names mean and the t of each stage's SAE (the preset's)."""


def validate(intervention: Intervention, image_size: tuple[int, int]) -> None:
    """Refuse, with one sentence, anything that cannot be applied as asked."""
    iv = intervention
    kind = get_kind(iv.kind)
    stage_window(iv.window, iv.stages)
    for beta in [strength_at(iv, stage) for stage in stages_in(iv.window, iv.stages)]:
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"the strength must be a finite number >= 0, got {beta}")
        if beta > kind.max_strength:
            raise ValueError(
                f"the strength {beta} is too large for {iv.kind!r}; use at most "
                f"{kind.max_strength:g}"
            )
    if iv.sae_choice not in SAE_CHOICES:
        raise ValueError(
            f"unknown sae_choice {iv.sae_choice!r}; choose one of {', '.join(SAE_CHOICES)}"
        )
    unknown = [b for b in iv.branches if b not in BRANCHES]
    if unknown or not iv.branches:
        raise ValueError(f"branches must be among {BRANCHES}, got {iv.branches}")
    if not _all_cids(iv.cids):
        raise ValueError("the concept has no CIDs at any t; pick another word or a CID")
    if kind.needs_region:
        check_region(iv.region, image_size, iv.kind)


def strength_at(intervention: Intervention, stage: str) -> float:
    """The strength a step of `stage` edits with: the one given, else its stage's."""
    strength = intervention.strength
    if isinstance(strength, (int, float)):
        return float(strength)
    table = strength or get_kind(intervention.kind).default_strength
    if stage not in table:
        raise ValueError(f"no strength is given for the {stage} stage")
    return float(table[stage])


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
    means = None if sae.mean_acts is None else sae.mean_acts[list(cids)].to(rows.dtype)
    inside_rows = None if inside is None else inside.to(rows.device).flatten().repeat(batch)
    coeff = get_kind(kind).coefficients(Codes(z_c, norms, means, batch), beta, inside_rows)
    change = coeff @ sae.concept_vectors[list(cids)]
    return change.view(batch, height, width, channels).permute(0, 3, 1, 2).to(delta.dtype)


@contextmanager
def intervene(
    pipe,
    bank: SAEBank,
    blocks: str | Sequence[str],
    intervention: Intervention,
    image_size: tuple[int, int],
    site: str | None = None,
) -> Iterator[EditRecord]:
    """Apply `intervention` to the residual updates of `blocks` while the `with` block runs;
    the record it yields fills in as the steps run (one generation per `with` block).

    Everything is checked before generation starts, so a bad input edits nothing. A
    strength of 0 edits nothing for every kind (for "spatial" the formula would otherwise
    still remove the concept outside and inside the region). The activation edited is the
    one the bank's SAEs read; a `site` other than theirs is refused.
    """
    blocks = [blocks] if isinstance(blocks, str) else list(blocks)
    validate(intervention, image_size)
    for block in blocks:
        _check_bank(bank, pipe, block, intervention.branches, site)
    record = EditRecord(notes=_missing_stage_t(bank, blocks, intervention))
    edits = {block: _edit_fn(pipe, bank, block, intervention, record) for block in blocks}
    with edit(pipe, edits, site=bank.sites(blocks)):
        yield record


def plan_step(
    bank: SAEBank, block: str, intervention: Intervention, t: float, branch: str, index: int = -1
) -> StepEdit:
    """How one step in the window is edited: its stage, its SAE (the stage's or the one nearest
    t, as `sae_choice` says), that SAE's CIDs of the concept and the strength, or why the step
    is skipped."""
    iv = intervention
    stage = step_stage(iv.window, t, iv.stages)
    key = bank.nearest_key(block, sae_t(iv.sae_choice, stage, t, iv.stages), branch)
    cids = tuple(_cids_for(iv.cids, key))
    strength = strength_at(iv, stage)
    why = ""
    if not cids:
        why = f"{key.describe()} has no CIDs for {iv.concept}"
    elif strength == 0:
        why = "the strength is 0"
    return StepEdit(block, index, t, branch, key, cids, stage, strength, why)


def _edit_fn(pipe, bank: SAEBank, block: str, intervention: Intervention, record: EditRecord):
    """The hooks' edit function for one block: (delta, t, branch) -> new delta or None."""
    low, high = stage_window(intervention.window, intervention.stages)
    needs_region = get_kind(intervention.kind).needs_region
    regions: dict[tuple[int, int], Tensor] = {}

    def apply(delta: Tensor, t: float, branch: str) -> Tensor | None:
        if branch not in intervention.branches or not low <= t <= high:
            return None
        index = step_index(schedule_t(pipe), t)
        step = plan_step(bank, block, intervention, t, branch, index)
        inside = None
        if needs_region and not step.skipped:
            grid = tuple(delta.shape[-2:])
            if grid not in regions:
                regions[grid] = region_on_grid(intervention.region, grid)
            inside = regions[grid]
            if not inside.any():
                step = replace(step, skipped=region_missed(intervention.region, grid))
        record.steps.append(step)
        if step.skipped:
            return None
        change = delta_change(
            intervention.kind, bank[step.sae], delta, step.cids, step.strength, inside
        )
        return delta + change

    return apply


def _missing_stage_t(bank: SAEBank, blocks: Sequence[str], intervention: Intervention) -> list[str]:
    """For "stage" choice: a note per block, branch and stage of the window whose bank has no
    SAE at the stage's t."""
    if intervention.sae_choice != "stage":
        return []
    notes = []
    for stage in stages_in(intervention.window, intervention.stages):
        target = intervention.stages.sae_t[stage]
        for block in blocks:
            for branch in intervention.branches:
                key = bank.nearest_key(block, target, branch)
                if key.t is not None and not math.isclose(key.t, target, abs_tol=1e-9):
                    notes.append(
                        f"no SAE of {block} ({branch}) is at the {stage} stage's t={target:g}; "
                        f"the nearest, t={key.t:g}, edits it"
                    )
    return notes


def _check_bank(bank: SAEBank, pipe, block: str, branches: Sequence[str], site: str | None) -> None:
    """The bank has SAEs for `block` on each of `branches`, all fitting the block (its kind of
    denoiser, stream and width; reading `site`, if given)."""
    denoiser = denoiser_of(pipe)
    for branch in branches:
        if not any(key.block == block and key.branch == branch for key in bank):
            raise ValueError(f"there is no SAE for {block} on the {branch} branch")
    for key, sae in bank.items():
        if key.block == block and key.branch in branches:
            check_sae_fits(sae.cfg, denoiser, block)
            if site is not None:
                sae.check_site(site)


def _all_cids(cids: CIDs) -> list[int]:
    if isinstance(cids, Mapping):
        return [c for group in cids.values() for c in group]
    return list(cids)


def _cids_for(cids: CIDs, key: SAEKey) -> list[int]:
    """The concept's CIDs in the SAE of `key`."""
    if not isinstance(cids, Mapping):
        return list(cids)
    return list(cids.get(key, ()))
