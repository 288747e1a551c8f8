"""Diff-C: Revelio's light classifier on unpooled diffusion feature maps.

Architecture (the paper's Table 10; 40M parameters for 1280 input channels):

    conv1  3x3, 1024 channels           [B, 1024, H, W]
    conv2  3x3, 1024 channels, stride 2 [B, 1024, H/2, W/2]
    conv3  3x3, 1024 channels, stride 2 [B, 1024, H/4, W/4]
    conv4  3x3, 1024 channels, stride 2 [B, 1024, H/8, W/8]
    GAP    global average pooling       [B, 1024, 1, 1]
    FC     flatten + linear             [B, num_classes]

Table 10 names no normalisation or activation, yet without a non-linearity the whole head
would collapse into one linear map of the input. Each conv is therefore followed by
BatchNorm and ReLU, and the input by a parameter-free BatchNorm (feature scales differ a lot
between layers and timesteps), as in the authors' released classifier; its dropout is an
option (`dropout`, 0 by default: the paper does not mention it). Recipe (Sec. 4.1): AdamW,
lr 1e-4, batch 16, 30 epochs, cosine annealing to 5e-5.

`python -m core.revelio.diffc --cache CACHE --out FOLDER` trains one head per (layer, timestep)
on the cache's maps and reports top-1 test accuracy.
"""

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from simple_parsing import field
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.files import atomic_write, read_safetensors, write_csv
from core.revelio.cache_select import Selection, select_pairs
from core.revelio.feature_cache import FeatureMeta, feature_path, load_features, load_meta
from core.runtime import command

WEIGHTS_FILE, CSV_FILE = "diffc.safetensors", "accuracy.csv"


@dataclass
class DiffCConfig:
    in_channels: int
    """Channels of the feature maps (1280 for SD's bottleneck, up_ft0 and up_ft1)."""
    num_classes: int
    width: int = 1024
    """Channels of every conv (Table 10: 1024)."""
    dropout: float = 0.0
    """Dropout after each conv block and before the FC layer (not in the paper)."""


@dataclass
class Recipe:
    """How a head is trained: the paper's values by default."""

    epochs: int = 30
    """Passes over the training images."""
    batch_size: int = 16
    """Images per step."""
    lr: float = 1e-4
    """AdamW learning rate."""
    min_lr: float = 5e-5
    """The cosine schedule's floor (eta_min), reached after the last epoch."""
    weight_decay: float = 0.01
    """AdamW's weight decay, PyTorch's own value (the paper gives none)."""
    seed: int = 0
    """Seed of the held-out split, the initialisation and the batch order."""


def conv_block(in_channels: int, out_channels: int, stride: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
    )


class DiffC(nn.Module):
    def __init__(self, cfg: DiffCConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width, dropout = cfg.width, cfg.dropout
        self.input_norm = nn.BatchNorm2d(cfg.in_channels, affine=False)
        self.conv1 = conv_block(cfg.in_channels, width, 1, dropout)
        self.conv2 = conv_block(width, width, 2, dropout)
        self.conv3 = conv_block(width, width, 2, dropout)
        self.conv4 = conv_block(width, width, 2, dropout)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, cfg.num_classes)

    def forward(self, maps: Tensor) -> Tensor:
        """Logits [B, num_classes] of feature maps [B, in_channels, H, W]."""
        x = self.input_norm(maps)
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


@dataclass
class DiffCResult:
    model: DiffC
    top1: float
    """Top-1 accuracy on the test images after the last epoch."""
    train_top1: float
    """Top-1 accuracy on the training images (evaluation mode) after the last epoch."""
    history: list[dict] = field(default_factory=list)
    """Per epoch: lr, train loss and test top-1."""


def stratified_split(
    labels: Sequence[int], test_fraction: float, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(train, test) indices; each class with n images gives round(n * test_fraction) of them,
    at least 1 if n >= 2, to the test set."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"the test fraction must be in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    label_tensor = torch.as_tensor(labels)
    train, test = [], []
    for c in label_tensor.unique().tolist():
        members = (label_tensor == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = max(round(len(members) * test_fraction), 1 if len(members) >= 2 else 0)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def cache_split(meta: FeatureMeta, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """The split in meta.extra["split"] ("train"/"test" per image) if there is one, else a
    seeded stratified split."""
    split = meta.extra.get("split")
    if split is None:
        return stratified_split(meta.labels, test_fraction, seed)
    if len(split) != len(meta) or not set(split) <= {"train", "test"}:
        raise ValueError(
            f'meta.extra["split"] must give "train" or "test" for each of the {len(meta)} images'
        )
    is_test = torch.tensor([s == "test" for s in split])
    return (~is_test).nonzero().squeeze(1), is_test.nonzero().squeeze(1)


@torch.no_grad()
def accuracy(model: DiffC, maps: Tensor, labels: Tensor, batch_size: int = 64) -> float:
    """Top-1 accuracy of the model (in evaluation mode) on maps [N, C, H, W]."""
    if len(maps) == 0:
        return float("nan")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(maps), batch_size):
        batch = maps[start : start + batch_size].to(device, torch.float32)
        correct += (model(batch).argmax(dim=1).cpu() == labels[start : start + batch_size]).sum()
    return int(correct) / len(maps)


def train_epoch(
    model: DiffC,
    optimizer: torch.optim.Optimizer,
    maps: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass over the training images in a seeded order; the mean loss."""
    model.train()
    device = next(model.parameters()).device
    order = torch.randperm(len(maps), generator=generator)
    losses = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if len(index) < 2:  # BatchNorm needs two samples; the last batch may have one
            continue
        logits = model(maps[index].to(device, torch.float32))
        loss = F.cross_entropy(logits, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


def train_diffc(
    train_maps: Tensor,
    train_labels: Tensor,
    test_maps: Tensor,
    test_labels: Tensor,
    cfg: DiffCConfig,
    recipe: Recipe | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> DiffCResult:
    """Train a head on (train_maps, train_labels), measuring it on the test pair after every
    epoch. Maps are [N, C, H, W] (any float dtype), labels [N] int. Seeds torch's global RNG."""
    recipe = recipe or Recipe()
    if len(train_maps) < 2:
        raise ValueError(f"Diff-C needs at least 2 training images, got {len(train_maps)}")
    torch.manual_seed(recipe.seed)
    model = DiffC(cfg).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=recipe.epochs, eta_min=recipe.min_lr
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    history = []
    for _ in tqdm(range(recipe.epochs), desc="epochs", disable=not progress):
        lr = optimizer.param_groups[0]["lr"]
        loss = train_epoch(model, optimizer, train_maps, train_labels, recipe.batch_size, generator)
        schedule.step()
        top1 = accuracy(model, test_maps, test_labels)
        history.append({"lr": lr, "train_loss": loss, "test_top1": top1})
    top1 = history[-1]["test_top1"] if history else accuracy(model, test_maps, test_labels)
    train_top1 = accuracy(model, train_maps, train_labels)
    return DiffCResult(model.cpu(), top1, train_top1, history)


def save_diffc(path: str | Path, model: DiffC, info: dict) -> Path:
    """Weights as safetensors, with the config and `info` (JSON) in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    header = {"config": json.dumps(asdict(model.cfg)), "info": json.dumps(info)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, header))
    return path


def load_diffc(path: str | Path, device: str = "cpu") -> tuple[DiffC, dict]:
    """A head saved by save_diffc, and its info."""
    tensors = read_safetensors(Path(path), device)
    with safe_open(path, "pt") as f:
        header = f.metadata() or {}
    if "config" not in header:
        raise ValueError(f"{path} is not a Diff-C checkpoint (no config in its header)")
    model = DiffC(DiffCConfig(**json.loads(header["config"])))
    model.load_state_dict(tensors)
    return model.to(device).eval(), json.loads(header.get("info", "{}"))


def require_maps(cache: str | Path, layer: str, timestep: int) -> None:
    if not feature_path(cache, layer, timestep, "maps").is_file():
        raise ValueError(
            f"the cache at {cache} has no unpooled feature maps for {layer} at t={timestep}; "
            "Diff-C needs them: re-extract the features with --maps"
        )


@dataclass
class AccuracyRow:
    layer: str
    timestep: int
    top1: float
    train_top1: float
    epochs: int
    train_images: int
    test_images: int
    channels: int
    height: int
    width: int


def format_table(rows: Sequence[AccuracyRow]) -> str:
    """Top-1 accuracy (%), one row per timestep, one column per layer (as the paper's tables)."""
    layers = list(dict.fromkeys(r.layer for r in rows))
    timesteps = list(dict.fromkeys(r.timestep for r in rows))
    cells = {(r.layer, r.timestep): f"{100 * r.top1:.2f}" for r in rows}
    width = max(12, *(len(layer) for layer in layers))
    lines = [f"{'timestep':>8}  " + "  ".join(f"{layer:>{width}}" for layer in layers)]
    for t in timesteps:
        values = (cells.get((layer, t), "-") for layer in layers)
        lines.append(f"{t:>8}  " + "  ".join(f"{v:>{width}}" for v in values))
    return "\n".join(lines)


@dataclass
class DiffCRunConfig:
    """Settings of `python -m core.revelio.diffc`."""

    cache: Path
    """Feature cache folder (extracted with --maps)."""
    out: Path
    """Folder for checkpoints and accuracy.csv."""
    recipe: Recipe = field(default_factory=Recipe)
    width: int = DiffCConfig.width
    """Channels of every conv (Table 10's)."""
    dropout: float = DiffCConfig.dropout
    """Dropout after each conv block and before the FC layer (not in the paper)."""
    test_cache: Path | None = None
    """Cache of the test split (same classes, layers and timesteps); default: hold out images."""
    test_fraction: float = 0.2
    """Share of each class held out, unless meta.extra["split"] gives the split."""
    select: Selection = field(default_factory=Selection)


def pair_data(
    config: DiffCRunConfig,
    meta: FeatureMeta,
    split: tuple[Tensor, Tensor] | None,
    pair: tuple[str, int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train maps, train labels, test maps, test labels) of one (layer, timestep): the cache
    split by `split`, or, when split is None, the whole cache against the whole --test-cache."""
    maps = load_features(config.cache, *pair, "maps")
    labels = torch.as_tensor(meta.labels)
    if split is None:
        test_labels = torch.as_tensor(load_meta(config.test_cache).labels)
        return maps, labels, load_features(config.test_cache, *pair, "maps"), test_labels
    train, test = split
    return maps[train], labels[train], maps[test], labels[test]


def run_pair(
    config: DiffCRunConfig,
    meta: FeatureMeta,
    split: tuple[Tensor, Tensor] | None,
    pair: tuple[str, int],
) -> AccuracyRow:
    """Train, test and save the head of one (layer, timestep)."""
    train_maps, train_labels, test_maps, test_labels = pair_data(config, meta, split, pair)
    channels, height, width = train_maps.shape[1:]
    cfg = DiffCConfig(channels, len(meta.classes), config.width, config.dropout)
    result = train_diffc(
        train_maps,
        train_labels,
        test_maps,
        test_labels,
        cfg,
        config.recipe,
        device=config.select.device,
        progress=True,
    )
    row = AccuracyRow(
        *pair,
        result.top1,
        result.train_top1,
        config.recipe.epochs,
        len(train_maps),
        len(test_maps),
        channels,
        height,
        width,
    )
    folder = config.out / pair[0] / f"t{pair[1]:04d}"
    info = {**asdict(row), "recipe": asdict(config.recipe), "classes": meta.classes}
    save_diffc(folder / WEIGHTS_FILE, result.model, info)
    (folder / "history.json").write_text(json.dumps(result.history, indent=2) + "\n")
    return row


def check_test_cache(config: DiffCRunConfig, meta: FeatureMeta, pairs: list) -> None:
    test_meta = load_meta(config.test_cache)
    if test_meta.classes != meta.classes:
        raise ValueError(
            f"the test cache {config.test_cache} has other classes than {config.cache}; "
            "extract both with the same class list"
        )
    for layer, timestep in pairs:
        require_maps(config.test_cache, layer, timestep)


def train_heads(config: DiffCRunConfig) -> list[AccuracyRow]:
    """A head per (layer, timestep) asked for, saved under config.out with accuracy.csv."""
    meta = load_meta(config.cache)
    pairs = select_pairs(meta, config.select.layers, config.select.timesteps)
    for layer, timestep in pairs:
        require_maps(config.cache, layer, timestep)
    split = None
    if config.test_cache:
        check_test_cache(config, meta, pairs)
    else:
        split = cache_split(meta, config.test_fraction, config.recipe.seed)
        if len(split[1]) == 0:
            raise ValueError("the split leaves no test images; raise --test-fraction")
    rows = [run_pair(config, meta, split, pair) for pair in pairs]
    write_csv(config.out / CSV_FILE, [asdict(row) for row in rows])
    print(f"top-1 test accuracy (%), {rows[0].test_images} test images:")
    print(format_table(rows))
    return rows


main = command(DiffCRunConfig, train_heads, "python -m core.revelio.diffc", __doc__)

if __name__ == "__main__":
    sys.exit(main())
