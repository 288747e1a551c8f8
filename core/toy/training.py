"""Train the toy model from scratch on rendered shapes-world scenes, resumably.

Three phases, each leaving its result in `<out>/work/` so a restarted run skips what is done:

1. `vae`: the autoencoder learns to reconstruct scenes (MSE plus a small KL term).
2. `latents`: every scene is encoded once (posterior mean); the latents' standard deviation
   sets the VAE's `scaling_factor`, as Stable Diffusion's 0.18215 was set.
3. `denoiser`: U-Net and text encoder learn to predict the noise added to those latents
   (SD v1.4's noise schedule), with 10% of the captions dropped so that classifier-free
   guidance works. The loss is weighted by min-SNR-5 (Hang et al., 2023) and the weights
   that are saved are an exponential moving average (EMA) of the trained ones.

The DiT twin (`denoiser="pixart"`) reuses a trained toy's VAE, tokenizer and text encoder
(`reuse`, frozen): its VAE phase is that VAE, its latents are scaled by that VAE's own
factor, and its denoiser phase trains a PixArt-layout transformer alone, fed the text as
PixArt's pipeline feeds it (the encoder's states with their attention mask).

Training never sees the captions that `held_out` puts aside (a tenth of the world's), so
that the check (`core.toy.check`) can ask for captions of every kind, one-object ones
included, that the model has not learnt by heart.

A phase with a wall-clock budget (`vae_budget_s`, `denoiser_budget_s`) times its first
steps and sets its step count to fit the budget (at most `vae_steps`/`denoiser_steps`);
the count is written to `<out>/work/steps.json` and to the log, so that the same count
given as a fixed number of steps reproduces the run on any machine. A phase that still
outruns its budget by a fifth stops there and keeps what it has.

Every batch, noise draw and caption drop comes from a generator seeded by (seed, phase,
step), so a run that is interrupted and resumed ends with the same weights as one that
was not (exactly so on the CPU). On a GPU the data stay on the GPU, random numbers are
drawn there, and the loop reads nothing back from the GPU but every `log_every` steps.
Checkpoints are written atomically every `save_every`
steps and when `stop()` says so.
"""

import hashlib
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from core.diffusion.tiny import SD14_SCHEDULER
from core.files import atomic_write
from core.shapes.world import RADIUS_RANGE, Scene, dataset
from core.toy.model import (
    TOY_SCALES,
    ToyModelConfig,
    TwinConfig,
    assemble_pipeline,
    assemble_twin,
    build_toy_parts,
    toy_tokenizer,
    toy_transformer,
)

PHASES = ("vae", "latents", "denoiser")
DENOISERS = ("unet", "pixart")
HELD_OUT = 0.1
"""Share of the world's captions that training never sees, so that the check can ask for
captions of every kind (one-object ones included) the model has not learnt by heart."""


def held_out(caption: str) -> bool:
    """Whether `caption` belongs to the held-out share of captions (a fixed split by hash)."""
    digest = hashlib.sha256(caption.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < HELD_OUT


@dataclass(frozen=True)
class ToyTrainConfig:
    model: ToyModelConfig = TOY_SCALES["full"]
    """The model's sizes (`core.toy.model.TOY_SCALES` names some)."""
    seed: int = 0
    scenes: int = 60_000
    """Rendered training scenes (captions with 1 to `max_objects` objects)."""
    max_objects: int = 3
    radius_range: tuple[float, float] = RADIUS_RANGE
    """Object radius as a fraction of the image side (`core.shapes.world`)."""
    vae_steps: int = 3_000
    vae_batch: int = 128
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    denoiser_steps: int = 4_500
    denoiser_batch: int = 256
    denoiser_lr: float = 3e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    """Largest EMA decay; diffusers' EMA warm-up ramps up to it."""
    vae_budget_s: float | None = None
    """Wall-clock seconds for the VAE phase (None: exactly `vae_steps` steps)."""
    denoiser_budget_s: float | None = None
    """Wall-clock seconds for the denoiser phase (None: exactly `denoiser_steps` steps)."""
    save_every: int = 500
    log_every: int = 100
    denoiser: str = "unet"
    """"unet" (the toy model) or "pixart" (its DiT twin, `twin`)."""
    twin: TwinConfig = TwinConfig()
    """The twin's transformer (with `denoiser="pixart"`)."""
    reuse: str | None = None
    """A trained toy pipeline whose VAE, tokenizer and text encoder the twin keeps, frozen
    (required with `denoiser="pixart"`)."""

    def __post_init__(self) -> None:
        if self.denoiser not in DENOISERS:
            raise ValueError(
                f"denoiser must be one of {', '.join(DENOISERS)}, got {self.denoiser!r}"
            )
        if self.denoiser == "pixart" and not self.reuse:
            raise ValueError("the DiT twin needs `reuse`: a trained toy pipeline folder")

    def draw_scenes(self, n: int, seed: int, workers: int = 1) -> Iterator[Scene]:
        """`n` scenes of this run's world (its image size, object count and sizes)."""
        return dataset(
            n,
            seed,
            self.model.image_size,
            self.max_objects,
            workers=workers,
            radius_range=self.radius_range,
        )

    def training_scenes(self, workers: int = 1) -> Iterator[Scene]:
        """The `scenes` training scenes: drawn from `seed`, held-out captions left out.

        The whole draw is consumed even once enough scenes are kept, so that the processes
        rendering it end normally (a pool closed while its results wait can hang)."""
        kept = 0
        for scene in self.draw_scenes(
            math.ceil(1.2 * self.scenes / (1 - HELD_OUT)), self.seed, workers
        ):
            if kept < self.scenes and not held_out(scene.caption):
                kept += 1
                yield scene

    def to_json(self) -> dict:
        """The settings as `settings.json` holds them (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


TRAIN_SCALES: dict[str, ToyTrainConfig] = {
    "full": ToyTrainConfig(
        vae_steps=6_000, denoiser_steps=40_000, vae_budget_s=45, denoiser_budget_s=240
    ),
    "cpu": ToyTrainConfig(  # chosen by the pilots in docs/toy.md, for a 2-core CPU
        model=TOY_SCALES["cpu"],
        scenes=60_000,
        max_objects=2,
        radius_range=(0.18, 0.3),
        vae_steps=800,
        vae_batch=32,
        denoiser_steps=1_000_000,
        denoiser_batch=64,
        denoiser_lr=1e-3,
        warmup_steps=200,
        denoiser_budget_s=62 * 60,
        save_every=200,
    ),
    "smoke": ToyTrainConfig(
        model=TOY_SCALES["smoke"],
        scenes=64,
        vae_steps=12,
        vae_batch=16,
        denoiser_steps=12,
        denoiser_batch=16,
        warmup_steps=2,
        save_every=5,
        log_every=4,
    ),
}
PROBE_STEPS = (5, 25)
"""A budgeted phase times the steps from the first to the second number (after warm-up)."""
OVERRUN = 1.2
"""A budgeted phase stops once it has taken this multiple of its budget."""

Stop = Callable[[], bool]


def _never() -> bool:
    return False


def step_generator(seed: int, phase: str, step: int, device: torch.device) -> torch.Generator:
    """The generator of one training step on `device`, independent of every other step's."""
    entropy = np.random.SeedSequence([seed, PHASES.index(phase), step]).generate_state(2)
    return torch.Generator(device).manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Scenes:
    images: torch.Tensor
    """uint8 [N, 3, H, W]."""
    captions: list[str]


def render_scenes(config: ToyTrainConfig) -> Scenes:
    images, captions = [], []
    scenes = config.training_scenes(workers=os.cpu_count() or 1)
    for scene in tqdm(scenes, "render", total=config.scenes, unit="scene"):
        images.append(scene.image)
        captions.append(scene.caption)
    if len(images) < config.scenes:
        raise ValueError(f"drew only {len(images)} training scenes of {config.scenes}")
    return Scenes(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions)


def to_unit_range(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, torch.float32) / 127.5 - 1


class ToyTrainer:
    """One training run of the toy model in `out`; `run()` does whatever is left."""

    def __init__(self, out: str | Path, config: ToyTrainConfig, device: str | torch.device):
        self.out, self.config = Path(out), config
        self.work = self.out / "work"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.tokenizer, self.vae, self.text_encoder, self.denoiser = self._parts()
        self._scenes: Scenes | None = None
        self.log: dict[str, float] = {}

    def _parts(self) -> tuple:
        """(tokenizer, VAE, text encoder, denoiser): all new, or for the twin the reused
        toy's first three (the text encoder frozen) and a new transformer."""
        cfg = self.config
        if cfg.denoiser == "unet":
            tokenizer = toy_tokenizer(self.work / "tokenizer")
            return tokenizer, *build_toy_parts(cfg.model, tokenizer, cfg.seed)
        reused = Path(cfg.reuse)
        tokenizer = CLIPTokenizer.from_pretrained(reused / "tokenizer")
        vae = AutoencoderKL.from_pretrained(reused / "vae").float()
        text_encoder = CLIPTextModel.from_pretrained(reused / "text_encoder").float()
        text_encoder.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            transformer = toy_transformer(cfg.twin, cfg.model)
        return tokenizer, vae, text_encoder, transformer

    @property
    def scenes(self) -> Scenes:
        if self._scenes is None:
            self._scenes = render_scenes(self.config)
        return self._scenes

    def run(self, stop: Stop = _never) -> DiffusionPipeline | None:
        """Train what is not done yet; the pipeline (fp32, EMA weights), or None if stopped."""
        self._check_settings()
        if self.config.reuse and not (self.work / "vae.safetensors").is_file():
            save_file(self.vae.state_dict(), self.work / "vae.safetensors")  # trained already
        if not (self.work / "vae.safetensors").is_file():
            if not self._train("vae", stop, self._vae_loss()):
                return None
            save_file(self.vae.state_dict(), self.work / "vae.safetensors")
        self.vae.load_state_dict(load_file(self.work / "vae.safetensors"))
        if not (self.work / "latents.safetensors").is_file():
            self._encode_latents()
        data = load_file(self.work / "latents.safetensors")
        self.vae.register_to_config(scaling_factor=float(data["scaling_factor"]))
        if not self._train("denoiser", stop, self._denoiser_loss(data)):
            return None
        self._write_log()
        assemble = assemble_twin if self.config.denoiser == "pixart" else assemble_pipeline
        return assemble(self.vae, self.text_encoder, self.tokenizer, self.denoiser)

    def _check_settings(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        path, settings = self.work / "settings.json", self.config.to_json()
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != settings:
                changed = sorted(k for k in settings if saved.get(k) != settings[k])
                raise ValueError(
                    f"{self.out} holds a toy run with other settings ({', '.join(changed)}); "
                    "rerun with the same settings to resume, or pass --overwrite to start over"
                )
        else:
            path.write_text(json.dumps(settings, indent=2))

    def _modules(self, phase: str) -> list[torch.nn.Module]:
        if phase == "vae":
            return [self.vae]
        return [self.denoiser] if self.config.reuse else [self.denoiser, self.text_encoder]

    def _train(self, phase: str, stop: Stop, loss_of: Callable) -> bool:
        """Train one phase from its last checkpoint; False if `stop()` cut it short."""
        cfg = self.config
        lr = cfg.vae_lr if phase == "vae" else cfg.denoiser_lr
        modules = self._modules(phase)
        for m in modules:
            m.to(self.device, memory_format=torch.channels_last).train()
        params = [p for m in modules for p in m.parameters()]
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)
        ema = None
        if phase == "denoiser":
            ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, foreach=True)
        checkpoint = self.work / f"{phase}.pt"
        start = self._load_checkpoint(checkpoint, modules, optimizer, ema)
        budget = StepBudget(self, phase)
        running_loss = torch.zeros((), device=self.device)
        bar = tqdm(range(start, budget.steps), phase, initial=start, total=budget.steps)
        batch = cfg.vae_batch if phase == "vae" else cfg.denoiser_batch
        started = time.perf_counter()
        step = start
        while step < budget.steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, lr, cfg.warmup_steps, budget.steps)
            loss = loss_of(step_generator(cfg.seed, phase, step, self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            if ema is not None:
                ema.step(params)
            running_loss += loss.detach()
            step, stopping = step + 1, stop()
            budget.after(step)
            bar.total = budget.steps
            bar.update(1)
            if step % cfg.log_every == 0 or step == budget.steps:
                self.log[f"{phase}_loss"] = running_loss.item() / (
                    step % cfg.log_every or cfg.log_every
                )
                running_loss.zero_()
                rate = (step - start) * batch / (time.perf_counter() - started)
                bar.set_postfix(
                    loss=f"{self.log[f'{phase}_loss']:.4f}", samples_per_s=f"{rate:.0f}"
                )
            if step % cfg.save_every == 0 or step == budget.steps or stopping:
                self._save_checkpoint(checkpoint, modules, optimizer, ema, step)
            if stopping and step < budget.steps:
                return False
        self.log[f"{phase}_steps"] = budget.steps
        if budget.steps > start:
            seconds = time.perf_counter() - started
            self.log[f"{phase}_seconds"] = round(seconds, 1)
            self.log[f"{phase}_samples_per_s"] = (budget.steps - start) * batch / seconds
        if ema is not None:
            ema.copy_to(params)
        for m in modules:
            m.to(memory_format=torch.contiguous_format).eval()
        return True

    def _vae_loss(self) -> Callable:
        """The loss of one VAE step: reconstruction of scenes kept on the training device."""
        images = self.scenes.images.to(self.device)

        def loss(generator: torch.Generator) -> torch.Tensor:
            batch = self.config.vae_batch
            index = torch.randint(len(images), (batch,), generator=generator, device=self.device)
            x = to_unit_range(images[index], self.device)
            with self._autocast():
                posterior = self.vae.encode(x).latent_dist
                noise = torch.randn(posterior.mean.shape, generator=generator, device=self.device)
                z = posterior.mean + posterior.std * noise
                reconstruction = self.vae.decode(z).sample
            kl = posterior.kl().float().mean() / z[0].numel()
            return F.mse_loss(reconstruction.float(), x) + self.config.kl_weight * kl

        return loss

    @torch.no_grad()
    def _encode_latents(self) -> None:
        self.vae.to(self.device).eval()
        chunks = []
        for batch in self.scenes.images.split(1024):
            posterior = self.vae.encode(to_unit_range(batch, self.device)).latent_dist
            chunks.append(posterior.mean.float().cpu())
        latents = torch.cat(chunks)
        reused = torch.tensor(self.vae.config.scaling_factor)  # the scale it was trained with
        scale = reused if self.config.reuse else 1 / latents.std()
        text = self.tokenizer(
            self.scenes.captions, padding="max_length", truncation=True, return_tensors="pt"
        )
        self.log["vae_reconstruction_mse"] = self._reconstruction_mse(latents[:256])
        tensors = {
            "latents": (latents * scale).half().contiguous(),
            "tokens": text.input_ids.int(),
            "masks": text.attention_mask.bool(),
            "scaling_factor": scale,
        }
        save_file(tensors, self.work / "latents.safetensors")
        self._write_log()

    @torch.no_grad()
    def _reconstruction_mse(self, latents: torch.Tensor) -> float:
        decoded = self.vae.decode(latents.to(self.device)).sample.clamp(-1, 1)
        truth = to_unit_range(self.scenes.images[: len(latents)], self.device)
        return float(F.mse_loss(decoded, truth))

    def _denoiser_loss(self, data: dict[str, torch.Tensor]) -> Callable:
        """The loss of one step: min-SNR-weighted noise prediction on cached latents."""
        latents = data["latents"].to(self.device)
        tokens = data["tokens"].to(self.device, torch.long)
        masks = data.get("masks")  # the twin's text masks (caches before it lack them)
        masks = None if masks is None else masks.to(self.device)
        nothing = self.tokenizer("", padding="max_length", return_tensors="pt")
        empty = nothing.input_ids[0].to(self.device)
        empty_mask = nothing.attention_mask[0].bool().to(self.device)
        noise_schedule = DDPMScheduler(
            **{k: v for k, v in SD14_SCHEDULER.items() if k != "set_alpha_to_one"}
        )
        timesteps = noise_schedule.config.num_train_timesteps
        snr = compute_snr(noise_schedule, torch.arange(timesteps)).to(self.device)
        weight = snr.clamp(max=self.config.min_snr_gamma) / snr
        cfg, device = self.config, self.device

        def loss(generator: torch.Generator) -> torch.Tensor:
            batch = cfg.denoiser_batch
            index = torch.randint(len(latents), (batch,), generator=generator, device=device)
            drop = torch.rand(batch, generator=generator, device=device) < cfg.caption_dropout
            ids = torch.where(drop[:, None], empty, tokens[index])
            mask = None if masks is None else torch.where(drop[:, None], empty_mask, masks[index])
            x0 = latents[index].float()
            noise = torch.randn(x0.shape, generator=generator, device=device)
            t = torch.randint(timesteps, (batch,), generator=generator, device=device)
            noisy = noise_schedule.add_noise(x0, noise, t)
            with self._autocast():
                prediction = self._predict(noisy, t, ids, mask)
            per_sample = F.mse_loss(prediction.float(), noise, reduction="none").mean((1, 2, 3))
            return (per_sample * weight[t]).mean()

        return loss

    def _predict(self, noisy: torch.Tensor, t: torch.Tensor, ids, mask) -> torch.Tensor:
        """The denoiser's noise prediction, given the text as its pipeline gives it: the
        U-Net the encoder's states; PixArt's transformer the (frozen) encoder's states of
        the masked tokens and the mask."""
        if self.config.denoiser == "unet":
            context = self.text_encoder(ids)[0]
            noisy = noisy.contiguous(memory_format=torch.channels_last)
            return self.denoiser(noisy, t, context).sample
        with torch.no_grad():
            context = self.text_encoder(ids, attention_mask=mask)[0]
        return self.denoiser(
            noisy,
            encoder_hidden_states=context,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample

    def _autocast(self):
        enabled = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _save_checkpoint(self, path: Path, modules, optimizer, ema, step: int) -> None:
        state = {
            "step": step,
            "modules": [m.state_dict() for m in modules],
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
        }
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    def _load_checkpoint(self, path: Path, modules, optimizer, ema) -> int:
        if not path.is_file():
            return 0
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
            for module, weights in zip(modules, state["modules"], strict=True):
                module.load_state_dict(weights)
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as error:
            raise ValueError(
                f"the checkpoint {path} is unreadable ({type(error).__name__}); delete it to "
                "redo that phase from its start, or pass --overwrite to start over"
            ) from error
        print(f"resuming {path.stem} at step {state['step']}", file=sys.stderr)
        return int(state["step"])

    def _write_log(self) -> None:
        path = self.work / "log.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**saved, **self.log}, indent=2))


class StepBudget:
    """The step count of one phase: fixed, or fitted to a wall-clock budget.

    A budgeted phase times steps `PROBE_STEPS` of this process, then sets its count so that
    the whole phase fits the budget, and writes the count to `work/steps.json`, where a
    resumed run finds it. If the phase still takes `OVERRUN` times its budget, the count
    becomes the steps done.
    """

    def __init__(self, trainer: ToyTrainer, phase: str):
        cfg = trainer.config
        self.phase, self.device = phase, trainer.device
        self.path = trainer.work / "steps.json"
        self.budget = cfg.vae_budget_s if phase == "vae" else cfg.denoiser_budget_s
        self.steps = cfg.vae_steps if phase == "vae" else cfg.denoiser_steps
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if phase in saved:
            self.steps, self.budget = saved[phase]["steps"], None
        self.started = time.perf_counter()
        self.probe_start: float | None = None
        self.steps_taken = 0

    def after(self, step: int) -> None:
        """Called after each step; may change `steps`."""
        if self.budget is None:
            return
        self.steps_taken += 1
        if self.steps_taken in PROBE_STEPS:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            if self.steps_taken == PROBE_STEPS[0]:
                self.probe_start = now
            else:
                per_step = (now - self.probe_start) / (PROBE_STEPS[1] - PROBE_STEPS[0])
                elapsed = now - self.started
                fitted = min(self.steps, step + max(0, int((self.budget - elapsed) / per_step)))
                self._settle(fitted, per_step, {"fitted_at_step": step, "elapsed_s": elapsed})
        elif (
            self.steps_taken > PROBE_STEPS[1]
            and step < self.steps
            and time.perf_counter() - self.started > OVERRUN * self.budget
        ):
            self._settle(step, None)

    def _settle(self, steps: int, seconds_per_step: float | None, fit: dict | None = None) -> None:
        """Set the count; `fit` records when it was fitted (the step, the seconds elapsed)."""
        self.steps = steps
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        entry = {"steps": steps, "budget_s": self.budget, "seconds_per_step": seconds_per_step}
        entry |= fit or {}
        if seconds_per_step is None:
            entry["seconds_per_step"] = saved.get(self.phase, {}).get("seconds_per_step")
            entry["stopped_at_overrun"] = True
        saved[self.phase] = entry
        self.path.write_text(json.dumps(saved, indent=2))
        print(f"{self.phase}: {steps} steps fit the {self.budget:g} s budget", file=sys.stderr)
