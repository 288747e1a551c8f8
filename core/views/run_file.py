"""An emergence run as one file: what the emergence view computed, to keep, share and reopen.

The file is a safetensors file (no pickle: loading it runs no code). `S` is the run's number
of steps, `B` its batch (1), `h x w` the block's grid, `<word>` each target word as in
`words` below:

    image                   uint8    [H, W, 3]     the final image
    predicted_mask/<word>   bool     [S, B, h, w]  the word's predicted mask at each step
    similarity/<word>       float32  [S, B, h, w]  cosine of each position's most active
                                                   concept with the word (NaN: it has no
                                                   label, or none fires)
    reference_mask/<word>   bool     [H', W']      the mask each step's IoU is scored against
    attention/<word>        float32  [S', B, h', w']  cross-attention per traced step (only
                                                   the words found in the prompt)
    iou/<word>              float64  [S]           IoU of the predicted mask (NaN: the word
                                                   is in neither mask)
    attention_iou/<word>    float64  [S']          IoU of the thresholded cross-attention
    concept_cids            int64    [S, B, h, w]  the concept chosen at each position (-1:
                                                   none); its embedding is the dictionary's
                                                   (the file does not repeat it, so a
                                                   loaded run's embeddings have width 0)

Its metadata (safetensors' string-to-string header) holds `format`
("diffusion-concepts emergence run"), `format_version` ("1") and `run`, a JSON object:
preset, prompt, seed, block, branch, words, steps (per step its index, timestep, t and the
SAE that read it: block, t, branch), references (word -> "annotation" or "last step"),
attention (words, missing, t of each traced step), notes, and settings (the mask and
attention thresholds). A script reads it with safetensors and json alone:

    import json
    from safetensors import safe_open
    with safe_open("run.safetensors", "np") as f:
        run = json.loads(f.metadata()["run"])
        masks = f.get_tensor(f"predicted_mask/{run['words'][0]}")
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.diffusion.hooks import StepInfo
from core.emergence.attention_maps import AttentionTrace
from core.emergence.composition import (
    DEFAULT_THRESHOLD,
    ConceptMap,
    MaskPrediction,
    StepPrediction,
)
from core.files import atomic_write
from core.sae.bank import SAEKey
from core.views.emergence import ATTENTION_THRESHOLD, EmergenceResult

FORMAT = "diffusion-concepts emergence run"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"


def save_run(result: EmergenceResult, path: str | Path, preset: str) -> Path:
    """Write `result` (generated with `preset`) to `path`, atomically; returns the path."""
    path = Path(path)
    tensors = _tensors(result)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "run": json.dumps(_description(result, preset)),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_run(path: str | Path) -> tuple[str, EmergenceResult]:
    """The preset and the run that `save_run` wrote to `path`; a file that is not one is a
    ValueError saying what it is and what to do."""
    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            _check_format(path, metadata)
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (f is no dict)
    except SafetensorError as error:
        raise ValueError(
            f"The file {path.name} is not a run file (not a safetensors file: {error}); open a "
            "file that the emergence tab's export wrote."
        ) from error
    try:
        return _result(json.loads(metadata["run"]), tensors)
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(
            f"The file {path.name} is incomplete or altered ({error} is missing or unreadable); "
            "export the run again from the emergence tab."
        ) from error


def _check_format(path: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"The file {path.name} is a safetensors file but not an emergence run (its metadata "
            f"has no format {FORMAT!r}); open a file that the emergence tab's export wrote."
        )
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"This run file was written by format version {version}; this app reads version "
            f"{FORMAT_VERSION}: re-export it with this app (the same prompt, seed and settings "
            "in the emergence tab, then export run) or open it with the app that wrote it."
        )


def _tensors(result: EmergenceResult) -> dict[str, Tensor]:
    tensors = {
        "image": torch.from_numpy(np.array(result.image.convert("RGB"))),
        "concept_cids": torch.stack([s.concept_map.cids for s in result.steps]),
    }
    for word in result.words:
        predictions = [s.predictions[word] for s in result.steps]
        tensors[f"predicted_mask/{word}"] = torch.stack([p.mask for p in predictions])
        tensors[f"similarity/{word}"] = torch.stack([p.similarity for p in predictions])
        tensors[f"reference_mask/{word}"] = torch.as_tensor(result.references[word][0])
        tensors[f"iou/{word}"] = torch.tensor(result.ious[word], dtype=torch.float64)
    for word in result.attention.words:
        tensors[f"attention/{word}"] = result.attention.stacked(word)
        iou = torch.tensor(result.attention_ious[word], dtype=torch.float64)
        tensors[f"attention_iou/{word}"] = iou
    return {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}


def _description(result: EmergenceResult, preset: str) -> dict:
    """The JSON part of the file: everything that is not an array."""
    steps = [{**s.step._asdict(), "sae": s.sae_key._asdict()} for s in result.steps]
    return {
        "preset": preset,
        "prompt": result.prompt,
        "seed": result.seed,
        "block": result.block,
        "branch": result.branch,
        "words": result.words,
        "steps": steps,
        "references": {word: result.references[word][1] for word in result.words},
        "attention": {
            "words": result.attention.words,
            "missing": result.attention.missing,
            "t": result.attention.steps,
            "unavailable": result.attention.unavailable,
        },
        "notes": result.notes,
        "settings": {
            "mask_threshold": DEFAULT_THRESHOLD,
            "attention_threshold": ATTENTION_THRESHOLD,
        },
    }


def _result(run: dict, tensors: dict[str, Tensor]) -> tuple[str, EmergenceResult]:
    """The preset and result that `run` (the JSON part) and `tensors` describe; a missing
    key is a KeyError naming it."""
    words, traced = run["words"], run["attention"]
    attention = AttentionTrace(
        traced["words"],
        traced["missing"],
        traced["t"],
        {word: list(tensors[f"attention/{word}"].unbind()) for word in traced["words"]},
        traced.get("unavailable"),  # absent from files written before DiTs were served
    )
    result = EmergenceResult(
        run["prompt"],
        run["seed"],
        run["block"],
        run["branch"],
        Image.fromarray(tensors["image"].numpy()),
        words,
        [_step(i, step, words, tensors) for i, step in enumerate(run["steps"])],
        attention,
        {w: (tensors[f"reference_mask/{w}"], run["references"][w]) for w in words},
        {w: tensors[f"iou/{w}"].tolist() for w in words},
        {w: tensors[f"attention_iou/{w}"].tolist() for w in traced["words"]},
        run["notes"],
    )
    return run["preset"], result


def _step(i: int, step: dict, words: list[str], tensors: dict[str, Tensor]) -> StepPrediction:
    """Step `i` of a loaded run. Its concept map has the CIDs, and embeddings of width 0:
    the file leaves them to the dictionary."""
    cids = tensors["concept_cids"][i]
    no_embeddings = torch.zeros((*cids.shape, 0))
    predictions = {
        word: MaskPrediction(tensors[f"predicted_mask/{word}"][i], tensors[f"similarity/{word}"][i])
        for word in words
    }
    return StepPrediction(
        StepInfo(step["index"], step["timestep"], step["t"]),
        SAEKey(**step["sae"]),
        ConceptMap(no_embeddings, cids >= 0, cids),
        predictions,
    )
