"""Record and edit residual updates (or outputs) of a denoiser's blocks during generation.

The residual update of a block is Delta = block output - block input. It is read (and,
for edits, replaced) by PyTorch forward hooks on the named blocks: a U-Net's
`Transformer2DModel`s or a diffusion transformer's blocks (`core.diffusion.layouts`: PixArt,
SD3, FLUX, DiT), whose tokens are seen as feature maps on the patch grid, so that a
record is [batch, channels, H, W] whatever the denoiser. With `site="output"` (for SAEs
trained on it, as SAeUron's are) the block's output itself is read and replaced instead,
per block if `site` maps block names to sites; with `stream="text"`, a joint block's text
tokens instead of its image tokens. A pre-hook on the denoiser reads each call's timestep,
so the current t (1 = noise) is known whatever the scheduler. Under classifier-free
guidance a pipeline runs the denoiser on the batch [uncond, cond]; each half is reported as
its own branch (a pipeline without it, as FLUX.1's, has the cond branch only).

    with record(pipe, ["mid_block.attentions.0"]) as rec:
        pipe("a cat", guidance_scale=7.5)
    rec.at("mid_block.attentions.0", t=0.5).delta   # [batch, channels, H, W], cond branch

Hooks are removed when the `with` block ends, also when generation raises.

`DenoiserHooks` is the base of every hook manager of the project (the sessions here,
Revelio's block outputs, the cross-attention trace): forward hooks on named modules, the
current t read from the denoiser's own arguments, every hook removed in `finally`.
"""

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from core.diffusion.layouts import (
    Block,
    denoiser_of,
    is_cfg_batch,
    layout_of,
    patch_grid,
    resolve_blocks,
)
from core.sae.config import SITES

BRANCHES = ("uncond", "cond")

EditFn = Callable[[Tensor, float, str], Tensor | None]
"""(delta of one branch, t, branch) -> replacement delta, or None to leave it untouched. At
the `output` site it receives and returns the block's output instead."""

Sites = str | Mapping[str, str]
"""The activation read and edited: one key of SITES for every block, or one per block."""

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
    """The residual update, or at the `output` site the block's output."""
    site: str = "delta"


def block_sites(site: Sites, blocks: Iterable[str]) -> dict[str, str]:
    """The site of each block; an unknown site is an error naming the valid ones."""
    sites = {block: site if isinstance(site, str) else site[block] for block in blocks}
    unknown = sorted(set(sites.values()) - set(SITES))
    if unknown:
        raise ValueError(f"unknown activation site {unknown[0]!r}; choose {' or '.join(SITES)}")
    return sites


def num_train_timesteps(pipe) -> int:
    """Length of the training schedule that a scheduler's timesteps count (1000 without one)."""
    scheduler = getattr(pipe, "scheduler", None)
    return scheduler.config.num_train_timesteps if scheduler is not None else 1000


def timestep_at_noise(pipe) -> float:
    """The denoiser's timestep argument at t = 1: its layout's, or `num_train_timesteps`."""
    fixed = layout_of(denoiser_of(pipe)).timestep_at_noise
    return fixed if fixed is not None else num_train_timesteps(pipe)


def schedule_t(pipe, timesteps: Sequence[float] | Tensor | None = None) -> list[float]:
    """t (timestep / num_train_timesteps) of each step of `timesteps`, by default those of the
    pipeline's scheduler as last set; empty when there are none. Read in one device transfer."""
    if timesteps is None:
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
    if timesteps is None:
        return []
    values = timesteps.tolist() if torch.is_tensor(timesteps) else timesteps
    n_train = num_train_timesteps(pipe)
    return [float(ts) / n_train for ts in values]


def step_index(ts: Sequence[float], t: float) -> int:
    """Position of t among a schedule's ts (0 = first, noisiest step): the nearest, if within
    half the smallest gap between steps (at most 0.01), so that a timestep passed in lower
    precision (FLUX's t / 1000 in the pipeline's dtype) finds its step; else -1."""
    if not ts:
        return -1
    distances = [abs(step_t - t) for step_t in ts]
    index = distances.index(min(distances))
    gaps = [abs(a - b) / 2 for a, b in zip(ts, ts[1:], strict=False) if a != b]
    return index if distances[index] <= min([0.01, *gaps]) else -1


def nearest_indices(ts: Sequence[float], targets: Iterable[float]) -> set[int]:
    """Indices of the steps whose t is nearest to each target t (ties go to the earlier step)."""
    chosen = set()
    for target in targets:
        distances = [abs(t - target) for t in ts]
        chosen.add(distances.index(min(distances)))
    return chosen


class DenoiserHooks:
    """Forward hooks on named modules of a denoiser, and the t of the denoiser call running.

    A pre-hook on the denoiser (a U-Net or DiT) keeps each call's arguments, so `timestep`
    and `t` are read from the call itself, whatever the scheduler, and only when asked for.
    Subclasses override `on_call` (before each call) and `on_output` (after each named
    module; a value other than None replaces the module's output). Hooks exist only inside
    `with hooks.attached():` and are removed when it ends, also on errors.
    """

    def __init__(self, denoiser: nn.Module, modules: Mapping[str, nn.Module], n_train: int = 1000):
        self.denoiser = denoiser
        self.modules = dict(modules)
        self.n_train = n_train
        self._parameters = list(inspect.signature(denoiser.forward).parameters)
        self._timestep_argument: object = None
        self._timestep: float | None = None

    @property
    def timestep(self) -> float:
        """Timestep of the denoiser call running now (of the first item of its batch)."""
        if self._timestep is None:
            value = self._timestep_argument
            self._timestep = float(value.flatten()[0]) if torch.is_tensor(value) else float(value)
        return self._timestep

    @property
    def t(self) -> float:
        """timestep / num_train_timesteps of the call running now: 1 is pure noise."""
        return self.timestep / self.n_train

    def on_call(self, arguments: dict[str, object]) -> None:
        """Called before each call of the denoiser with its arguments by parameter name."""

    def on_output(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output):
        """Called after module `name` ran; return a replacement output, or None."""
        return None

    @contextmanager
    def attached(self) -> Iterator["DenoiserHooks"]:
        """Register the hooks for the `with` block; all of them go when it ends."""
        handles = []
        try:
            pre = self.denoiser.register_forward_pre_hook(self._before_call, with_kwargs=True)
            handles.append(pre)
            for name, module in self.modules.items():
                hook = partial(self.on_output, name)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _before_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        arguments = dict(zip(self._parameters, args, strict=False)) | kwargs
        self._timestep_argument, self._timestep = arguments.get("timestep"), None
        self.on_call(arguments)


@dataclass
class Recording:
    """Residual updates collected while a `record` block was open."""

    records: list[DeltaRecord] = field(default_factory=list)

    def of(self, block: str, branch: str = "cond") -> list[DeltaRecord]:
        """The records of one block and branch, in the order they were made."""
        found = [r for r in self.records if r.block == block and r.branch == branch]
        if not found:
            have = sorted({(r.block, r.branch) for r in self.records})
            raise KeyError(
                f"nothing was recorded for block {block!r}, branch {branch!r} (recorded: {have})"
            )
        return found

    def at(self, block: str, t: float, branch: str = "cond") -> DeltaRecord:
        """The record of `block`/`branch` whose t is nearest to `t`."""
        return min(self.of(block, branch), key=lambda r: abs(r.step.t - t))


class _Session(DenoiserHooks):
    """The hooks of one `record`/`edit` block and the state they share."""

    def __init__(
        self, pipe, blocks: Iterable[str], *, at_t, edits, on_delta, cfg, timesteps, site, stream
    ):
        denoiser = denoiser_of(pipe)
        super().__init__(denoiser, resolve_blocks(denoiser, blocks), timestep_at_noise(pipe))
        self.sites = block_sites(site, self.modules)
        self.blocks = {name: Block(type(m).__name__, stream) for name, m in self.modules.items()}
        self.pipe = pipe
        self.at_t = None if at_t is None else tuple(at_t)
        self.edits = edits or {}
        self.on_delta = on_delta
        self.cfg = cfg
        self.timesteps = timesteps
        self.step: StepInfo | None = None
        self.grid: tuple[int, int] | None = None
        self.recording_now = False

    def _uses_cfg(self, arguments: dict[str, object]) -> bool:
        return self.cfg if self.cfg is not None else is_cfg_batch(self.pipe, arguments)

    def on_call(self, arguments: dict[str, object]) -> None:
        ts = schedule_t(self.pipe, self.timesteps)
        index = step_index(ts, self.t)
        self.step = StepInfo(index, self.timestep, ts[index] if index >= 0 else self.t)
        self.branches = BRANCHES if self._uses_cfg(arguments) else ("cond",)
        self.grid = patch_grid(self.denoiser, arguments)
        selected = self.at_t is None or (index in nearest_indices(ts, self.at_t) if ts else False)
        self.recording_now = self.on_delta is not None and selected

    def on_output(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output):
        edit = self.edits.get(name)
        if self.step is None or (edit is None and not self.recording_now):
            return None
        block = self.blocks[name]
        hidden_in = block.to_maps(block.input(args, kwargs), self.grid)
        hidden_out = block.to_maps(block.output(output), self.grid)
        at_output = self.sites[name] == "output"
        # A copy, so that at either site the edits and records get a tensor of their own.
        delta = hidden_out.clone() if at_output else hidden_out - hidden_in
        edited = None
        for branch, rows in zip(self.branches, delta.chunk(len(self.branches)), strict=True):
            new = edit(rows, self.step.t, branch) if edit is not None else None
            if new is not None:
                if edited is None:
                    edited = hidden_out.clone()
                sl = self._rows(branch, delta.shape[0])
                new = new.to(hidden_out.dtype)
                edited[sl] = new if at_output else hidden_in[sl] + new
                rows = new
            if self.recording_now:
                self.on_delta(name, self.step, branch, rows)
        if edited is None:
            return None
        return block.with_output(output, block.to_tokens(edited))

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
    site: Sites = "delta",
    stream: str = "image",
) -> Iterator[None]:
    """The general form behind `record` and `edit`.

    `pipe` is a diffusers pipeline or a bare denoiser. With a bare one, say whether the
    batch is [uncond, cond] (`cfg`) and, to select steps with `at_t`, pass `timesteps`.
    `at_t` restricts `on_delta` to the steps nearest those t values; edits run at
    every step and decide themselves (they receive t). `site` says what `on_delta` and the
    edits see and return: the residual update ("delta") or the block's output ("output");
    `stream` which tokens of a joint block: its image tokens or its text tokens.
    """
    session = _Session(
        pipe,
        blocks,
        at_t=at_t,
        edits=edits,
        on_delta=on_delta,
        cfg=cfg,
        timesteps=timesteps,
        site=site,
        stream=stream,
    )
    with session.attached():
        yield


@contextmanager
def record(
    pipe,
    blocks: Iterable[str],
    *,
    at_t: Iterable[float] | None = None,
    device: str | torch.device | None = "cpu",
    cfg: bool | None = None,
    site: Sites = "delta",
    stream: str = "image",
) -> Iterator[Recording]:
    """Record residual updates of `blocks` (or their outputs, at the site "output") at every
    step (or those nearest `at_t`); of a joint block's text tokens with `stream="text"`.

    Updates are copied to `device` (None keeps them where they are computed).
    """
    recording = Recording()
    sites = block_sites(site, blocks)

    def keep(block: str, step: StepInfo, branch: str, delta: Tensor) -> None:
        # `delta` is computed afresh in the hook, so keeping it (or a view of it) is safe.
        kept = delta.detach() if device is None else delta.detach().to(device)
        recording.records.append(DeltaRecord(step, block, branch, kept, sites[block]))

    with hooked(pipe, sites, on_delta=keep, at_t=at_t, cfg=cfg, site=sites, stream=stream):
        yield recording


@contextmanager
def edit(
    pipe,
    edits: dict[str, EditFn],
    *,
    cfg: bool | None = None,
    site: Sites = "delta",
    stream: str = "image",
) -> Iterator[None]:
    """Replace residual updates: `edits[block](delta, t, branch)` returns the new delta (at
    the site "output", the block's new output; of the text tokens with `stream="text"`)."""
    with hooked(pipe, edits.keys(), edits=edits, cfg=cfg, site=site, stream=stream):
        yield
