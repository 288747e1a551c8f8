"""The intervention kinds, one table: what each edits, how its strength is measured, its
default strength per stage, its limit, whether it needs a region, and its formula.

Let Z be the SAE code of a block's residual update Delta at each position (i, j), C the
concept's CIDs, f_c the concept vector of CID c (row c of W_dec), S the target region and
||Z_ij|| the L2 norm of the position's k-sparse code. A kind gives, per position and CID, the
coefficient a_ijc of the change Delta_ij += sum_c a_ijc f_c. The paper's kinds:

- spatial: inside S every c in C is set to beta * ||Z_ij||, outside S to 0:
  a = beta * ||Z_ij|| - Z_ijc inside, -Z_ijc outside, i.e. exactly D(Z_edited) - D(Z).
- global: a = beta * ||Z_ij|| / sum_ij ||Z_ij||, everywhere (style).
- ablate: a = -beta * Z_ijc with beta in [0, 1]: the concept scaled down where it fires.

An SAE that ships each latent's mean activation m_c (SDLens's mean.pt) measures beta in it,
as the SDLens demo does: spatial sets Z_ijc to beta * m_c inside S, global adds
beta * m_c * f_c at every position.

A new kind is one `Kind` passed to `register`: the core applies it and the steer tab offers
it, with nothing else changed.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from core.diffusion.presets import STAGES

MAX_STRENGTH = 1e5


class Codes(NamedTuple):
    """What a kind's coefficients are computed from, for the N rows of one edited step."""

    z: Tensor
    """[N, |C|]: the rows' codes of the concept's CIDs (0 where a CID is not among the top k)."""
    norms: Tensor
    """[N]: the L2 norm of each row's k-sparse code."""
    means: Tensor | None
    """[|C|]: each CID's mean activation where the SAE ships one (SDLens), else None."""
    batch: int
    """Images in the step; rows are image-major (N = batch x positions)."""


@dataclass(frozen=True)
class Kind:
    name: str
    edits: str
    """What it does, in a few words, e.g. "moves the concept into a region"."""
    formula: str
    """The coefficient a_ijc it adds sum_c a_ijc f_c with, in the module docstring's terms."""
    coefficients: Callable[[Codes, float, Tensor | None], Tensor]
    """(codes, beta, inside [N] bool or None) -> a [N, |C|]."""
    default_strength: Mapping[str, float]
    """The paper's beta per stage ("early", "middle", "final")."""
    max_strength: float = MAX_STRENGTH
    needs_region: bool = False
    """Whether it edits towards a region S (`inside` is then given)."""
    takes_preset_strength: bool = True
    """Whether a preset's proposed strength (`AppDefaults.strength`) applies to it."""
    mean_unit: str = ""
    """What beta multiplies where the SAE ships mean activations; empty: they do not enter."""
    zero_limit: tuple[str, float] | None = None
    """The edit (kind, strength) this kind's edits tend to as beta goes to 0, where that is not
    no edit; `intervene` makes a strength of 0 no edit for every kind."""


def spatial(codes: Codes, beta: float, inside: Tensor | None) -> Tensor:
    target = beta * (codes.norms[:, None] if codes.means is None else codes.means)
    return torch.where(inside[:, None], target - codes.z, -codes.z)


def global_(codes: Codes, beta: float, inside: Tensor | None) -> Tensor:
    rows, width = codes.z.shape
    if codes.means is not None:
        return (beta * codes.means).expand(rows, -1)
    per_image = codes.norms.view(codes.batch, -1)
    weight = beta * per_image / per_image.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return weight.reshape(-1, 1).expand(-1, width)


def ablate(codes: Codes, beta: float, inside: Tensor | None) -> Tensor:
    return -beta * codes.z


MEAN_UNIT = "x each CID's mean activation (mean.pt), as in the SDLens demo"

KINDS: dict[str, Kind] = {}
"""Every kind by name, in the order the page offers them."""


def register(kind: Kind) -> Kind:
    """Add `kind` to the table (the core, the views and the page read it from there)."""
    if set(kind.default_strength) != set(STAGES):
        raise ValueError(f"the kind {kind.name!r} needs a default strength for every stage")
    KINDS[kind.name] = kind
    return kind


SPATIAL = register(
    Kind(
        "spatial",
        "moves the concept into a region",
        "beta * ||Z_ij|| - Z_ijc inside S, -Z_ijc outside",
        spatial,
        {"early": 4000.0, "middle": 400.0, "final": 1000.0},
        needs_region=True,
        mean_unit=MEAN_UNIT,
        zero_limit=("ablate", 1.0),  # every Z_ijc of C set to 0: -Z_ijc everywhere
    )
)
GLOBAL = register(
    Kind(
        "global",
        "adds the concept everywhere",
        "beta * ||Z_ij|| / sum_ij ||Z_ij||",
        global_,
        {"early": 8.0, "middle": 10.0, "final": 10.0},
        mean_unit=MEAN_UNIT,
    )
)
ABLATE = register(
    Kind(
        "ablate",
        "scales the concept down where it fires",
        "-beta * Z_ijc, beta in [0, 1]",
        ablate,
        {"early": 1.0, "middle": 1.0, "final": 1.0},
        max_strength=1.0,
        takes_preset_strength=False,
    )
)


def get_kind(name: str) -> Kind:
    """The kind called `name`; an error listing the kinds if there is none."""
    if name not in KINDS:
        raise ValueError(f"unknown intervention {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]
