"""Find files in a local folder or, failing that, in a Hugging Face Hub repo."""

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import HFValidationError


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
