"""The few collective operations SAE training needs, through accelerate.

Each works unchanged in a single process, where it returns its input.
"""

import torch
from accelerate.utils import gather, reduce
from torch import nn

from core.sae.model import LatentStats


def agree_min(value: int) -> int:
    """The smallest `value` over all processes."""
    return int(gather(torch.tensor([value])).min())


def agree_sum(value: int) -> int:
    return int(gather(torch.tensor([value])).sum())


def average_gradients(module: nn.Module) -> None:
    """Replace each gradient by its mean over processes (data-parallel training)."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(reduce(p.grad, reduction="mean"))


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """All processes' rows, concatenated (every process must pass the same shape)."""
    return gather(rows.contiguous())


def combine_stats(stats: LatentStats) -> LatentStats:
    """Per-latent statistics over the samples seen by every process."""
    return LatentStats(
        fire_count=reduce(stats.fire_count, reduction="sum"),
        act_sum=reduce(stats.act_sum, reduction="sum"),
        act_max=gather(stats.act_max[None]).amax(dim=0),
        num_samples=agree_sum(stats.num_samples),
    )
