"""Reading and writing the project's files: atomic writes, JSON, CSV and safetensors, and
files found in a local folder or else in a Hugging Face Hub repo."""

import csv
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.errors import HFValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from core.runtime import CorruptFileError

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = REPO_ROOT / "assets"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it to `path`.

    Readers, and a run that is interrupted, see the old file or the new one, never half of one.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(f"{path} is corrupt or truncated ({e})") from e


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    """Rows as a CSV file with a header; the columns are every key, in order of appearance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def local_or_snapshot(
    path_or_repo_id: str | os.PathLike,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    what: str | None = None,
) -> Path:
    """A local folder as is, or else the snapshot of the Hub repo of that name.

    A name that cannot be a repo id comes back as a local path even if it does not exist
    (the caller's own check of its contents then says what is missing). Only files matching
    `allow_patterns` are downloaded. A failed download raises FileNotFoundError with a
    sentence the caller can extend by what to do; `what` names the thing in it.
    """
    name = str(path_or_repo_id)
    local = Path(path_or_repo_id).expanduser()
    if local.exists():
        return local
    try:
        huggingface_hub.utils.validate_repo_id(name)
    except HFValidationError:
        return local
    try:
        snapshot = huggingface_hub.snapshot_download(
            name, revision=revision, allow_patterns=allow_patterns
        )
    except OSError as e:  # huggingface_hub's download and HTTP errors are OSErrors
        raise FileNotFoundError(
            f"could not download {what or name} (offline or not found), and there is no local "
            "folder of that name"
        ) from e
    return Path(snapshot)
