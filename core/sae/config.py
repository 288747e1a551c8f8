"""An SAE's configuration (cfg.json), the names of its files and the error a checkpoint
that cannot be loaded raises. `core.sae.checkpoints` reads checkpoints; `core.sae.model` is
the module itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

CFG_FILE, WEIGHTS_FILE, STATS_FILE = "cfg.json", "sae.safetensors", "latent_stats.safetensors"
SITES = {
    "delta": "residual update (block output minus block input)",
    "output": "block output",
}
"""The activation of a block an SAE reads, and how messages name it."""


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
    stream: str = "image"
    """The block's tokens read: "image" (a U-Net's only stream) or a joint block's "text"."""
    layout: str = ""
    """The kind of denoiser the block belongs to (`core.diffusion.layouts`: "U-Net",
    "PixArt", "SD3", "FLUX"); empty where a checkpoint does not say."""
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


def describe_sae(block: str, t: float | None, branch: str) -> str:
    """As messages name an SAE: `mid_block.attentions.0 (t=0.5, cond)`."""
    time = "any t" if t is None else f"t={t:g}"
    return f"{block or '?'} ({time}, {branch})"
