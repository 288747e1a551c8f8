"""Train TopK SAEs on residual updates: `python -m core.training.train --help`.

One SAE per (block, t, branch). Images are generated for a list of prompts; at the steps
nearest the requested t values the residual updates of the chosen blocks are recorded,
streamed into one shuffle buffer per SAE, and trained on in random batches. Progress is
checkpointed every `--save-every` training steps and when the run is interrupted
(Ctrl-C, SIGTERM); `--resume` carries on from the last checkpoint and ends with the same
SAEs as an uninterrupted run. Under `accelerate launch` each process generates its own
share of the prompts and gradients are averaged over processes, so all hold the same SAEs.
"""

import argparse
import json
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from core.diffusion.hooks import BRANCHES, resolve_blocks
from core.diffusion.presets import PRESETS, get_preset, load_pipeline
from core.runtime import one_line_errors
from core.sae.model import SAEBank, SAEKey
from core.training.activations import (
    GenerationSource,
    Round,
    ShardSource,
    ShardWriter,
    dataset_prompts,
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
from core.training.trainer import SAETrainer, TrainConfig

RESUME_MUST_MATCH = (
    "preset",
    "model",
    "prompts",
    "dataset",
    "column",
    "limit",
    "blocks",
    "t",
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


class Run:
    """One training run's state: a buffer and a trainer per key, and the next round."""

    def __init__(self, args: argparse.Namespace, keys: Sequence[SAEKey], model_name: str):
        self.args, self.keys, self.model_name = args, list(keys), model_name
        self.state = PartialState()
        self.cfg = TrainConfig(
            expansion_factor=args.expansion_factor,
            num_latents=args.num_latents,
            k=args.k,
            k_aux=args.k_aux,
            auxk_alpha=args.auxk_alpha,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            dead_after=args.dead_after,
            seed=args.seed,
        )
        self.buffers: dict[SAEKey, ShuffleBuffer] = {}
        self.trainers: dict[SAEKey, SAETrainer] = {}
        self.next_round = 0
        self.steps_since_save = 0

    def buffer(self, key: SAEKey, dim: int) -> ShuffleBuffer:
        if key not in self.buffers:
            seed = self.args.seed + 1000 * self.state.process_index + self.keys.index(key)
            self.buffers[key] = ShuffleBuffer(
                dim, self.args.buffer_size, seed, device=self.state.device
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
            while self.held(key) >= (batch if drain else self.args.buffer_size):
                self.step(key, self.buffers[key].take(batch))
            if drain and (rest := self.held(key)) >= 2:
                self.step(key, self.buffers[key].take(rest))

    def step(self, key: SAEKey, batch: torch.Tensor) -> None:
        if key not in self.trainers:
            trainer = SAETrainer(
                batch.shape[1],
                self.cfg,
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
            bank.add(sae)
        return bank

    def metrics(self) -> dict[str, dict[str, float]]:
        return {
            f"{k.block}|t={k.t:g}|{k.branch}": {**t.mean_metrics(), "steps": t.num_steps}
            for k, t in self.trainers.items()
        }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m core.training.train",
        description="Train TopK SAEs on residual updates of a diffusion model's blocks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("model and data")
    src.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    src.add_argument("--model", help="pipeline Hub id or local folder (default: the preset's)")
    src.add_argument("--prompts", help="text file, one prompt per line")
    src.add_argument("--dataset", help="Hugging Face dataset to read prompts from")
    src.add_argument("--column", default="text", help="dataset column holding the prompts")
    src.add_argument("--split", default="train")
    src.add_argument("--limit", type=int, help="use at most this many prompts")
    src.add_argument("--blocks", nargs="+", help="hook points (default: the preset's)")
    src.add_argument(
        "--t",
        nargs="+",
        type=float,
        default=[1.0, 0.5, 0.0],
        help="denoising times to train SAEs for (1 = noise)",
    )
    src.add_argument("--branches", nargs="+", default=["cond"], choices=BRANCHES)
    src.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    src.add_argument("--guidance", type=float, help="CFG scale (default: the preset's)")
    src.add_argument("--resolution", type=int, help="image side in pixels")
    src.add_argument("--gen-batch", type=int, default=8, help="prompts generated at once")
    src.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    src.add_argument("--device", help="default: cuda if available, else cpu")

    sae = p.add_argument_group("SAE and optimisation (defaults: the emergence paper)")
    sae.add_argument("--expansion-factor", type=int, default=4, help="latents per input channel")
    sae.add_argument("--num-latents", type=int, help="overrides --expansion-factor")
    sae.add_argument("-k", "--k", type=int, default=10, help="active latents per row")
    sae.add_argument("--k-aux", type=int, default=256, help="dead latents used by AuxK")
    sae.add_argument("--auxk-alpha", type=float, default=1 / 32, help="weight of the AuxK loss")
    sae.add_argument("--batch-size", type=int, default=4096, help="rows per training step")
    sae.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    sae.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up")
    sae.add_argument(
        "--dead-after",
        type=int,
        default=10_000_000,
        help="a latent silent for this many samples counts as dead",
    )
    sae.add_argument(
        "--buffer-size",
        type=int,
        default=65536,
        help="rows held per SAE before training starts drawing batches",
    )

    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out")
    run.add_argument("--write-shards", help="also write the activations as fp16 shards here")
    run.add_argument("--from-shards", help="train from shards instead of generating")
    run.add_argument("--push-to-hub", metavar="REPO", help="upload the SAEs to this Hub repo")
    args = p.parse_args(argv)
    if not (args.prompts or args.dataset or args.from_shards):
        p.error("give --prompts FILE, --dataset NAME or --from-shards FOLDER")
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite contradict each other; choose one")
    return args


def prepare_output(args: argparse.Namespace, state: PartialState) -> Checkpointer:
    out = Path(args.out)
    checkpoints = Checkpointer(out / "checkpoints")
    earlier = out.exists() and any(out.iterdir())
    if earlier and not (args.resume or args.overwrite):
        raise SystemExit(
            f"error: {out} already holds a run; pass --resume to continue it "
            "or --overwrite to start again"
        )
    if args.resume and checkpoints.latest() is None:
        raise SystemExit(f"error: --resume, but {out} has no checkpoint to resume from")
    if args.overwrite and earlier and state.is_main_process:
        shutil.rmtree(out)
    state.wait_for_everyone()
    return checkpoints


def check_resumable(args: argparse.Namespace, saved: dict, world_size: int) -> None:
    changed = [k for k in RESUME_MUST_MATCH if saved["args"].get(k) != vars(args).get(k)]
    if changed:
        raise SystemExit(
            f"error: cannot resume: these settings differ from the run being "
            f"resumed: {', '.join('--' + c.replace('_', '-') for c in changed)}"
        )
    if saved["world_size"] != world_size:
        raise SystemExit(
            f"error: cannot resume with {world_size} processes a run that used "
            f"{saved['world_size']}"
        )


def make_source(args, keys, state: PartialState):
    if args.from_shards:
        return ShardSource(args.from_shards, keys, rank=state.process_index)
    preset = get_preset(args.preset)
    prompts = (
        read_prompts(args.prompts)
        if args.prompts
        else dataset_prompts(args.dataset, args.column, args.split, args.limit)
    )
    prompts = prompts[: args.limit]
    if len(prompts) < state.num_processes:
        raise SystemExit(f"error: {len(prompts)} prompts for {state.num_processes} processes")
    if args.model:
        preset = get_preset(args.preset, model=args.model)
    pipe = load_pipeline(preset, device=args.device or str(state.device))
    resolve_blocks(pipe.unet, {k.block for k in keys})
    source = GenerationSource(
        pipe,
        prompts,
        keys,
        steps=args.steps or preset.steps,
        guidance_scale=preset.guidance_scale if args.guidance is None else args.guidance,
        batch_size=args.gen_batch,
        seed=args.seed,
        resolution=args.resolution or preset.resolution,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    return source


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


def train(args: argparse.Namespace) -> SAEBank | None:
    """Run training as `args` say; returns the SAEs, or None if interrupted."""
    state = PartialState()
    preset = get_preset(args.preset)
    blocks = args.blocks or list(preset.hook_points)
    keys = [SAEKey(b, t, br) for b in blocks for t in args.t for br in args.branches]
    source = make_source(args, keys, state)
    checkpoints = prepare_output(args, state)
    run = Run(args, keys, model_name=args.model or preset.model)
    if args.resume:
        check_resumable(args, checkpoints.saved_state(), state.num_processes)
        checkpoints.load(run)
        if state.is_main_process:
            print(f"resuming after round {run.next_round} of {source.num_rounds}", file=sys.stderr)
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
    if state.is_main_process:
        save_results(args, run, bank)
    state.wait_for_everyone()
    return bank


def train_rounds(run: Run, source, checkpoints: Checkpointer, stop: StopFlag) -> bool:
    """Feed every remaining round to the buffers and train; False if stopped early."""
    args = run.args
    writer = ShardWriter(args.write_shards, run.state.process_index) if args.write_shards else None
    tail_start = int(0.9 * source.num_rounds)
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
            bar.set_postfix(steps=sum(t.num_steps for t in run.trainers.values()))
            interrupted = agree_sum(int(stop.raised)) > 0
            if interrupted or run.steps_since_save >= args.save_every:
                checkpoints.save(run)
            if interrupted:
                return False
    return True


def save_results(args: argparse.Namespace, run: Run, bank: SAEBank) -> None:
    out = Path(args.out)
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
    print(f"saved {len(bank)} SAEs to {out / 'saes'}")
    if args.push_to_hub:
        bank.push_to_hub(args.push_to_hub)
        print(f"pushed to the Hub repo {args.push_to_hub}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return one_line_errors(lambda: 0 if train(args) is not None else 130)


if __name__ == "__main__":
    sys.exit(main())
