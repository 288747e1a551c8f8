"""Load the annotators' transformers models the way a user with internet access would.

Every annotator takes either a Hub id / local folder (loaded with `from_pretrained`) or an
already-built model and processor (so tests and callers can inject their own). A model
that is neither cached nor downloadable raises `ModelNotAvailableError` naming it.

Model classes are named by their transformers name and imported when a model loads:
importing transformers' model classes takes seconds, which the app's page does not wait for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from core.runtime import ModelNotAvailableError, default_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

Source = str | Path
"""A Hugging Face Hub repo id or a local folder written by `save_pretrained`."""


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """CUDA when available; fp16 on CUDA and fp32 elsewhere unless `dtype` says otherwise."""
    device = torch.device(device or default_device())
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, dtype


def _not_available(what: str, source: Source, error: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not load the {what} {str(source)!r} ({type(error).__name__}): it is not a local "
        "folder, not in the local Hugging Face cache, and could not be downloaded (offline?). "
        f"Run once with internet access (or `hf download {source}`), or pass a local folder "
        "written by `save_pretrained`."
    )


def load_model(
    model_class: str,
    model: Source | PreTrainedModel,
    what: str,
    device: torch.device,
    dtype: torch.dtype,
) -> PreTrainedModel:
    """`transformers.<model_class>.from_pretrained(model)` unless `model` is already built;
    on `device`, eval."""
    if isinstance(model, str | Path):
        import transformers

        try:
            model = getattr(transformers, model_class).from_pretrained(str(model), dtype=dtype)
        except (OSError, ValueError) as error:
            raise _not_available(what, model, error) from error
    return model.to(device=device, dtype=dtype).eval()


def load_processor(
    processor: Source | ProcessorMixin | None, model: Source | PreTrainedModel, what: str
) -> ProcessorMixin:
    """The given processor, or `AutoProcessor` from its id, or from the model's id."""
    if processor is None:
        if not isinstance(model, str | Path):
            raise ValueError(f"the {what} was passed as a model object: pass its processor too")
        processor = model
    if not isinstance(processor, str | Path):
        return processor
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(processor))
    except (OSError, ValueError) as error:
        raise _not_available(f"{what} processor", processor, error) from error


def model_inputs(
    inputs: Mapping[str, object], device: torch.device, dtype: torch.dtype
) -> dict[str, object]:
    """Processor outputs on `device`, floating-point tensors cast to the model's `dtype`.

    Processors return a `BatchFeature` or a `BatchEncoding`, whose `to` methods differ.
    """
    return {
        key: value.to(device, dtype) if torch.is_floating_point(value) else value.to(device)
        for key, value in inputs.items()
        if isinstance(value, torch.Tensor)
    }


class HubModel:
    """A transformers model and its processor on one device and dtype: what every annotator
    model loads alike. A subclass names its transformers class (`model_class`), its default
    Hub id (`source`) and what it is in messages (`what`)."""

    model_class: ClassVar[str]
    source: ClassVar[str]
    what: ClassVar[str]
    default_dtype: ClassVar[torch.dtype | None] = None
    """None: fp16 on CUDA, fp32 elsewhere (`resolve_device_dtype`)."""

    def __init__(
        self,
        model: Source | PreTrainedModel | None = None,
        processor: Source | ProcessorMixin | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        model = self.source if model is None else model
        self.device, self.dtype = resolve_device_dtype(device, dtype or self.default_dtype)
        self.model = load_model(self.model_class, model, self.what, self.device, self.dtype)
        self.processor = load_processor(processor, model, self.what)
