"""Produce residual-update rows for SAE training, one round (prompt batch) at a time.

A round is a dict {SAEKey: rows [N, channels]}, one row per spatial position of each
image. Rounds come from generating images (`GenerationSource`) or from fp16 shards a
previous run wrote (`ShardSource`). Both can start at any round, which is what makes
resuming exact: prompt i is always generated from seed `seed + i`, whatever the batch
size or number of processes. A time-shared SAE (key t None) gets rows pooled over every
step in a t range, subsampled to as many per image as one step gives (`pooled_selection`).
"""

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.diffusion.hooks import StepInfo, hooked, nearest_indices, schedule_t
from core.diffusion.sampling import generate_images
from core.sae.bank import SAEKey

Round = dict[SAEKey, Tensor]


def key_name(key: SAEKey) -> str:
    """How shards and metrics name an SAE: `block|t=0.5|cond`, or `block|t=all|cond`."""
    t = "all" if key.t is None else f"{key.t:g}"
    return f"{key.block}|t={t}|{key.branch}"


def to_rows(delta: Tensor) -> Tensor:
    """[batch, C, H, W] -> [batch * H * W, C]: one SAE sample per spatial position."""
    return delta.permute(0, 2, 3, 1).reshape(-1, delta.shape[1])


def schedule_of(pipe, steps: int) -> list[float]:
    """t of each step of a `steps`-step generation, read from a fresh copy of the pipeline's
    scheduler (so that nothing is generated and the pipeline's own scheduler is untouched)."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return schedule_t(pipe, scheduler.timesteps)


def steps_in_range(ts: Sequence[float], t_range: tuple[float, float]) -> list[int]:
    """Indices of the steps whose t lies in [low, high], bounds included."""
    low, high = t_range
    return [index for index, t in enumerate(ts) if low <= t <= high]


def pooled_selection(
    seeds: Sequence[int], num_steps: int, positions: int, steps_kept: int = 1
) -> Tensor:
    """[images, num_steps, positions] bool with `steps_kept` x `positions` True per image
    (all, if that is more than there are): the rows a time-shared SAE trains on, of the
    num_steps x positions an image gives over its steps.

    Image b's rows are drawn uniformly without replacement by a generator seeded with
    seeds[b], so the choice does not depend on the batch the image is generated in.
    """
    masks = torch.zeros(len(seeds), num_steps * positions, dtype=torch.bool)
    kept = min(steps_kept, num_steps) * positions
    for image, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        masks[image, torch.randperm(num_steps * positions, generator=generator)[:kept]] = True
    return masks.view(len(seeds), num_steps, positions)


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file; an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} has no prompts; write one prompt per line")
    return prompts


def dataset_prompts(name: str, column: str, split: str = "train", limit: int | None = None):
    """Prompts from a column of a Hugging Face dataset (needs the `datasets` package)."""
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise ImportError("reading prompts from a dataset needs `pip install datasets`") from error
    data = load_dataset(name, split=split if limit is None else f"{split}[:{limit}]")
    if column not in data.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; it has {data.column_names}")
    prompts = [str(p).strip() for p in data[column] if p and str(p).strip()]
    if not prompts:
        raise ValueError(f"column {column!r} of dataset {name!r} holds no prompts")
    return prompts


class GenerationSource:
    """Generate this process's share of the prompts and record the wanted updates.

    Each key is fed the steps nearest its t; with `shared_t`, the keys are time-shared (t
    None) and each is fed every step whose t lies in that range, subsampled by
    `pooled_selection` to as many rows per image as `shared_steps` steps give. `stream`
    names the tokens read (`hooked`'s argument).
    """

    def __init__(
        self,
        pipe,
        prompts: Sequence[str],
        keys: Sequence[SAEKey],
        *,
        steps: int,
        guidance_scale: float,
        batch_size: int,
        seed: int = 0,
        resolution: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shared_t: tuple[float, float] | None = None,
        shared_steps: int = 1,
        stream: str = "image",
    ):
        if any((key.t is None) != (shared_t is not None) for key in keys):
            raise ValueError("keys with t None (time-shared) go with shared_t, and only they")
        self.pipe = pipe
        self.indices = list(range(rank, len(prompts), world_size))
        self.prompts = prompts
        self.keys = list(keys)
        self.steps, self.guidance_scale = steps, guidance_scale
        self.batch_size, self.seed, self.resolution = batch_size, seed, resolution
        self.num_rounds = math.ceil(math.ceil(len(prompts) / world_size) / batch_size)
        self.blocks = sorted({k.block for k in self.keys})
        schedule = schedule_of(pipe, steps)
        self.pooled = steps_in_range(schedule, shared_t) if shared_t else []
        """Indices of the steps pooled for time-shared keys."""
        self.shared_steps = shared_steps
        self.stream = stream
        if shared_t and not self.pooled:
            raise ValueError(
                f"no step of the {steps}-step schedule has t in [{shared_t[0]:g}, "
                f"{shared_t[1]:g}] (its steps' t run from {min(schedule):g} to "
                f"{max(schedule):g}); widen the range"
            )
        self.targets = [schedule[i] for i in self.pooled] or sorted({k.t for k in self.keys})
        """The t recorded: each key's, or each pooled step's own (which selects that step)."""
        self.last_step = max(nearest_indices(schedule, self.targets))

    def rounds(self, start: int = 0) -> Iterator[tuple[int, Round]]:
        for index in range(start, self.num_rounds):
            chunk = self.indices[index * self.batch_size : (index + 1) * self.batch_size]
            yield index, self.generate(chunk) if chunk else {}

    def generate(self, prompt_indices: Sequence[int]) -> Round:
        collected: dict[SAEKey, list[Tensor]] = {}
        wanted = set(self.keys)
        seeds = [self.seed + i for i in prompt_indices]
        selections: dict[int, Tensor] = {}  # grid positions -> pooled_selection

        def pooled_rows(step: StepInfo, delta: Tensor) -> Tensor:
            positions = delta.shape[2] * delta.shape[3]
            if positions not in selections:
                selections[positions] = pooled_selection(
                    seeds, len(self.pooled), positions, self.shared_steps
                )
            chosen = selections[positions][:, self.pooled.index(step.index)].flatten()
            return to_rows(delta.float())[chosen.to(delta.device)]

        def keep(block: str, step: StepInfo, branch: str, delta: Tensor) -> None:
            if self.pooled:
                key = SAEKey(block, None, branch)
            else:
                key = SAEKey(block, min(self.targets, key=lambda t: abs(t - step.t)), branch)
            if key in wanted:
                rows = pooled_rows(step, delta) if self.pooled else to_rows(delta.float())
                collected.setdefault(key, []).append(rows)

        with hooked(self.pipe, self.blocks, on_delta=keep, at_t=self.targets, stream=self.stream):
            generate_images(
                self.pipe,
                [self.prompts[i] for i in prompt_indices],
                seeds,
                steps=self.steps,
                guidance_scale=self.guidance_scale,
                resolution=self.resolution,
                output_type="latent",
                callback_on_step_end=self._stop_after_last_step,
            )
        return {key: torch.cat(rows) for key, rows in collected.items()}

    def _stop_after_last_step(self, pipe, step_index: int, timestep, kwargs: dict) -> dict:
        """Skip the denoising steps after the last one any key needs."""
        if step_index >= self.last_step:
            pipe._interrupt = True
        return kwargs


class ShardWriter:
    """Write each round as one fp16 safetensors file per process."""

    def __init__(self, folder: str | Path, rank: int = 0):
        self.folder = Path(folder) / f"rank{rank}"
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, index: int, rows: Round) -> None:
        tensors = {key_name(k): v.half().contiguous().cpu() for k, v in rows.items()}
        path = self.folder / f"round{index:06d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)


class ShardSource:
    """Read the rounds a `ShardWriter` wrote, in order."""

    def __init__(self, folder: str | Path, keys: Sequence[SAEKey], rank: int = 0):
        self.files = sorted((Path(folder) / f"rank{rank}").glob("round*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"no activation shards under {str(folder)!r}/rank{rank}")
        self.keys = list(keys)
        self.num_rounds = len(self.files)

    def rounds(self, start: int = 0) -> Iterator[tuple[int, Round]]:
        for index in range(start, self.num_rounds):
            tensors = load_file(str(self.files[index]))
            missing = [key_name(k) for k in self.keys if key_name(k) not in tensors]
            if missing:
                raise KeyError(
                    f"shard {self.files[index]} lacks {missing}; it was written "
                    "for other blocks, t values or branches"
                )
            yield index, {k: tensors[key_name(k)].float() for k in self.keys}
