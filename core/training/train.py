"""Train TopK SAEs on residual updates: `python -m core.training.train --help`.

One SAE per (block, t, branch). Images are generated for a list of prompts; at the steps
nearest the requested t values the residual updates of the chosen blocks are recorded,
streamed into one shuffle buffer per SAE, and trained on in random batches. With
`--shared-t LOW HIGH` there is instead one time-shared SAE per (block, branch), valid for
every t, trained on the updates of every step whose t lies in that range. Progress is
checkpointed every `--save-every` training steps and when the run is interrupted
(Ctrl-C, SIGTERM); `--resume` carries on from the last checkpoint and ends with the same
SAEs as an uninterrupted run. Under `accelerate launch` each process generates its own
share of the prompts and gradients are averaged over processes, so all hold the same SAEs.
"""

import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import PartialState
from simple_parsing import field
from tqdm.auto import tqdm

from core.diffusion.hooks import BRANCHES
from core.diffusion.layouts import STREAMS, block_width, denoiser_of, layout_of, resolve_blocks
from core.diffusion.pipelines import load_pipeline
from core.diffusion.presets import PRESETS, get_preset
from core.runtime import command
from core.sae.bank import SAEBank, SAEKey
from core.training.activations import (
    GenerationSource,
    Round,
    ShardSource,
    ShardWriter,
    dataset_prompts,
    key_name,
    read_prompts,
)
from core.training.buffer import ShuffleBuffer
from core.training.checkpoint import Checkpointer
from core.training.distributed import (
    agree_min,
    agree_sum,
    average_gradients,
    combine_stats,
    gather_rows,
)
from core.training.trainer import SAETrainer, TrainConfig, derived_seed

RESUME_MUST_MATCH = (
    "preset",
    "model",
    "prompts",
    "dataset",
    "column",
    "limit",
    "blocks",
    "stream",
    "t",
    "shared_t",
    "shared_steps",
    "branches",
    "steps",
    "guidance",
    "resolution",
    "gen_batch",
    "seed",
    "buffer_size",
    "expansion_factor",
    "num_latents",
    "k",
    "batch_size",
    "from_shards",
)


@dataclass(kw_only=True)
class RunConfig(TrainConfig):
    """Settings of `python -m core.training.train`: the SAE fields of TrainConfig (the emergence
    paper's values), then the model, the data and the run. Prompt i is generated from seed + i;
    each SAE starts from weights of its own, drawn from `derived_seed(seed, block, t, branch)`
    (recorded as `seed` in its cfg.json)."""

    out: str
    """Output folder."""
    preset: str = field(default="tiny", choices=sorted(PRESETS))
    """Preset: pipeline, sampling and hook points."""
    model: str | None = None
    """Pipeline Hub id or local folder (default: the preset's)."""
    prompts: str | None = None
    """Text file, one prompt per line."""
    dataset: str | None = None
    """Hugging Face dataset to read prompts from."""
    column: str = "text"
    """Dataset column holding the prompts."""
    split: str = "train"
    """Dataset split."""
    limit: int | None = None
    """Use at most this many prompts."""
    blocks: tuple[str, ...] | None = None
    """Hook points (default: the preset's)."""
    stream: str = field(default="image", choices=STREAMS)
    """Which tokens of the blocks to read: the image's, or a joint block's (SD3, FLUX) text
    tokens, recorded as a [tokens x 1] grid (the spatial views need the image stream)."""
    t: tuple[float, ...] = (1.0, 0.5, 0.0)
    """Denoising times to train SAEs for (1 = noise)."""
    shared_t: tuple[float, float] | None = field(default=None, metavar="LOW HIGH")
    """Instead of one SAE per --t, train one per block and branch on the residual updates of
    every step whose t lies in this range (bounds included); it is saved for every t. Of the
    S x H x W rows an image gives over the range's S steps, a random --shared-steps x H x W
    are kept (drawn with the image's seed)."""
    shared_steps: int = 3
    """With --shared-t, how many steps' worth of rows each image gives its SAE: 3 is what the
    three per-time SAEs of a block (the default --t) get together, so both kinds train on
    the same rows per generated image; 1 is what one per-time SAE gets."""
    branches: tuple[str, ...] = field(default=("cond",), choices=BRANCHES, nargs="*")
    """CFG branches to train SAEs for."""
    steps: int | None = None
    """Denoising steps (default: the preset's)."""
    guidance: float | None = None
    """CFG scale (default: the preset's)."""
    resolution: int | None = None
    """Image side in pixels (default: the preset's)."""
    gen_batch: int = 8
    """Prompts generated at once."""
    device: str | None = None
    """Device (default: cuda if available, else cpu)."""
    buffer_size: int = 65536
    """Rows held per SAE before training starts drawing batches."""
    save_every: int = 500
    """Checkpoint every N training steps."""
    resume: bool = False
    """Continue from the last checkpoint."""
    overwrite: bool = False
    """Discard an earlier run in --out."""
    write_shards: str | None = None
    """Also write the activations as fp16 shards to this folder."""
    from_shards: str | None = None
    """Train from shards in this folder instead of generating."""
    push_to_hub: str | None = field(default=None, metavar="REPO")
    """Upload the SAEs to this Hub repo."""

    def __post_init__(self) -> None:
        if not (self.prompts or self.dataset or self.from_shards):
            raise ValueError("give --prompts FILE, --dataset NAME or --from-shards FOLDER")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; choose one")
        if self.shared_t is not None and not 0 <= self.shared_t[0] <= self.shared_t[1] <= 1:
            low, high = self.shared_t
            raise ValueError(
                f"--shared-t takes LOW HIGH with 0 <= LOW <= HIGH <= 1, got {low} {high}"
            )
        if self.shared_steps < 1:
            raise ValueError(f"--shared-steps must be 1 or more, got {self.shared_steps}")

    def train_config(self) -> TrainConfig:
        """The SAE settings alone, as each trainer keeps them in its checkpoints."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})


class Run:
    """One training run's state: a buffer and a trainer per key, and the next round."""

    def __init__(
        self, config: RunConfig, keys: Sequence[SAEKey], model_name: str, layout: str = ""
    ):
        self.config = config
        """The run's settings; `Checkpointer` stores them under this name."""
        self.keys, self.model_name, self.layout = list(keys), model_name, layout
        self.state = PartialState()
        self.cfg = config.train_config()
        self.buffers: dict[SAEKey, ShuffleBuffer] = {}
        self.trainers: dict[SAEKey, SAETrainer] = {}
        self.next_round = 0
        self.steps_since_save = 0

    def buffer(self, key: SAEKey, dim: int) -> ShuffleBuffer:
        if key not in self.buffers:
            seed = self.config.seed + 1000 * self.state.process_index + self.keys.index(key)
            self.buffers[key] = ShuffleBuffer(
                dim, self.config.buffer_size, seed, device=self.state.device
            )
        return self.buffers[key]

    def add(self, rows: Round) -> None:
        for key, tensor in rows.items():
            self.buffer(key, tensor.shape[1]).add(tensor)

    def held(self, key: SAEKey) -> int:
        """Rows buffered for `key` on the process holding the fewest."""
        return agree_min(len(self.buffers[key]) if key in self.buffers else 0)

    def train_ready(self, drain: bool = False) -> None:
        """Step every SAE whose buffer, on every process, is full (or, draining, non-empty)."""
        batch = self.cfg.batch_size
        for key in self.keys:
            while self.held(key) >= (batch if drain else self.config.buffer_size):
                self.step(key, self.buffers[key].take(batch))
            if drain and (rest := self.held(key)) >= 2:
                self.step(key, self.buffers[key].take(rest))

    def step(self, key: SAEKey, batch: torch.Tensor) -> None:
        if key not in self.trainers:
            trainer = SAETrainer(
                batch.shape[1],
                replace(self.cfg, seed=derived_seed(self.config.seed, *key)),
                model=self.model_name,
                block=key.block,
                t=key.t,
                branch=key.branch,
                device=self.state.device,
            )
            trainer.grad_sync = average_gradients
            trainer.calibrate(gather_rows(batch))
            self.trainers[key] = trainer
        self.trainers[key].step(batch)
        self.steps_since_save += 1

    def bank(self) -> SAEBank:
        bank = SAEBank()
        for key, trainer in self.trainers.items():
            sae = trainer.export()
            sae.stats = combine_stats(sae.stats)
            sae.cfg.metrics["skipped_rows"] = agree_sum(self.buffers[key].skipped)
            sae.cfg.layout = self.layout
            sae.cfg.stream = self.config.stream
            bank.add(sae)
        return bank

    def metrics(self) -> dict[str, dict[str, float]]:
        return {
            key_name(k): {**t.mean_metrics(), "steps": t.num_steps}
            for k, t in self.trainers.items()
        }

    def rows_trained(self) -> int:
        """Rows this process's SAEs have trained on, summed over the SAEs."""
        return sum(trainer.stats.num_samples for trainer in self.trainers.values())


def prepare_output(config: RunConfig, state: PartialState) -> Checkpointer:
    out = Path(config.out)
    checkpoints = Checkpointer(out / "checkpoints")
    earlier = out.exists() and any(out.iterdir())
    if earlier and not (config.resume or config.overwrite):
        raise ValueError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to start again"
        )
    if config.resume and checkpoints.latest() is None:
        raise ValueError(f"--resume, but {out} has no checkpoint to resume from")
    if config.overwrite and earlier and state.is_main_process:
        shutil.rmtree(out)
    state.wait_for_everyone()
    return checkpoints


def check_resumable(config: RunConfig, saved: dict, world_size: int) -> None:
    current = json.loads(json.dumps(asdict(config)))  # tuples as lists, as the checkpoint has them
    changed = [k for k in RESUME_MUST_MATCH if saved["args"].get(k) != current.get(k)]
    if changed:
        raise ValueError(
            f"cannot resume: these settings differ from the run being "
            f"resumed: {', '.join('--' + c.replace('_', '-') for c in changed)}"
        )
    if saved["world_size"] != world_size:
        raise ValueError(
            f"cannot resume with {world_size} processes a run that used {saved['world_size']}"
        )


def make_source(
    config: RunConfig, keys: Sequence[SAEKey], state: PartialState
) -> GenerationSource | ShardSource:
    if config.from_shards:
        return ShardSource(config.from_shards, keys, rank=state.process_index)
    prompts = (
        read_prompts(config.prompts)
        if config.prompts
        else dataset_prompts(config.dataset, config.column, config.split, config.limit)
    )
    prompts = prompts[: config.limit]
    if len(prompts) < state.num_processes:
        raise ValueError(f"{len(prompts)} prompts for {state.num_processes} processes")
    preset = get_preset(config.preset, **({"model": config.model} if config.model else {}))
    pipe = load_pipeline(preset, device=config.device or str(state.device))
    for module in resolve_blocks(denoiser_of(pipe), {k.block for k in keys}).values():
        block_width(module, config.stream)  # refuses a stream the block does not have
    return GenerationSource(
        pipe,
        prompts,
        keys,
        steps=config.steps or preset.steps,
        guidance_scale=preset.guidance_scale if config.guidance is None else config.guidance,
        batch_size=config.gen_batch,
        seed=config.seed,
        resolution=config.resolution or preset.resolution,
        rank=state.process_index,
        world_size=state.num_processes,
        shared_t=config.shared_t,
        shared_steps=config.shared_steps,
        stream=config.stream,
    )


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop checkpoints and stops after the current round.

    A second signal stops at once; the last checkpoint is then the one to resume from.
    """

    def __init__(self) -> None:
        self.raised = False

    def set(self, signum, frame) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """A StopFlag wired to SIGINT and SIGTERM while the block runs."""
    flag = StopFlag()
    previous = {sig: signal.signal(sig, flag.set) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(config: RunConfig) -> SAEBank | None:
    """Run training as `config` says; returns the SAEs, or None if interrupted."""
    state = PartialState()
    preset = get_preset(config.preset)
    blocks = config.blocks or list(preset.hook_points)
    times = [None] if config.shared_t else config.t
    keys = [SAEKey(b, t, br) for b in blocks for t in times for br in config.branches]
    source = make_source(config, keys, state)
    checkpoints = prepare_output(config, state)
    pipe = getattr(source, "pipe", None)  # None when reading shards
    layout = layout_of(denoiser_of(pipe)).name if pipe is not None else ""
    run = Run(config, keys, model_name=config.model or preset.model, layout=layout)
    if config.resume:
        check_resumable(config, checkpoints.saved_state(), state.num_processes)
        checkpoints.load(run)
        if state.is_main_process:
            print(f"resuming after round {run.next_round} of {source.num_rounds}", file=sys.stderr)
    rows_before, start = run.rows_trained(), time.perf_counter()
    with stop_on_signals() as stop:
        if not train_rounds(run, source, checkpoints, stop):
            print(
                f"interrupted: saved a checkpoint after round {run.next_round}; "
                "run again with --resume to continue",
                file=sys.stderr,
            )
            return None
    run.train_ready(drain=True)
    bank = run.bank()
    throughput = Throughput(
        agree_sum(run.rows_trained() - rows_before), time.perf_counter() - start
    )
    if state.is_main_process:
        save_results(config, run, bank, throughput)
    state.wait_for_everyone()
    return bank


def train_rounds(
    run: Run, source: GenerationSource | ShardSource, checkpoints: Checkpointer, stop: StopFlag
) -> bool:
    """Feed every remaining round to the buffers and train; False if stopped early."""
    config = run.config
    writer = (
        ShardWriter(config.write_shards, run.state.process_index) if config.write_shards else None
    )
    tail_start = int(0.9 * source.num_rounds)
    rows_before, started = run.rows_trained(), time.perf_counter()
    with tqdm(
        total=source.num_rounds,
        initial=run.next_round,
        desc="rounds",
        disable=not run.state.is_main_process,
    ) as bar:
        for index, rows in source.rounds(run.next_round):
            if index == tail_start:  # report metrics of the last 10% of the data only
                for trainer in run.trainers.values():
                    trainer.mean_metrics(reset=True)
            if writer:
                writer.write(index, rows)
            run.add(rows)
            run.train_ready()
            run.next_round = index + 1
            bar.update(1)
            rate = (run.rows_trained() - rows_before) / (time.perf_counter() - started)
            bar.set_postfix(
                steps=sum(t.num_steps for t in run.trainers.values()), rows_per_s=f"{rate:.0f}"
            )
            interrupted = agree_sum(int(stop.raised)) > 0
            if interrupted or run.steps_since_save >= config.save_every:
                checkpoints.save(run)
            if interrupted:
                return False
    return True


class Throughput(NamedTuple):
    """Rows trained on in this run (over every SAE and process) and the seconds it took to
    generate, collect and train on them."""

    rows: int
    seconds: float

    def describe(self) -> str:
        rate = self.rows / self.seconds
        return f"trained on {self.rows} rows in {self.seconds:.1f} s ({rate:.0f} rows/s)"


def save_results(config: RunConfig, run: Run, bank: SAEBank, throughput: Throughput) -> None:
    out = Path(config.out)
    bank.save_pretrained(out / "saes")
    metrics = run.metrics()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("metrics over the last 10% of training (nMSE = normalised MSE, EV = explained variance)")
    print(f"{'SAE':60s} {'steps':>6s} {'nMSE':>6s} {'EV':>6s} {'L0':>6s} {'dead':>6s}")
    for name, m in metrics.items():
        print(
            f"{name:60s} {m['steps']:6d} {m['fvu']:6.3f} {m['explained_variance']:6.3f} "
            f"{m['l0']:6.1f} {m['dead_fraction']:6.3f}"
        )
    print(throughput.describe())
    print(f"saved {len(bank)} SAEs to {out / 'saes'}")
    if config.push_to_hub:
        bank.push_to_hub(config.push_to_hub)
        print(f"pushed to the Hub repo {config.push_to_hub}")


main = command(
    RunConfig,
    train,
    "python -m core.training.train",
    __doc__,
    exit_code=lambda bank: 0 if bank is not None else 130,
)


if __name__ == "__main__":
    sys.exit(main())
