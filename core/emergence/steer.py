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
whose t lies in the stage window (bounds included) and only on the chosen branches.
||Z_ij|| is the L2 norm of the position's k-sparse code. The paper's strengths are the
defaults.

Which SAE edits a step (`sae_choice`): by default the stage's, as in the paper's experiments:
every step of the early stage uses the SAE trained at t = 1.0, of the middle stage t = 0.5,
of the final stage t = 0.0 (a bank without that t: the SAE nearest to it, and the record says
so). In a custom window each step takes the stage its own t falls in (`stage_at`), and,
unless a strength is given, that stage's strength. "nearest" gives each step the SAE
trained nearest to its own t. `intervene` yields an `EditRecord` of which steps were edited
with which SAE and CIDs, and which were skipped and why. An SAE trained on the block's output
(SAeUron's) edits the output the same way; an SAE is never applied to another site.
"""

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.annotate.quadrants import QUADRANTS
from core.diffusion.hooks import BRANCHES, edit, resolve_blocks, schedule_t, step_index
from core.diffusion.presets import STAGE_T, STAGES
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
STRENGTHS_FILE = "strengths.json"
"""Strengths calibrated for an SAE bank (`core.emergence.strengths`), saved beside its SAEs."""
SAE_CHOICES = ("stage", "nearest")
"""How an edited step picks its SAE: the one of its stage's t, or the one nearest its own t."""

CIDs = Sequence[int] | Mapping[SAEKey, Sequence[int]]
"""The concept's CIDs: the same for every SAE, or per SAE (a dictionary's CIDs differ by t)."""


@dataclass(frozen=True)
class Intervention:
    kind: str
    """"spatial", "global" or "ablate"."""
    cids: CIDs
    strength: float | Mapping[str, float] | None
    """beta; see the module docstring for what it scales. A mapping: each edited step's
    stage's (`stage_strengths`); None: the paper's for the kind in each step's stage."""
    window: str | tuple[float, float]
    """A named stage ("early", "middle", "final"), whose steps all edit as that stage, or a
    custom (t_min, t_max), whose steps each edit as the stage of their t (1 = noise)."""
    branches: tuple[str, ...] = ("cond",)
    region: np.ndarray | None = None
    """Spatial only: bool/float mask at image resolution (> 0.5 = inside)."""
    sae_choice: str = "stage"
    """"stage": every step uses the SAE at its stage's t (`step_stage`, `STAGE_T`); "nearest":
    each step uses the SAE trained nearest to its own t."""
    concept: str = "the concept"
    """How the record names the concept, e.g. "'cat'"."""


@dataclass(frozen=True)
class StepEdit:
    """What an intervention did at one step of one block and branch."""

    block: str
    index: int
    """The step's position in the schedule (0 = first, noisiest); -1 if t is not in it."""
    t: float
    branch: str
    sae: SAEKey
    """The SAE chosen for the step, whether or not it edited."""
    cids: tuple[int, ...]
    """That SAE's CIDs of the concept."""
    stage: str
    """The stage the step edits as (`step_stage`)."""
    strength: float
    skipped: str = ""
    """Why the step was left alone; empty when it was edited."""


@dataclass
class EditRecord:
    """Which steps an intervention edited, with which SAE and CIDs, and which it skipped and why.

    Every step whose t lies in the window, on every edited branch, is one entry. The notes
    are about the whole edit, e.g. a stage whose t the bank has no SAE at.
    """

    steps: list[StepEdit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def edited(self) -> list[StepEdit]:
        return [step for step in self.steps if not step.skipped]

    def skipped(self) -> list[StepEdit]:
        return [step for step in self.steps if step.skipped]

    def summary(self) -> str:
        """The record in one line, e.g. "edited steps 0–19 with mid_block.attentions.0 (t=1,
        cond), CIDs 12, 40; skipped none"."""
        if not self.steps:
            return "; ".join(["edited no step: no step's t lies in the window", *self.notes])
        several = len({step.strength for step in self.edited()}) > 1
        edited = [
            f"{step_ranges(indices)} with {sae.describe()}, CIDs {list_cids(cids)}"
            + (f" at strength {strength:g}" if several else "")
            for (sae, cids, strength), indices in indices_by(
                self.edited(), lambda s: (s.sae, s.cids, s.strength)
            )
        ]
        skipped = [
            f"skipped {step_ranges(indices)}: {why}"
            for why, indices in indices_by(self.skipped(), lambda s: s.skipped)
        ]
        edited_text = "edited " + "; ".join(edited) if edited else "edited no step"
        return "; ".join([edited_text, *(skipped or ["skipped none"]), *self.notes])


def indices_by(steps: Iterable, key: Callable) -> list[tuple[object, list[int]]]:
    """The steps' indices (anything with an `index`, such as a `StepEdit`) grouped by `key`,
    groups in order of first appearance."""
    groups: dict[object, list[int]] = {}
    for step in steps:
        groups.setdefault(key(step), []).append(step.index)
    return list(groups.items())


def step_ranges(indices: Iterable[int]) -> str:
    """ "step 4" or "steps 0–3, 6": runs of consecutive indices as ranges."""
    values = sorted(set(indices))
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    text = ", ".join(f"{run[0]}–{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"step{'s' if len(values) > 1 else ''} {text}"


def list_cids(cids: Sequence[int], shown: int = 8) -> str:
    """ "3, 7, 12" or, for many, the first few and the count."""
    text = ", ".join(map(str, cids[:shown]))
    return text if len(cids) <= shown else f"{text}, ... ({len(cids)} in all)"


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


def stage_at(t: float) -> str:
    """The stage a step at `t` belongs to. The paper's windows share their bounds (early
    [0.6, 1], middle [0.2, 0.6], final [0, 0.2]): a step exactly on one belongs to the stage
    that ends there, the earlier one (t = 0.6 is early, t = 0.2 middle)."""
    return next(name for name, (low, _) in STAGES.items() if t >= low)


def step_stage(window: str | tuple[float, float], t: float) -> str:
    """The stage whose SAE and default strength edit a step at `t`: a named stage's for every
    step in it, as in the paper's experiments; in a custom window, the stage of `t` itself."""
    return window if isinstance(window, str) else stage_at(t)


def stages_in(window: str | tuple[float, float]) -> list[str]:
    """The stages whose steps a window can edit, from the earliest."""
    if isinstance(window, str):
        return [window]
    low, high = stage_window(window)
    names = list(STAGES)
    return names[names.index(stage_at(high)) : names.index(stage_at(low)) + 1]


def load_strengths(folder: str | Path | None) -> dict[str, dict[str, float]] | None:
    """kind -> stage -> strength from `folder`'s strengths.json; None if it has none."""
    path = Path(folder) / STRENGTHS_FILE if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["strengths"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a strengths file ({error}); rebuild it with the toy build's "
            "strengths step or delete it to use the paper's strengths"
        ) from error


def stage_strengths(kind: str, strengths: Mapping[str, Mapping[str, float]] | None) -> dict:
    """Stage -> strength for `kind`: the bank's calibrated ones where it has them, else the
    paper's."""
    return dict((strengths or {}).get(kind) or DEFAULT_STRENGTH[kind])


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
    stage_window(iv.window)
    for beta in _strengths_used(iv):
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"the strength must be a finite number >= 0, got {beta}")
        if beta > MAX_STRENGTH or (iv.kind == "ablate" and beta > 1):
            limit = 1 if iv.kind == "ablate" else MAX_STRENGTH
            raise ValueError(
                f"the strength {beta} is too large for {iv.kind!r}; use at most {limit}"
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
    if iv.kind == "spatial":
        _validate_region(iv.region, image_size)


def strength_at(intervention: Intervention, stage: str) -> float:
    """The strength a step of `stage` edits with: the one given, else its stage's."""
    strength = intervention.strength
    if isinstance(strength, (int, float)):
        return float(strength)
    table = strength or DEFAULT_STRENGTH[intervention.kind]
    if stage not in table:
        raise ValueError(f"no strength is given for the {stage} stage")
    return float(table[stage])


def _strengths_used(iv: Intervention) -> list[float]:
    """The strengths the edit can use: the one given, or those of the stages it spans."""
    return [strength_at(iv, stage) for stage in stages_in(iv.window)]


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
    stage = step_stage(intervention.window, t)
    nearest = intervention.sae_choice == "nearest"
    key = bank.nearest_key(block, t if nearest else STAGE_T[stage], branch)
    cids = tuple(_cids_for(intervention.cids, key))
    strength = strength_at(intervention, stage)
    why = ""
    if not cids:
        why = f"{key.describe()} has no CIDs for {intervention.concept}"
    elif strength == 0:
        why = "the strength is 0"
    return StepEdit(block, index, t, branch, key, cids, stage, strength, why)


def _edit_fn(pipe, bank: SAEBank, block: str, intervention: Intervention, record: EditRecord):
    """The hooks' edit function for one block: (delta, t, branch) -> new delta or None."""
    low, high = stage_window(intervention.window)
    regions: dict[tuple[int, int], Tensor] = {}

    def apply(delta: Tensor, t: float, branch: str) -> Tensor | None:
        if branch not in intervention.branches or not low <= t <= high:
            return None
        index = step_index(schedule_t(pipe), t)
        step = plan_step(bank, block, intervention, t, branch, index)
        inside = None
        if intervention.kind == "spatial" and not step.skipped:
            grid = tuple(delta.shape[-2:])
            if grid not in regions:
                regions[grid] = region_on_grid(intervention.region, grid)
            inside = regions[grid]
            if not inside.any():
                step = replace(step, skipped=_region_missed(intervention.region, grid))
        record.steps.append(step)
        if step.skipped:
            return None
        change = delta_change(
            intervention.kind, bank[step.sae], delta, step.cids, step.strength, inside
        )
        return delta + change

    return apply


def _region_missed(region: np.ndarray, grid: tuple[int, int]) -> str:
    """Why a region too small for the block's grid edits nothing, and what to draw instead."""
    cell = f"{region.shape[0] // grid[0]}x{region.shape[1] // grid[1]}"
    return (
        f"the region covers no position of the block's {grid[0]}x{grid[1]} grid (each "
        f"{cell} pixels of the image): cover at least half of one"
    )


def _missing_stage_t(bank: SAEBank, blocks: Sequence[str], intervention: Intervention) -> list[str]:
    """For "stage" choice: a note per block, branch and stage of the window whose bank has no
    SAE at the stage's t."""
    if intervention.sae_choice != "stage":
        return []
    notes = []
    for stage in stages_in(intervention.window):
        target = STAGE_T[stage]
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
    """The bank has SAEs for `block` on each of `branches`, all as wide as the block (and reading
    `site`, if given)."""
    channels = resolve_blocks(pipe.unet, [block])[block].config.in_channels
    for branch in branches:
        if not any(key.block == block and key.branch == branch for key in bank):
            raise ValueError(f"there is no SAE for {block} on the {branch} branch")
    for key, sae in bank.items():
        if key.block == block and key.branch in branches and sae.cfg.d_in != channels:
            raise ValueError(
                f"the SAE for {block} (t={sae.cfg.t}, {sae.cfg.branch}) reads width "
                f"{sae.cfg.d_in} but the block has {channels} channels; it was trained for "
                "another block"
            )
        if site is not None:
            sae.check_site(site)


def _cids_for(cids: CIDs, key: SAEKey) -> list[int]:
    """The concept's CIDs in the SAE of `key`."""
    if not isinstance(cids, Mapping):
        return list(cids)
    return list(cids.get(key, ()))
