"""TopK sparse autoencoders (SAEs) on activations of diffusion-model blocks.

An SAE maps an activation x in R^d to a code z in R^n (n >> d) with at most k non-zero
entries, and reconstructs x from it:

    z     = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))
    x_hat = W_dec^T z + b_dec

The rows of W_dec have unit norm; they are the concept vectors: latent i adds z_i * W_dec[i]
to the reconstruction. Training backpropagates through the kept latents only
(core.sae.sparse_ops). The activation x is read at one site of its block (`SITES`): this
project's SAEs read the residual update, SAeUron's the block's output.

Checkpoints are read by `core.sae.checkpoints` (sparsify's layout, SAeUron's, SDLens's);
the configuration is `core.sae.config.SAEConfig`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from core.files import atomic_write, write_json
from core.sae.checkpoints import (
    push_folder,
    read_config,
    read_safetensors,
    read_weights,
    resolve_checkpoint,
    resolve_source,
    stats_path,
)
from core.sae.config import CFG_FILE, SITES, STATS_FILE, WEIGHTS_FILE, SAEConfig, describe_sae
from core.sae.sparse_ops import encoder_acts_at


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """[N, k] activations of the kept latents (>= 0)."""
    top_indices: Tensor
    """[N, k] indices of the kept latents."""
    pre_acts: Tensor
    """[N, n] ReLU pre-activations of all latents, before TopK; never carries a gradient."""


class ForwardOutput(NamedTuple):
    x_hat: Tensor
    """[N, d] reconstruction."""
    top_acts: Tensor
    """[N, k] activations of the kept latents."""
    top_indices: Tensor
    """[N, k] indices of the kept latents."""
    fvu: Tensor
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    auxk_loss: Tensor
    """AuxK loss (0 without dead latents), normalised like fvu."""


class TopKSAE(nn.Module):
    def __init__(
        self,
        cfg: SAEConfig,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        self.set_decoder_norm_to_unit_norm()
        self.stats: LatentStats | None = None
        self.mean_acts: Tensor | None
        """[n] mean activation of each latent, shipped with SDLens checkpoints (mean.pt); when
        set, steering strengths are multiples of it, as in the SDLens demo. A buffer, so that
        it follows the SAE's device, but not part of the saved weights."""
        self.register_buffer("mean_acts", None, persistent=False)

    @property
    def concept_vectors(self) -> Tensor:
        """[n, d] unit-norm directions the latents write into the activation space."""
        return self.W_dec.detach()

    def check_site(self, site: str) -> None:
        """Refuse to read or edit an activation site this SAE was not trained on."""
        if site != self.cfg.site:
            name = describe_sae(self.cfg.block, self.cfg.t, self.cfg.branch)
            raise ValueError(
                f"the SAE of {name} was trained on the {SITES[self.cfg.site]}, not on the "
                f"{SITES.get(site, repr(site))}, so it cannot read or edit that"
            )

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"this SAE expects width {self.cfg.d_in} but the activations have width "
                f"{x.shape[-1]}; was it trained for another block?"
            )
        if x.ndim != 2:
            raise ValueError(
                f"expected activations of shape [N, {self.cfg.d_in}], got {tuple(x.shape)}; "
                "flatten the leading dimensions first"
            )

    def encode(self, x: Tensor) -> EncoderOutput:
        """TopK code of x [N, d].

        The dense pre-activations are computed without gradient, for selection only; with
        gradients enabled, top_acts gets the gradient of the dense expression through the kept
        latents alone (core.sae.sparse_ops), which is much cheaper than differentiating [N, n].
        """
        self.check_input(x)
        x = x.to(self.b_dec.dtype)
        with torch.no_grad():
            pre_acts = F.relu_(self.encoder(x - self.b_dec))
            top_acts, top_indices = pre_acts.topk(self.cfg.k, dim=-1, sorted=False)
        top_acts = self._with_encoder_grad(x, top_indices, top_acts)
        return EncoderOutput(top_acts, top_indices, pre_acts)

    def _with_encoder_grad(self, x: Tensor, indices: Tensor, acts: Tensor) -> Tensor:
        """acts, differentiable with respect to x and the encoder parameters, b_dec included.

        Under torch.no_grad() (inference) acts is returned as is, without autograd machinery.
        """
        if not torch.is_grad_enabled():
            return acts
        W_enc, b_enc = self.encoder.weight, self.encoder.bias
        return encoder_acts_at(x, W_enc, b_enc, self.b_dec, indices, acts)

    def encode_dense(self, x: Tensor) -> Tensor:
        """[N, n] latents: zero except the top k of each row."""
        top_acts, top_indices, pre_acts = self.encode(x)
        return torch.zeros_like(pre_acts).scatter_(-1, top_indices, top_acts)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Reconstruct from a sparse code, reading only the k selected rows of W_dec."""
        return _weighted_rows(self.W_dec, top_acts, top_indices) + self.b_dec

    def forward(
        self, x: Tensor, dead_mask: Tensor | None = None, k_aux: int = 256
    ) -> ForwardOutput:
        top_acts, top_indices, pre_acts = self.encode(x)
        x = x.to(self.b_dec.dtype)
        x_hat = self.decode(top_acts, top_indices)
        residual = x - x_hat
        fvu = residual.pow(2).sum() / _total_variance(x)
        auxk_loss = self._auxk_loss(x, pre_acts, residual.detach(), dead_mask, k_aux)
        return ForwardOutput(x_hat, top_acts, top_indices, fvu, auxk_loss)

    def _auxk_loss(
        self, x: Tensor, pre_acts: Tensor, residual: Tensor, dead_mask: Tensor | None, k_aux: int
    ) -> Tensor:
        """AuxK (Gao et al. 2024): the k_aux most active dead latents reconstruct the residual.

        This gives dead latents a gradient towards what the live ones miss, reviving them; it
        reaches their encoder rows through the same sparse backward as the main TopK.
        """
        if dead_mask is None or not dead_mask.any():
            return pre_acts.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)  # [N, num_dead] below is at most pre_acts' size
        aux_acts, aux_positions = pre_acts[:, dead].topk(min(k_aux, len(dead)), dim=-1)
        aux_indices = dead[aux_positions]
        aux_acts = self._with_encoder_grad(x, aux_indices, aux_acts)
        residual_hat = _weighted_rows(self.W_dec, aux_acts, aux_indices)
        return (residual - residual_hat).pow(2).sum() / _total_variance(residual)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min(torch.finfo(self.W_dec.dtype).eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Drop the part of W_dec's gradient that would change the norm of its rows.

        The rows are renormalised after every step, so that part would only be undone, while
        still inflating Adam's second-moment estimates.
        """
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Turn an SAE trained on inputs x * s into the equivalent SAE on raw x, in place.

        With x' = s x, the trained SAE computes W_enc (s x - b_dec) + b_enc =
        s (W_enc (x - b_dec / s) + b_enc / s). ReLU and TopK commute with multiplication by a
        positive scalar, so its latents are s times those of the SAE with biases b_enc / s and
        b_dec / s and the same W_enc, and its reconstruction W_dec^T (s z) + b_dec is s times
        that SAE's W_dec^T z + b_dec / s. Dividing both biases by s therefore gives an SAE whose
        reconstruction of x is exactly the old one's of s x, divided by s, with the same
        (unit-norm) concept vectors and latents divided by s, i.e. in raw units. cfg.input_scale
        is multiplied by s (so it is s after the first fold). self.stats is left alone: record
        stats in raw units, as SAETrainer does.
        """
        if not s > 0:
            raise ValueError(f"the input scale must be positive, got {s}")
        self.encoder.bias.div_(s)
        self.b_dec.div_(s)
        self.cfg.input_scale *= s

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write cfg.json, sae.safetensors and (if self.stats is set) latent_stats.safetensors.

        Each file is replaced atomically; cfg.json is written last.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.stats is None:
            (folder / STATS_FILE).unlink(missing_ok=True)
        else:
            self.stats.save(folder / STATS_FILE)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
        write_json(folder / CFG_FILE, self.cfg.to_dict())
        return folder

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        *,
        device: str | torch.device = "cpu",
        revision: str | None = None,
    ) -> TopKSAE:
        """Load from a local folder or a Hub repo (only `subfolder` is downloaded).

        Reads the native/sparsify format and SDLens checkpoints (an SDLens run folder loads
        its final/). SDLens computes ReLU(TopK(W_enc (x - pre_bias) + latent_bias)), i.e. ReLU
        after TopK; the kept values that are positive are the same as ours, and the others
        contribute nothing either way.
        """
        patterns = [f"{subfolder}/*"] if subfolder else None
        root = resolve_source(path_or_repo_id, patterns, revision, subfolder)
        return load_folder(resolve_checkpoint(root / subfolder if subfolder else root), device)

    def push_to_hub(
        self,
        repo_id: str,
        subfolder: str | None = None,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload TopK SAE",
    ) -> object:
        """Upload this SAE (as save_pretrained writes it) to `repo_id`, under `subfolder`."""
        save = self.save_pretrained
        return push_folder(save, repo_id, subfolder, private, token, commit_message)


@dataclass(eq=False)
class LatentStats:
    fire_count: Tensor
    """[n] int64: number of inputs each latent was active (> 0) on."""
    act_sum: Tensor
    """[n] float64: sum of each latent's activations."""
    act_max: Tensor
    """[n]: largest activation of each latent."""
    num_samples: int = 0
    """Number of inputs seen."""

    @classmethod
    def zeros(cls, num_latents: int, device: str | torch.device | None = None) -> LatentStats:
        return cls(
            torch.zeros(num_latents, dtype=torch.int64, device=device),
            torch.zeros(num_latents, dtype=torch.float64, device=device),
            torch.zeros(num_latents, dtype=torch.float32, device=device),
        )

    @torch.no_grad()
    def update(self, top_acts: Tensor, top_indices: Tensor) -> None:
        indices, acts = top_indices.flatten(), top_acts.detach().flatten()
        self.fire_count.scatter_add_(0, indices, (acts > 0).long())
        self.act_sum.scatter_add_(0, indices, acts.to(self.act_sum.dtype))
        self.act_max.scatter_reduce_(0, indices, acts.to(self.act_max.dtype), reduce="amax")
        self.num_samples += top_acts.shape[0]

    @property
    def firing_frequency(self) -> Tensor:
        return self.fire_count.double() / max(self.num_samples, 1)

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation of each latent over the inputs it fired on."""
        return self.act_sum / self.fire_count.clamp_min(1)

    def to_tensors(self) -> dict[str, Tensor]:
        return {
            "fire_count": self.fire_count,
            "act_sum": self.act_sum,
            "act_max": self.act_max,
            "num_samples": torch.tensor(self.num_samples, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> LatentStats:
        return cls(
            tensors["fire_count"],
            tensors["act_sum"],
            tensors["act_max"],
            int(tensors["num_samples"]),
        )

    def save(self, path: str | os.PathLike) -> None:
        tensors = {name: t.contiguous().cpu() for name, t in self.to_tensors().items()}
        atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> LatentStats:
        return cls.from_tensors(read_safetensors(Path(path), device))


def _weighted_rows(rows: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
    """sum_j weights[:, j] * rows[indices[:, j]], without a dense [N, n] matrix."""
    return F.embedding_bag(indices, rows, per_sample_weights=weights.to(rows.dtype), mode="sum")


def _total_variance(x: Tensor) -> Tensor:
    return (x - x.mean(dim=0)).pow(2).sum()


def load_folder(folder: Path, device: str | torch.device, cfg: SAEConfig | None = None) -> TopKSAE:
    """The SAE of the checkpoint in `folder` (any layout `core.sae.checkpoints` reads)."""
    cfg = cfg or read_config(folder)
    tensors, mean_acts = read_weights(folder, cfg)
    with torch.device("meta"):
        sae = TopKSAE(cfg)
    sae.load_state_dict(tensors, assign=True)
    stats = stats_path(folder)
    if stats is not None:
        sae.stats = LatentStats.load(stats, device)
    sae.mean_acts = mean_acts
    return sae.to(device)
