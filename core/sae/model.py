"""TopK sparse autoencoders (SAEs) on activations of diffusion-model blocks.

An SAE maps an activation x in R^d to a code z in R^n (n >> d) with at most k non-zero
entries, and reconstructs x from it:

    z     = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))
    x_hat = W_dec^T z + b_dec

The rows of W_dec have unit norm; they are the concept vectors: latent i adds z_i * W_dec[i]
to the reconstruction. Training backpropagates through the kept latents only
(core.sae.sparse_ops). The activation x is read at one site of its block (`SITES`): this
project's SAEs read the residual update, SAeUron's the block's output.

Checkpoints use EleutherAI sparsify's layout (cfg.json + sae.safetensors). A cfg.json that
sparsify itself wrote (no `block` key) is read as SAeUron publishes its SAEs: site `output`,
every t, branch `cond`, the block named by the folder (`unet.<block>`). SDLens checkpoints
(config.json + state_dict.pth, in a run folder's `final/`) load as well, with their per-latent
mean activations (mean.pt), which set the unit of steering strengths.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import huggingface_hub
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from core import files
from core.files import atomic_write, local_or_snapshot, write_json
from core.runtime import CorruptFileError
from core.sae.sparse_ops import encoder_acts_at

CFG_FILE, WEIGHTS_FILE, STATS_FILE = "cfg.json", "sae.safetensors", "latent_stats.safetensors"
SDLENS_CFG_FILE, SDLENS_WEIGHTS_FILE, SDLENS_MEAN_FILE = "config.json", "state_dict.pth", "mean.pt"
SDLENS_FILES = (SDLENS_CFG_FILE, SDLENS_WEIGHTS_FILE, SDLENS_MEAN_FILE)
"""What is loaded of an SDLens checkpoint (its std.pt is not)."""
SDLENS_FINAL = "final"
"""The subfolder of an SDLens run that holds the finished SAE, beside numbered step folders."""
EXPECTED_FILES = (
    f"{CFG_FILE} + {WEIGHTS_FILE} (sparsify, SAeUron, this project) or {SDLENS_CFG_FILE} + "
    f"{SDLENS_WEIGHTS_FILE} (SDLens, also in a run's {SDLENS_FINAL}/)"
)
TRAIN_HINT = "train one with `python -m core.training.train` or pass a local folder"
SITES = {
    "delta": "residual update (block output minus block input)",
    "output": "block output",
}
"""The activation of a block an SAE reads, and how messages name it."""

logger = logging.getLogger(__name__)


class SAELoadError(ValueError):
    """An SAE checkpoint is missing, corrupt or inconsistent; the message says what to do."""


@dataclass
class SAEConfig:
    d_in: int
    """Width of the activations the SAE reads (channels of the block's residual update)."""
    num_latents: int
    """Number of latents n, i.e. of rows of the decoder (concept vectors)."""
    k: int
    """Number of latents kept per input by TopK."""
    model: str = ""
    """Diffusion model the activations come from, e.g. a Hub id."""
    block: str = ""
    """Module path of the block whose residual update is encoded."""
    t: float | None = None
    """Denoising time in [0, 1] (1 = pure noise) the SAE was trained at; None = any time."""
    branch: str = "cond"
    """Classifier-free-guidance branch the activations come from: "cond" or "uncond"."""
    site: str = "delta"
    """The activation of the block read: "delta" (the residual update) or "output" (SITES)."""
    input_scale: float = 1.0
    """Scalar the training inputs were multiplied by. Informational: weights are in raw units."""
    seed: int | None = None
    """Seed of the initial weights, when the project trained the SAE (None: unknown)."""
    metrics: dict = field(default_factory=dict)
    """Training metrics (fvu, l0, dead fraction, ...)."""

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.num_latents:
            raise ValueError(f"k must be in [1, num_latents={self.num_latents}], got {self.k}")
        if self.branch not in ("cond", "uncond"):
            raise ValueError(f'branch must be "cond" or "uncond", got {self.branch!r}')
        if self.site not in SITES:
            raise ValueError(f"site must be one of {', '.join(SITES)}, got {self.site!r}")
        if self.t is not None:
            self.t = float(self.t)

    @property
    def expansion_factor(self) -> int:
        """num_latents // d_in; written to cfg.json because sparsify reads it."""
        return self.num_latents // self.d_in

    def to_dict(self) -> dict:
        extra = {"expansion_factor": self.expansion_factor, "normalize_decoder": True}
        return {**asdict(self), **extra}

    @classmethod
    def from_dict(cls, d: dict) -> SAEConfig:
        """Build from a cfg.json dict, ignoring keys this class does not know.

        sparsify writes extra keys (activation, multi_topk, ...) and may write num_latents = 0,
        which means expansion_factor * d_in.
        """
        d = dict(d)
        if not d.get("num_latents") and "expansion_factor" in d and "d_in" in d:
            d["num_latents"] = d["expansion_factor"] * d["d_in"]
        missing = [name for name in ("d_in", "num_latents", "k") if name not in d]
        if missing:
            raise SAELoadError(f"the SAE config lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in known})


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


def describe_sae(block: str, t: float | None, branch: str) -> str:
    """As messages name an SAE: `mid_block.attentions.0 (t=0.5, cond)`."""
    time = "any t" if t is None else f"t={t:g}"
    return f"{block or '?'} ({time}, {branch})"


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of an SAE file; a damaged file is an SAELoadError that says what to do."""
    try:
        return files.read_safetensors(path, device)
    except CorruptFileError as e:
        raise _corrupt(path, e.__cause__) from e


def _corrupt(path: Path, error: Exception) -> SAELoadError:
    return SAELoadError(
        f"the checkpoint at {path} is corrupt or truncated ({error}); re-download it or retrain"
    )


def _weighted_rows(rows: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
    """sum_j weights[:, j] * rows[indices[:, j]], without a dense [N, n] matrix."""
    return F.embedding_bag(indices, rows, per_sample_weights=weights.to(rows.dtype), mode="sum")


def _total_variance(x: Tensor) -> Tensor:
    return (x - x.mean(dim=0)).pow(2).sum()


def push_folder(
    save: Callable[[str], object],
    repo_id: str,
    subfolder: str | None,
    private: bool,
    token: str | None,
    commit_message: str,
) -> object:
    """save(tmp_folder), then upload that folder to `repo_id` (created if needed)."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, path_in_repo=subfolder, commit_message=commit_message
        )


def resolve_source(
    path_or_repo_id: str | os.PathLike,
    allow_patterns: list[str] | None,
    revision: str | None,
    subfolder: str | None = None,
) -> Path:
    what = f"{path_or_repo_id}/{subfolder}" if subfolder else str(path_or_repo_id)
    try:
        return local_or_snapshot(path_or_repo_id, allow_patterns, revision, what)
    except FileNotFoundError as e:
        raise SAELoadError(f"{e}; {TRAIN_HINT}") from e


def _checkpoint_format(folder: Path) -> str | None:
    if (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return "native"
    if (folder / SDLENS_CFG_FILE).is_file() and (folder / SDLENS_WEIGHTS_FILE).is_file():
        return "sdlens"
    return None


def _intermediate(folder: Path) -> bool:
    """An SDLens checkpoint of a training step: a numbered folder beside its run's final/."""
    return folder.name.isdigit() and _checkpoint_format(folder) == "sdlens"


def checkpoint_folders(root: Path) -> list[Path]:
    """Every SAE checkpoint at or below `root`; of an SDLens run, only its final one."""
    candidates = {p.parent for name in (CFG_FILE, SDLENS_CFG_FILE) for p in root.rglob(name)}
    found = sorted(folder for folder in candidates if _checkpoint_format(folder))
    steps = [folder for folder in found if folder != root and _intermediate(folder)]
    for run in sorted({step.parent for step in steps}):
        _final_of(run, [step for step in steps if step.parent == run])
    return [folder for folder in found if folder not in steps]


def resolve_checkpoint(folder: Path) -> Path:
    """`folder` if it holds an SAE, else the final checkpoint of the SDLens run it is."""
    if _checkpoint_format(folder):
        return folder
    steps = sorted(p for p in folder.iterdir() if _intermediate(p)) if folder.is_dir() else []
    if not steps and not _checkpoint_format(folder / SDLENS_FINAL):
        raise SAELoadError(unknown_layout(folder))
    return _final_of(folder, steps)


def _final_of(run: Path, steps: list[Path]) -> Path:
    """The final/ checkpoint of an SDLens run; says which intermediate ones are passed over."""
    final = run / SDLENS_FINAL
    names = ", ".join(step.name for step in steps)
    if not _checkpoint_format(final):
        raise SAELoadError(
            f"the SDLens run {run} holds checkpoints of intermediate steps only ({names}) and "
            f"no {SDLENS_FINAL}/; pass the folder of the step to load"
        )
    passed_over = f", not those of steps {names}" if steps else ""
    logger.info("Loading the final checkpoint of the SDLens run %s%s.", run, passed_over)
    return final


def unknown_layout(folder: Path) -> str:
    """One sentence: no SAE at `folder`, what was expected and what is there instead."""
    return f"no SAE found at {folder}: expected {EXPECTED_FILES}, found {_contents(folder)}"


def _contents(folder: Path, shown: int = 6) -> str:
    if not folder.is_dir():
        return "no such folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "an empty folder"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _require_format(folder: Path) -> str:
    fmt = _checkpoint_format(folder)
    if fmt is None:
        raise SAELoadError(unknown_layout(folder))
    return fmt


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from e


SPARSIFY_OPTIONS = ("transcode", "skip_connection", "embed_skip", "gram_lookup", "input_unit_norm")
"""Options of sparsify's (and SAeUron's) cfg.json that make the SAE compute something other
than a plain TopK SAE; an SAE with any of them set is refused."""


def read_config(folder: Path) -> SAEConfig:
    """The config of the checkpoint in `folder`, in any layout this module reads.

    A cfg.json without a `block` key was written by sparsify: SAeUron publishes its SAEs that
    way, trained on the block's output, so its site is `output` unless the file says otherwise.
    SAeUron's `batch_topk` and `sample_topk` only shape training; it encodes with a per-position
    TopK, as this SAE does.
    """
    if _require_format(folder) == "sdlens":
        return _read_sdlens_config(folder)
    raw = _read_json(folder / CFG_FILE)
    options = [name for name in SPARSIFY_OPTIONS if raw.get(name)]
    if raw.get("activation", "topk") != "topk":
        options.append(f"activation={raw['activation']}")
    if options:
        raise SAELoadError(
            f"the SAE at {folder} uses {', '.join(options)}, which this project's TopK SAE does "
            "not implement"
        )
    if "block" not in raw:
        raw = {"site": "output", **raw}
    return SAEConfig.from_dict(raw)


def _read_sdlens_config(folder: Path) -> SAEConfig:
    raw = _read_json(folder / SDLENS_CFG_FILE)
    try:
        return SAEConfig(d_in=raw["d_model"], num_latents=raw["n_dirs_local"], k=raw["k"])
    except KeyError as e:
        raise SAELoadError(f"{folder / SDLENS_CFG_FILE} is not an SDLens config: no {e}") from e


def folder_block(relative: str) -> str:
    """The block an SAE folder is named after, for configs that do not name it: sparsify's
    hookpoint folder (SAeUron) `unet.up_blocks.1.attentions.1` and SDLens's run folder
    `unet.mid_block.attentions.0_k10_hidden5120_.../final` name `up_blocks.1.attentions.1` and
    `mid_block.attentions.0`."""
    name = relative.split("/")[0]
    name = name.removeprefix("unet.")
    return re.sub(r"_k\d+_.*$", "", name)


def _read_sdlens_tensors(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        state = state.get("state_dict", state)  # SDLens saves {"state_dict": ...}
        return {
            "encoder.weight": state["encoder.weight"],
            "encoder.bias": state["latent_bias"],
            "W_dec": state["decoder.weight"].T.contiguous(),
            "b_dec": state["pre_bias"],
        }
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, KeyError) as e:
        raise _corrupt(path, e) from e


def _read_mean_acts(path: Path, num_latents: int) -> Tensor:
    """SDLens's mean.pt: one mean activation per latent, saved from a GPU, read on the CPU."""
    try:
        mean = torch.load(path, weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        raise _corrupt(path, e) from e
    if not torch.is_tensor(mean) or mean.numel() != num_latents:
        found = f"shape {tuple(mean.shape)}" if torch.is_tensor(mean) else type(mean).__name__
        raise SAELoadError(
            f"{path} should hold one mean activation per latent ({num_latents} values) but "
            f"holds {found}; it belongs to another SAE"
        )
    return mean.reshape(num_latents).float()


def _check_tensors(tensors: dict[str, Tensor], cfg: SAEConfig, folder: Path) -> None:
    n, d = cfg.num_latents, cfg.d_in
    expected = {"encoder.weight": (n, d), "encoder.bias": (n,), "W_dec": (n, d), "b_dec": (d,)}
    if tensors.keys() != expected.keys():
        raise SAELoadError(
            f"the weights at {folder} are not a TopK SAE: they hold {sorted(tensors)}, "
            f"expected {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise SAELoadError(
                f"{name} at {folder} has shape {tuple(tensors[name].shape)} but the config "
                f"(d_in={d}, num_latents={n}) implies {shape}; the config and weights do not match"
            )


def load_folder(folder: Path, device: str | torch.device, cfg: SAEConfig | None = None) -> TopKSAE:
    fmt = _require_format(folder)
    cfg = cfg or read_config(folder)
    if fmt == "native":
        tensors = read_safetensors(folder / WEIGHTS_FILE)
    else:
        tensors = _read_sdlens_tensors(folder / SDLENS_WEIGHTS_FILE)
    _check_tensors(tensors, cfg, folder)
    with torch.device("meta"):
        sae = TopKSAE(cfg)
    sae.load_state_dict(tensors, assign=True)
    if (folder / STATS_FILE).is_file():
        sae.stats = LatentStats.load(folder / STATS_FILE, device)
    if (folder / SDLENS_MEAN_FILE).is_file():
        sae.mean_acts = _read_mean_acts(folder / SDLENS_MEAN_FILE, cfg.num_latents)
    return sae.to(device)
