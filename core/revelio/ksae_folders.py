"""Where k-SAEs live: one folder per (layer, timestep), `<root>/<layer>/t<timestep:04d>/`.

Each folder is a `TopKSAE.save_pretrained` folder, so `SAEBank.from_pretrained(root)` loads
them all; an SAE's key is (layer, t = timestep / 1000, "cond") and its integer timestep is
kept in `cfg.metrics["timestep"]`.
"""

from pathlib import Path

from core.sae.bank import SAEBank
from core.sae.model import TopKSAE


def sae_t(timestep: int) -> float:
    """The SAEKey time of an integer DDPM timestep (t in [0, 1], 1 = noise)."""
    return timestep / 1000


def ksae_folder(root: str | Path, layer: str, timestep: int) -> Path:
    return Path(root) / layer / f"t{int(timestep):04d}"


def sae_timestep(sae: TopKSAE) -> int:
    """The integer timestep a k-SAE was trained at (from its metrics, else from t)."""
    if "timestep" in sae.cfg.metrics:
        return int(sae.cfg.metrics["timestep"])
    if sae.cfg.t is None:
        raise ValueError(f"the SAE for {sae.cfg.block} has no timestep; is it a k-SAE?")
    return round(sae.cfg.t * 1000)


def load_ksaes(folder: str | Path, device: str = "cpu") -> dict[tuple[str, int], TopKSAE]:
    """Every k-SAE under `folder`, keyed by (layer, integer timestep)."""
    bank = SAEBank.from_pretrained(Path(folder), device=device)
    return {(key.block, sae_timestep(sae)): sae for key, sae in bank.items()}
