"""Record and edit residual updates of a U-Net's transformer blocks during generation.

The residual update of a block is Delta = block output - block input. It is read (and,
for edits, replaced) by PyTorch forward hooks on the named `Transformer2DModel` blocks;
a pre-hook on the U-Net itself reads each call's timestep, so the current t
(timestep / num_train_timesteps, 1 = noise) is known whatever the scheduler. Under
classifier-free guidance diffusers runs the U-Net on the batch [uncond, cond]; each half
is reported as its own branch.

    with record(pipe, ["mid_block.attentions.0"]) as rec:
        pipe("a cat", guidance_scale=7.5)
    rec.deltas("mid_block.attentions.0", "cond")   # [steps, batch, channels, H, W]

Hooks are removed when the `with` block ends, also when generation raises.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn

BRANCHES = ("uncond", "cond")

EditFn = Callable[[Tensor, float, str], Tensor | None]
"""(delta of one branch, t, branch) -> replacement delta, or None to leave it untouched."""

DeltaCallback = Callable[[str, "StepInfo", str, Tensor], None]
"""(block, step, branch, delta) -> None; called for every recorded update."""


class StepInfo(NamedTuple):
    """Where the U-Net call currently running sits in denoising time."""

    index: int
    """Position of the timestep in the scheduler's timesteps (0 = first, noisiest step)."""
    timestep: float
    t: float
    """timestep / num_train_timesteps: 1 is pure noise, 0 the end of denoising."""


class DeltaRecord(NamedTuple):
    step: StepInfo
    block: str
    branch: str
    delta: Tensor


def transformer_blocks(unet: nn.Module) -> list[str]:
    """Names of every `Transformer2DModel` block of `unet`: the valid hook points."""
    return [name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def resolve_blocks(unet: nn.Module, blocks: Iterable[str]) -> dict[str, nn.Module]:
    """Map block names to modules; an unknown name is an error listing the valid ones."""
    valid = transformer_blocks(unet)
    modules = dict(unet.named_modules())
    resolved = {}
    for name in blocks:
        if name not in valid:
            raise ValueError(f"unknown hook point {name!r}; valid ones are: {', '.join(valid)}")
        resolved[name] = modules[name]
    return resolved


def as_floats(timesteps: Sequence[float] | Tensor) -> list[float]:
    """Timesteps as Python floats, read from the device in one transfer."""
    if torch.is_tensor(timesteps):
        return [float(ts) for ts in timesteps.tolist()]
    return [float(ts) for ts in timesteps]


def nearest_indices(timesteps: Sequence[float], targets_t: Iterable[float], n_train: int) -> set:
    """Indices of the timesteps nearest to each target t (ties go to the earlier step)."""
    chosen = set()
    for t in targets_t:
        distances = [abs(ts / n_train - t) for ts in timesteps]
        chosen.add(distances.index(min(distances)))
    return chosen


@dataclass
class Recording:
    """Residual updates collected while a `record` block was open."""

    records: list[DeltaRecord] = field(default_factory=list)

    def steps(self) -> list[StepInfo]:
        """The distinct steps recorded, in order."""
        return sorted({r.step for r in self.records})

    def deltas(self, block: str, branch: str = "cond") -> Tensor:
        """Updates of one block and branch stacked over steps: [steps, batch, C, H, W]."""
        found = [r.delta for r in self.records if r.block == block and r.branch == branch]
        if not found:
            have = sorted({(r.block, r.branch) for r in self.records})
            raise KeyError(f"nothing recorded for {block!r}/{branch!r}; recorded: {have}")
        return torch.stack(found)

    def at(self, block: str, t: float, branch: str = "cond") -> DeltaRecord:
        """The record of `block`/`branch` whose t is nearest to `t`."""
        candidates = [r for r in self.records if r.block == block and r.branch == branch]
        if not candidates:
            raise KeyError(f"nothing recorded for {block!r}/{branch!r}")
        return min(candidates, key=lambda r: abs(r.step.t - t))


class _Session:
    """The hooks of one `record`/`edit` block and the state they share."""

    def __init__(self, pipe, blocks: Iterable[str], *, at_t, edits, on_delta, cfg, timesteps):
        self.unet = pipe.unet if hasattr(pipe, "unet") else pipe
        self.pipe = pipe
        self.modules = resolve_blocks(self.unet, blocks)
        self.at_t = None if at_t is None else tuple(at_t)
        self.edits = edits or {}
        self.on_delta = on_delta
        self.cfg = cfg
        self.timesteps = timesteps
        scheduler = getattr(pipe, "scheduler", None)
        self.n_train = scheduler.config.num_train_timesteps if scheduler else 1000
        self.step: StepInfo | None = None
        self.recording_now = False
        self.handles: list = []

    def attach(self) -> None:
        self.handles.append(self.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True))
        for name, module in self.modules.items():
            hook = self._block_hook(name)
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _schedule(self) -> list[float]:
        timesteps = self.timesteps
        if timesteps is None:
            timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return [] if timesteps is None else as_floats(timesteps)

    def _uses_cfg(self) -> bool:
        if self.cfg is not None:
            return self.cfg
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def _on_unet(self, module, args, kwargs) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        schedule = self._schedule()
        index = schedule.index(timestep) if timestep in schedule else -1
        self.step = StepInfo(index, timestep, timestep / self.n_train)
        self.branches = BRANCHES if self._uses_cfg() else ("cond",)
        selected = self.at_t is None or (
            index in nearest_indices(schedule, self.at_t, self.n_train) if schedule else False
        )
        self.recording_now = self.on_delta is not None and selected

    def _block_hook(self, name: str):
        def hook(module, args, kwargs, output):
            return self._on_block(name, args, kwargs, output)

        return hook

    def _on_block(self, name: str, args, kwargs, output):
        edit = self.edits.get(name)
        if self.step is None or (edit is None and not self.recording_now):
            return None
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output.sample
        delta = hidden_out - hidden_in
        edited = None
        for branch, rows in zip(self.branches, delta.chunk(len(self.branches)), strict=True):
            new = edit(rows, self.step.t, branch) if edit is not None else None
            if new is not None:
                if edited is None:
                    edited = hidden_out.clone()
                sl = self._rows(branch, delta.shape[0])
                edited[sl] = hidden_in[sl] + new.to(hidden_out.dtype)
                rows = new
            if self.recording_now:
                self.on_delta(name, self.step, branch, rows)
        if edited is None:
            return None
        if isinstance(output, tuple):
            return (edited, *output[1:])
        output.sample = edited
        return output

    def _rows(self, branch: str, batch: int) -> slice:
        size = batch // len(self.branches)
        start = self.branches.index(branch) * size
        return slice(start, start + size)


@contextmanager
def hooked(
    pipe,
    blocks: Iterable[str],
    *,
    on_delta: DeltaCallback | None = None,
    edits: dict[str, EditFn] | None = None,
    at_t: Iterable[float] | None = None,
    cfg: bool | None = None,
    timesteps: Sequence[float] | None = None,
) -> Iterator[None]:
    """The general form behind `record` and `edit`.

    `pipe` is a diffusers pipeline or a bare U-Net. With a bare U-Net, say whether the
    batch is [uncond, cond] (`cfg`) and, to select steps with `at_t`, pass `timesteps`.
    `at_t` restricts `on_delta` to the steps nearest those t values; edits run at
    every step and decide themselves (they receive t).
    """
    session = _Session(
        pipe, blocks, at_t=at_t, edits=edits, on_delta=on_delta, cfg=cfg, timesteps=timesteps
    )
    session.attach()
    try:
        yield
    finally:
        session.detach()


@contextmanager
def record(
    pipe,
    blocks: Iterable[str],
    *,
    at_t: Iterable[float] | None = None,
    device: str | torch.device | None = "cpu",
    cfg: bool | None = None,
) -> Iterator[Recording]:
    """Record residual updates of `blocks` at every step (or those nearest `at_t`).

    Updates are copied to `device` (None keeps them where they are computed).
    """
    recording = Recording()

    def keep(block: str, step: StepInfo, branch: str, delta: Tensor) -> None:
        # `delta` is computed afresh in the hook, so keeping it (or a view of it) is safe.
        kept = delta.detach() if device is None else delta.detach().to(device)
        recording.records.append(DeltaRecord(step, block, branch, kept))

    with hooked(pipe, blocks, on_delta=keep, at_t=at_t, cfg=cfg):
        yield recording


@contextmanager
def edit(pipe, edits: dict[str, EditFn], *, cfg: bool | None = None) -> Iterator[None]:
    """Replace residual updates: `edits[block](delta, t, branch)` returns the new delta."""
    with hooked(pipe, edits.keys(), edits=edits, cfg=cfg):
        yield
