"""Training of one TopK SAE: the optimisation step, dead-latent bookkeeping and checkpoints.

The trainer works in "training space": inputs are multiplied by a scalar input_scale chosen on
the first batch, so that one learning rate suits every block whatever its activation
magnitude. `export()` folds the scale back in, so saved SAEs work on raw activations.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from core.files import atomic_write
from core.sae.config import SAEConfig, SAELoadError
from core.sae.model import ForwardOutput, LatentStats, TopKSAE

CHECKPOINT_FILE = "trainer.safetensors"
STATE_KEY = "trainer_state"


@dataclass
class TrainConfig:
    expansion_factor: int = 4
    """Latents per input channel: num_latents = expansion_factor * d_in."""
    num_latents: int | None = None
    """Number of latents; overrides expansion_factor when set."""
    k: int = 10
    """Latents kept per input by TopK."""
    k_aux: int = 256
    """Dead latents used by the AuxK loss (at most the number of dead latents)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    batch_size: int = 4096
    """Rows per optimisation step (used by the caller that batches the activations)."""
    lr: float = 1e-4
    """Adam learning rate."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from lr / warmup_steps to lr (0: none)."""
    dead_after: int = 10_000_000
    """A latent is dead once it has not fired for this many training samples."""
    seed: int = 0
    """Seed of the weight initialisation (`derived_seed` gives each SAE of a run its own)."""

    def latents_for(self, d_in: int) -> int:
        return self.num_latents or self.expansion_factor * d_in


def derived_seed(seed: int, *parts: object) -> int:
    """A seed of its own for one part of a run, e.g. the (block, t, branch) of an SAE, from the
    run's seed. SAEs started from one seed share their initial weights, and comparisons that
    assume independent SAEs (lineage's null thresholds) then find matches that are only the
    shared start."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class SAETrainer:
    """Adam on fvu + auxk_alpha * auxk for one TopK SAE, with unit-norm decoder rows.

    Hyperparameters come from `cfg`; `model`, `block`, `t` and `branch` are recorded in the
    exported SAE's config.
    """

    def __init__(
        self,
        d_in: int,
        cfg: TrainConfig | None = None,
        *,
        model: str = "",
        block: str = "",
        t: float | None = None,
        branch: str = "cond",
        device: str | torch.device | None = None,
    ) -> None:
        self.cfg = cfg or TrainConfig()
        num_latents = self.cfg.latents_for(d_in)
        sae_cfg = SAEConfig(
            d_in,
            num_latents,
            self.cfg.k,
            model=model,
            block=block,
            t=t,
            branch=branch,
            seed=self.cfg.seed,
        )
        with torch.random.fork_rng(devices=[]):  # same init on every device, global RNG untouched
            torch.manual_seed(self.cfg.seed)
            self.sae = TopKSAE(sae_cfg)
        self.sae.to(device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.lr)
        self.input_scale: float | None = None
        self.samples_since_fired = torch.zeros(
            sae_cfg.num_latents, dtype=torch.int64, device=self.device
        )
        self.stats = LatentStats.zeros(sae_cfg.num_latents, device=self.device)
        self.num_steps = 0
        self.skipped_rows = 0
        self.grad_sync: Callable[[nn.Module], None] | None = None
        """Called on the SAE after each backward pass, e.g. to average gradients over processes."""
        self._metric_sums: dict[str, float] = {}
        self._metric_steps = 0

    @property
    def device(self) -> torch.device:
        return self.sae.b_dec.device

    @property
    def dead_mask(self) -> Tensor:
        """[n] bool: latents that have not fired in the last cfg.dead_after samples."""
        return self.samples_since_fired >= self.cfg.dead_after

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> float:
        """Set input_scale = sqrt(d / mean ||x||^2) and start b_dec at the scaled batch mean.

        Scaled inputs then have a mean square of 1 per channel. `step` calls this on the first
        batch if it was not called before. Rows holding NaN or inf are ignored.
        """
        x = x[torch.isfinite(x).all(dim=-1)]
        mean_sq_norm = x.float().pow(2).sum(dim=-1).mean().item()
        if not mean_sq_norm > 0:
            raise ValueError("cannot calibrate the input scale on all-zero activations")
        self.input_scale = math.sqrt(x.shape[-1] / mean_sq_norm)
        self.sae.b_dec.copy_(x.mean(dim=0) * self.input_scale)
        return self.input_scale

    def step(self, x: Tensor) -> dict[str, float]:
        """One Adam step on raw activations x [N, d].

        Rows holding NaN or inf are dropped and counted in `skipped_rows`. If fewer than two
        rows remain (the FVU needs a variance), nothing changes and {} is returned; otherwise
        the batch's fvu, explained_variance, l0, dead_fraction and auxk.
        """
        self.sae.check_input(x)
        x = x.to(self.device, self.sae.b_dec.dtype)
        finite = torch.isfinite(x).all(dim=-1)
        x = x[finite]
        self.skipped_rows += len(finite) - len(x)
        if len(x) < 2:
            return {}
        if self.input_scale is None:
            self.calibrate(x)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        out = self.sae(x * self.input_scale, dead_mask=self.dead_mask, k_aux=self.cfg.k_aux)
        loss = out.fvu + self.cfg.auxk_alpha * out.auxk_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_sync is not None:
            self.grad_sync(self.sae)
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.sae.set_decoder_norm_to_unit_norm()
        return self._record(out)

    def _lr(self) -> float:
        if self.cfg.warmup_steps <= 0:
            return self.cfg.lr
        return self.cfg.lr * min(1.0, (self.num_steps + 1) / self.cfg.warmup_steps)

    @torch.no_grad()
    def _record(self, out: ForwardOutput) -> dict[str, float]:
        acts, indices = out.top_acts.detach(), out.top_indices
        fired = torch.zeros_like(self.samples_since_fired, dtype=torch.bool)
        fired[indices[acts > 0]] = True
        self.samples_since_fired += len(acts)
        self.samples_since_fired.masked_fill_(fired, 0)
        self.stats.update(acts / self.input_scale, indices)
        self.num_steps += 1
        fvu = out.fvu.item()
        metrics = {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": (acts > 0).sum(dim=-1).float().mean().item(),
            "dead_fraction": self.dead_mask.float().mean().item(),
            "auxk": out.auxk_loss.item(),
        }
        for name, value in metrics.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value
        self._metric_steps += 1
        return metrics

    def mean_metrics(self, reset: bool = False) -> dict[str, float]:
        """Means of the step metrics since the last reset (the whole run if never reset)."""
        means = {name: s / self._metric_steps for name, s in self._metric_sums.items()}
        if reset:
            self._metric_sums, self._metric_steps = {}, 0
        return means

    def export(self) -> TopKSAE:
        """A copy of the SAE in raw units (input scale folded in), with stats and metrics."""
        sae = copy.deepcopy(self.sae)
        if self.input_scale is not None:
            sae.fold_input_scale(self.input_scale)
        sae.stats = copy.deepcopy(self.stats)
        sae.cfg.metrics = {
            **self.mean_metrics(),
            "num_steps": self.num_steps,
            "num_samples": self.stats.num_samples,
            "skipped_rows": self.skipped_rows,
        }
        return sae

    def state_dict(self) -> tuple[dict[str, Tensor], dict]:
        """Everything needed to resume bit-exactly: flat tensors + a JSON-able dict.

        The tensors are live views of the training state; save them before the next step.
        """
        tensors = {f"sae.{name}": t.detach() for name, t in self.sae.state_dict().items()}
        for param_id, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer.{param_id}.{name}": t for name, t in state.items()})
        tensors["samples_since_fired"] = self.samples_since_fired
        tensors.update({f"stats.{name}": t for name, t in self.stats.to_tensors().items()})
        meta = {
            "train_config": asdict(self.cfg),
            "sae_config": self.sae.cfg.to_dict(),
            "input_scale": self.input_scale,
            "num_steps": self.num_steps,
            "skipped_rows": self.skipped_rows,
            "metric_sums": self._metric_sums,
            "metric_steps": self._metric_steps,
        }
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore a state from `state_dict`; hyperparameters stay those of this trainer's cfg."""
        groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
        for key, t in tensors.items():
            prefix, _, name = key.partition(".")
            groups[prefix][name] = t.detach().clone()  # never share storage with the source
        self.sae.load_state_dict(groups["sae"])
        optimizer_state: dict[int, dict[str, Tensor]] = defaultdict(dict)
        for key, t in groups["optimizer"].items():
            param_id, _, name = key.partition(".")
            optimizer_state[int(param_id)][name] = t
        param_groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": param_groups})
        self.samples_since_fired.copy_(tensors["samples_since_fired"])
        self.stats = LatentStats.from_tensors(
            {name: t.to(self.device) for name, t in groups["stats"].items()}
        )
        self.sae.cfg = SAEConfig.from_dict(meta["sae_config"])
        self.input_scale = meta["input_scale"]
        self.num_steps = meta["num_steps"]
        self.skipped_rows = meta["skipped_rows"]
        self._metric_sums = dict(meta["metric_sums"])
        self._metric_steps = meta["metric_steps"]

    def save_checkpoint(self, folder: str | os.PathLike) -> Path:
        """Write folder/trainer.safetensors atomically, with the JSON state in its header.

        One file rather than a .safetensors + .json pair, so that an interrupted save can never
        leave tensors and state from two different steps.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_dict()
        tensors = {name: t.contiguous().cpu() for name, t in tensors.items()}
        path = folder / CHECKPOINT_FILE
        atomic_write(path, lambda tmp: save_file(tensors, tmp, {STATE_KEY: json.dumps(meta)}))
        return path

    @classmethod
    def from_checkpoint(
        cls, folder: str | os.PathLike, device: str | torch.device | None = None
    ) -> SAETrainer:
        """A trainer rebuilt from a checkpoint, hyperparameters included."""
        tensors, meta = read_checkpoint(folder)
        sae_cfg = meta["sae_config"]
        trainer = cls(
            sae_cfg["d_in"],
            TrainConfig(**meta["train_config"]),
            model=sae_cfg["model"],
            block=sae_cfg["block"],
            t=sae_cfg["t"],
            branch=sae_cfg["branch"],
            device=device,
        )
        trainer.load_state_dict(tensors, meta)
        return trainer


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """The (tensors, state) pair that SAETrainer.save_checkpoint wrote to `folder`."""
    path = Path(folder) / CHECKPOINT_FILE
    if not path.is_file():
        raise SAELoadError(f"no trainer checkpoint at {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {})[STATE_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise SAELoadError(
            f"the trainer checkpoint at {path} is corrupt or truncated ({e}); "
            "start again from an earlier checkpoint or retrain"
        ) from e
    return tensors, meta
