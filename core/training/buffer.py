"""A fixed-capacity shuffle buffer of activation rows, with exact save and restore."""

import torch
from torch import Tensor


class ShuffleBuffer:
    """Rows go in as they are produced and come out in random order.

    Rows of one image are strongly correlated; drawing batches at random from a buffer
    that holds many images decorrelates them. Rows with NaN or inf are dropped on entry
    and counted in `skipped`. The buffer's rows and its random generator are part of
    `state_dict`, so a restored buffer hands out exactly the batches the original would.
    """

    def __init__(
        self,
        dim: int,
        capacity: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.dim = dim
        self.data = torch.empty(0, dim, dtype=dtype, device=device)
        self.size = 0
        self.capacity = capacity
        self.skipped = 0
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def full(self) -> bool:
        return self.size >= self.capacity

    def add(self, rows: Tensor) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"expected rows of width {self.dim}, got shape {tuple(rows.shape)}")
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            self.skipped += int((~finite).sum())
            rows = rows[finite]
        needed = self.size + rows.shape[0]
        if needed > self.data.shape[0]:
            size = max(needed, 2 * self.data.shape[0])
            grown = self.data.new_empty(size, self.dim)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : needed] = rows.to(self.data.device, self.data.dtype)
        self.size = needed

    def take(self, n: int) -> Tensor:
        """Remove and return `n` rows chosen uniformly at random (fewer if fewer are held)."""
        n = min(n, self.size)
        chosen = torch.randperm(self.size, generator=self.generator)[:n].to(self.data.device)
        batch = self.data[chosen].clone()
        keep_mask = torch.ones(self.size, dtype=torch.bool, device=self.data.device)
        keep_mask[chosen] = False
        new_size = self.size - n
        holes = chosen[chosen < new_size]
        movers = torch.nonzero(keep_mask[new_size:]).flatten() + new_size
        self.data[holes] = self.data[movers]
        self.size = new_size
        return batch

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "rows": self.data[: self.size].clone(),
            "generator": self.generator.get_state(),
            "skipped": torch.tensor(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.data = state["rows"].to(self.data.device, self.data.dtype)
        self.size = self.data.shape[0]
        self.generator.set_state(state["generator"])
        self.skipped = int(state["skipped"])
