"""The denoisers the hooks know: where their blocks are, what a block reads and returns, how
its tokens lie on the image, and what the denoiser's timestep argument means.

A U-Net's `Transformer2DModel` blocks read and return feature maps, [batch, channels, H, W].
A diffusion transformer's blocks read and return tokens, [batch, tokens, channels], one
per patch of the latent image: one stream (PixArt's and DiT's `BasicTransformerBlock`), or
two, image and text (SD3's `JointTransformerBlock`, FLUX's `FluxTransformerBlock` and
`FluxSingleTransformerBlock`, which take (image, text) and return (text, image)). `Block`
shows every one of them as feature maps, the image stream on the patch grid, so that
everything above the hooks (SAE rows, spatial maps, regions) works unchanged; a joint
block's text stream, where asked for, as [batch, channels, text tokens, 1].
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.sae.config import SAEConfig, describe_sae

STREAMS = ("image", "text")
"""What a block's residual update is read from: its image tokens (or feature map), or a
joint block's text tokens."""


@dataclass(frozen=True)
class Layout:
    """One kind of denoiser, by its diffusers class."""

    name: str
    """How the views and errors name it."""
    denoiser_class: str
    block_classes: tuple[str, ...]
    """Classes of the blocks whose residual updates are hook points."""
    timestep_at_noise: float | None = None
    """The denoiser's timestep argument at t = 1 (pure noise); None: the scheduler's
    `num_train_timesteps` (U-Nets, PixArt, SD3 whose pipeline passes sigma x 1000). FLUX's
    pipeline passes sigma itself (timestep / 1000): 1."""
    batched_cfg: bool = True
    """Whether its pipelines run classifier-free guidance as one [uncond, cond] batch. FLUX.1
    is guidance-distilled: every call is the cond branch."""


LAYOUTS = (
    Layout("U-Net", "UNet2DConditionModel", ("Transformer2DModel",)),
    Layout("PixArt", "PixArtTransformer2DModel", ("BasicTransformerBlock",)),
    Layout("SD3", "SD3Transformer2DModel", ("JointTransformerBlock",)),
    Layout(
        "FLUX",
        "FluxTransformer2DModel",
        ("FluxTransformerBlock", "FluxSingleTransformerBlock"),
        timestep_at_noise=1.0,
        batched_cfg=False,
    ),
    Layout("DiT", "DiTTransformer2DModel", ("BasicTransformerBlock",)),
)
JOINT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")
"""Block classes with an image and a text stream, called with (image, text), returning
(text, image)."""


def denoiser_of(pipe) -> nn.Module:
    """The pipeline's denoiser (its `unet` or `transformer`), or `pipe` if it is one."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return getattr(pipe, name)
    if isinstance(pipe, nn.Module):
        return pipe
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer to hook")


def layout_of(denoiser: nn.Module) -> Layout:
    """The layout of a denoiser; one the hooks do not know is named, with those they do."""
    name = type(denoiser).__name__
    for layout in LAYOUTS:
        if layout.denoiser_class == name:
            return layout
    known = ", ".join(f"{layout.denoiser_class} ({layout.name})" for layout in LAYOUTS)
    raise ValueError(f"The hooks do not know the denoiser {name}; they know {known}.")


def hook_points(denoiser: nn.Module) -> list[str]:
    """Names of the denoiser's blocks whose residual updates can be read and edited."""
    classes = layout_of(denoiser).block_classes
    return [name for name, m in denoiser.named_modules() if type(m).__name__ in classes]


def resolve_blocks(denoiser: nn.Module, blocks: Iterable[str]) -> dict[str, nn.Module]:
    """Map block names to modules; an unknown name is an error listing the valid ones."""
    valid = hook_points(denoiser)
    modules = dict(denoiser.named_modules())
    resolved = {}
    for name in blocks:
        if name not in valid:
            raise ValueError(f"unknown hook point {name!r}; valid ones are: {', '.join(valid)}")
        resolved[name] = modules[name]
    return resolved


def patch_grid(denoiser: nn.Module, arguments: Mapping[str, object]) -> tuple[int, int] | None:
    """(rows, columns) of the image tokens of this denoiser call, from its arguments; None
    for a U-Net, whose blocks see feature maps."""
    layout = layout_of(denoiser)
    if layout.name == "U-Net":
        return None
    if layout.name == "FLUX":  # packed latents: each token's (0, row, column) is in img_ids
        ids = arguments["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    height, width = arguments["hidden_states"].shape[-2:]
    patch = denoiser.config.patch_size
    return height // patch, width // patch


@dataclass(frozen=True)
class Block:
    """How one block's residual stream reads as feature maps and is written back."""

    kind: str
    """The block's class name."""
    stream: str = "image"

    def __post_init__(self) -> None:
        if self.stream not in STREAMS:
            raise ValueError(f"unknown stream {self.stream!r}; choose {' or '.join(STREAMS)}")
        if self.stream == "text" and not self.joint:
            joint = ", ".join(JOINT_BLOCKS)
            raise ValueError(f"a {self.kind} has no text stream; only joint blocks ({joint}) do")

    @property
    def joint(self) -> bool:
        return self.kind in JOINT_BLOCKS

    @property
    def maps(self) -> bool:
        """Whether the block reads and returns feature maps already (a U-Net's)."""
        return self.kind == "Transformer2DModel"

    def input(self, args: tuple, kwargs: Mapping[str, object]) -> Tensor:
        """The stream as the block received it."""
        name, position = (
            ("encoder_hidden_states", 1) if self.stream == "text" else ("hidden_states", 0)
        )
        return args[position] if len(args) > position else kwargs[name]

    def output(self, output) -> Tensor:
        """The stream as the block returned it."""
        if self.joint:
            found = output[0 if self.stream == "text" else 1]
            if found is None:
                raise ValueError("this block returns no text stream (the model's last joint block)")
            return found
        if self.maps:
            return output[0] if isinstance(output, tuple) else output.sample
        return output

    def with_output(self, output, new: Tensor):
        """The block's output with the stream replaced by `new`."""
        if self.joint:
            text, image = output
            return (new, image) if self.stream == "text" else (text, new)
        if self.maps:
            if isinstance(output, tuple):
                return (new, *output[1:])
            output.sample = new
            return output
        return new

    def to_maps(self, tokens: Tensor, grid: tuple[int, int] | None) -> Tensor:
        """[batch, tokens, channels] -> [batch, channels, rows, columns] (the text stream:
        [batch, channels, tokens, 1]); a U-Net's maps as they are."""
        if self.maps:
            return tokens
        rows, columns = (tokens.shape[1], 1) if self.stream == "text" else grid
        if rows * columns != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens do not fill a {rows}x{columns} grid")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, columns)

    def to_tokens(self, maps: Tensor) -> Tensor:
        """The inverse of `to_maps`."""
        return maps if self.maps else maps.flatten(2).transpose(1, 2)


def block_width(module: nn.Module, stream: str = "image") -> int:
    """Channels of a block's residual stream: what an SAE for it reads."""
    kind = type(module).__name__
    Block(kind, stream)  # refuses a stream the block does not have
    if kind == "Transformer2DModel":
        return module.config.in_channels
    attention = module.attn1 if hasattr(module, "attn1") else module.attn
    projection = attention.add_q_proj if stream == "text" else attention.to_q
    return projection.in_features


def is_cfg_batch(pipe, arguments: Mapping[str, object]) -> bool:
    """Whether a denoiser call runs the batch [uncond, cond]: never for a layout without
    batched guidance (FLUX.1); as the pipeline says where it keeps a flag
    (`do_classifier_free_guidance`); else (PixArt's pipelines keep none) whether the two
    halves of its latents are the same, as `torch.cat([latents] * 2)` makes them."""
    if not layout_of(denoiser_of(pipe)).batched_cfg:
        return False
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    if flag is not None:
        return bool(flag)
    latents = arguments.get("hidden_states")
    if not torch.is_tensor(latents) or latents.shape[0] % 2:
        return False
    first, second = latents.chunk(2)
    return bool(torch.equal(first, second))


def check_sae_fits(cfg: SAEConfig, denoiser: nn.Module, block: str, stream: str = "image") -> None:
    """Refuse, in one sentence, an SAE for `block` trained on another kind of denoiser, on
    another stream or at another width than the block has in `denoiser`."""
    name = describe_sae(block, cfg.t, cfg.branch)
    layout = layout_of(denoiser).name
    if cfg.layout and cfg.layout != layout:
        raise ValueError(
            f"The SAE of {name} was trained on a {cfg.layout} block and this model is a "
            f"{layout}; train SAEs on this model (python -m core.training.train)."
        )
    if cfg.stream != stream:
        raise ValueError(f"The SAE of {name} reads the {cfg.stream} stream, not the {stream} one.")
    width = block_width(resolve_blocks(denoiser, [block])[block], stream)
    if cfg.d_in != width:
        raise ValueError(
            f"The SAE of {name} reads width {cfg.d_in} but the block has {width} channels; it "
            "was trained for another block or model."
        )
