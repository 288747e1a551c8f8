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
from contextlib import contextmanager, suppress

from torch import Tensor, nn

from core.diffusion.hooks import DenoiserHooks
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


class _Recorder(DenoiserHooks):
    """The hooks of one `block_outputs` block and the maps they fill."""

    def __init__(self, model: nn.Module, layers: Iterable[str], stop_when_done: bool):
        super().__init__(model, resolve_layers(model, layers))
        self.stop_when_done = stop_when_done
        self.patch_size = getattr(getattr(model, "config", None), "patch_size", None)
        self.grid: tuple[int, int] | None = None
        self.maps: dict[str, Tensor] = {}

    def on_call(self, arguments: dict[str, object]) -> None:
        self.maps.clear()
        if self.patch_size:
            sample = arguments["hidden_states"]
            self.grid = (sample.shape[-2] // self.patch_size, sample.shape[-1] // self.patch_size)

    def on_output(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.ndim == 3:
            hidden = tokens_to_map(hidden, *self.grid)
        self.maps[name] = hidden
        if self.stop_when_done and len(self.maps) == len(self.modules):
            raise _AllCaptured


@contextmanager
def block_outputs(model: nn.Module, layers: Iterable[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of `layers` of `model` (a U-Net or DiT transformer).

    Yields a dict, keyed by the names as given, that each forward of `model` refills:
    after a forward it holds that forward's [B, C, H, W] block outputs.
    """
    recorder = _Recorder(model, layers, stop_when_done=False)
    with recorder.attached():
        yield recorder.maps


def capture(
    model: nn.Module, layers: Iterable[str], forward: Callable[[], object]
) -> dict[str, Tensor]:
    """Run `forward()` (a call of `model`) up to the last of `layers`; return their outputs.

    The rest of the forward is skipped: features of `up_blocks.1` never pay for
    `up_blocks.2`, `up_blocks.3` and the output convolution.
    """
    recorder = _Recorder(model, layers, stop_when_done=True)
    with suppress(_AllCaptured), recorder.attached():
        forward()
    return dict(recorder.maps)
