"""Record the outputs of a denoiser's blocks during a forward, as [B, C, H, W] maps.

The layers Revelio reads are whole blocks: a U-Net's `mid_block` ("bottleneck") and
`up_blocks.N` ("up_ftN"), and a DiT's `transformer_blocks.N`. A forward hook on each named
block keeps a reference to its output (no copy); DiT block outputs, [B, tokens, C], are
put back on the patch grid, so every layer gives a [B, C, H, W] map.

    with block_outputs(pipe.unet, ["bottleneck", "up_ft1"]) as maps:
        pipe.unet(latents, timestep, encoder_hidden_states=embedding)
    maps["up_ft1"]   # [B, 1280, H, W] for SD

Hooks are removed when the `with` block ends, also when the forward raises. `capture`
runs a forward only as far as the last requested block.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from core.revelio.feature_cache import LAYER_ALIASES, layer_name


class _AllCaptured(Exception):
    """Raised from the last requested block's hook to skip the rest of the forward."""


def feature_layers(model: nn.Module) -> list[str]:
    """Module paths of the blocks whose outputs can be read: the valid layer names."""
    if hasattr(model, "up_blocks"):
        names = ["mid_block"] if getattr(model, "mid_block", None) is not None else []
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    if hasattr(model, "transformer_blocks"):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    raise ValueError(
        f"{type(model).__name__} has neither U-Net up blocks nor transformer blocks to read"
    )


def resolve_layers(model: nn.Module, layers: Iterable[str]) -> dict[str, nn.Module]:
    """Map layer names (module paths or Revelio's aliases) to modules, in the given order.

    An unknown name is an error listing the valid ones.
    """
    valid = feature_layers(model)
    modules = dict(model.named_modules())
    resolved = {}
    for layer in layers:
        path = layer_name(layer)
        if path not in valid:
            aliases = {path: alias for alias, path in LAYER_ALIASES.items()}
            names = [f"{aliases[v]} ({v})" if v in aliases else v for v in valid]
            raise ValueError(f"unknown layer {layer!r}; valid ones are: {', '.join(names)}")
        resolved[layer] = modules[path]
    return resolved


def tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, height * width, C] tokens in row-major patch order -> [B, C, height, width]."""
    batch, _, channels = tokens.shape
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class _Recorder:
    """The hooks of one `block_outputs` block and the maps they fill."""

    def __init__(self, model: nn.Module, layers: Iterable[str], stop_when_done: bool):
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.stop_when_done = stop_when_done
        self.patch_size = getattr(getattr(model, "config", None), "patch_size", None)
        self.grid: tuple[int, int] | None = None
        self.maps: dict[str, Tensor] = {}
        self.handles: list = []

    def attach(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self._on_model, with_kwargs=True))
        for layer, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._layer_hook(layer)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_model(self, module, args, kwargs) -> None:
        self.maps.clear()
        if self.patch_size:
            sample = args[0] if args else kwargs["hidden_states"]
            self.grid = (sample.shape[-2] // self.patch_size, sample.shape[-1] // self.patch_size)

    def _layer_hook(self, layer: str):
        def hook(module, args, output):
            self._on_layer(layer, output)

        return hook

    def _on_layer(self, layer: str, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.ndim == 3:
            hidden = tokens_to_map(hidden, *self.grid)
        self.maps[layer] = hidden
        if self.stop_when_done and len(self.maps) == len(self.modules):
            raise _AllCaptured


@contextmanager
def block_outputs(model: nn.Module, layers: Iterable[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of `layers` of `model` (a U-Net or DiT transformer).

    Yields a dict, keyed by the names as given, that each forward of `model` refills:
    after a forward it holds that forward's [B, C, H, W] block outputs.
    """
    recorder = _Recorder(model, layers, stop_when_done=False)
    recorder.attach()
    try:
        yield recorder.maps
    finally:
        recorder.detach()


def capture(
    model: nn.Module, layers: Iterable[str], forward: Callable[[], object]
) -> dict[str, Tensor]:
    """Run `forward()` (a call of `model`) up to the last of `layers`; return their outputs.

    The rest of the forward is skipped: features of `up_blocks.1` never pay for
    `up_blocks.2`, `up_blocks.3` and the output convolution.
    """
    recorder = _Recorder(model, layers, stop_when_done=True)
    recorder.attach()
    try:
        forward()
    except _AllCaptured:
        pass
    finally:
        recorder.detach()
    return dict(recorder.maps)
