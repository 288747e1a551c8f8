"""The shipped toy model's files: its model card, and the checksums in it that guard them.

The model card (`README.md` beside `pipeline/`, `saes/` and `check/`) ends with a block listing the
SHA-256 of every shipped file:

    ```sha256
    3f2a...  pipeline/unet/diffusion_pytorch_model.safetensors
    ```

`verify_assets` recomputes them before the model is loaded, so a missing, truncated or
altered file is reported by name instead of failing somewhere inside diffusers.
"""

import hashlib
import re
from pathlib import Path

CARD = "README.md"
SHIPPED = ("pipeline", "saes", "check")
"""The folders of the shipped toy model (check/: its report, the subset the tests rerun and
held-out captions, the preset's prompts)."""
_BLOCK = re.compile(r"```sha256\n(.*?)```", re.S)


class AssetError(ValueError):
    """A shipped file is missing or does not match the checksum in its model card."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shipped_files(root: Path) -> list[Path]:
    """Every file under the shipped folders of `root`, as sorted relative paths."""
    return sorted(
        path.relative_to(root)
        for folder in SHIPPED
        for path in (root / folder).rglob("*")
        if path.is_file()
    )


def checksum_block(root: Path) -> str:
    lines = [f"{sha256(root / path)}  {path.as_posix()}" for path in shipped_files(root)]
    return "```sha256\n" + "\n".join(lines) + "\n```\n"


def read_checksums(card: Path) -> dict[str, str]:
    """Relative path -> SHA-256, from the model card's checksum block."""
    match = _BLOCK.search(card.read_text(encoding="utf-8"))
    if not match:
        raise AssetError(f"the model card {card} has no ```sha256 block; it cannot be checked")
    pairs = (line.split(maxsplit=1) for line in match.group(1).splitlines() if line.strip())
    return {path: digest for digest, path in pairs}


def verify_assets(root: str | Path) -> None:
    """Raise `AssetError` naming the first missing or altered file under `root`."""
    root = Path(root)
    card = root / CARD
    how = (
        f"restore it (`git checkout -- {root}`) or rebuild the toy model with "
        "`python -m core.toy.build all` (see its model card)"
    )
    if not card.is_file() and not (root / "pipeline").exists():
        raise AssetError(
            f"the toy model is not in {root}: build it with `python -m core.toy.build all --out "
            f"runs/toy --ship {root}` (one GPU, about 20 minutes), or pick another preset"
        )
    if not card.is_file():
        raise AssetError(f"the toy model's card {card} is missing; {how}")
    for path, digest in read_checksums(card).items():
        file = root / path
        if not file.is_file():
            raise AssetError(f"the toy model file {file} is missing; {how}")
        if sha256(file) != digest:
            raise AssetError(f"the toy model file {file} is corrupt (checksum mismatch); {how}")
