"""Cross-attention heat maps of prompt words, per denoising step (DAAM-style baseline).

DAAM (Tang et al., 2023) explains where a word acts by its cross-attention: at every
cross-attention layer of the U-Net, the softmax attention of each image position to the
word's tokens, averaged over heads, upsampled to one resolution and summed over layers.
Here the sum is kept per denoising step, so it can be shown beside the SAE prediction of
the same step. A diffusion transformer with cross-attention layers (PixArt's `attn2`) is
traced the same way, on its patch grid; one whose image and text tokens attend jointly
(SD3, FLUX) has no cross-attention to trace, and the trace says so.

    with trace_cross_attention(pipe, prompt, ["cat"]) as trace:
        pipe(prompt)
    trace.maps["cat"]        # [steps, batch, h, w] at the latent resolution
    trace.steps              # t of each step (1 = noise)

The attention probabilities are computed a second time, in a forward hook on each
cross-attention layer, from the layer's own inputs: the layer's processor is left in charge
of the output, so generation is unchanged and any processor (memory-efficient, fused) keeps
working. Only one guidance branch is traced. Hooks are removed when the `with` block ends,
also on errors.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.annotate.tags import singular_forms
from core.diffusion.hooks import DenoiserHooks, timestep_at_noise
from core.diffusion.layouts import denoiser_of, is_cfg_batch, layout_of, patch_grid


@dataclass
class AttentionTrace:
    words: list[str]
    """Words traced: those found in the prompt's tokens."""
    missing: list[str]
    """Words asked for that the prompt does not contain."""
    steps: list[float] = field(default_factory=list)
    """t of each traced denoiser call (1 = noise)."""
    maps: dict[str, list[Tensor]] = field(default_factory=dict)
    """word -> one [batch, h, w] map per step (stack them with `stacked`)."""
    unavailable: str | None = None
    """Why no word is traced, where the denoiser has no cross-attention layer."""

    def stacked(self, word: str) -> Tensor:
        """[steps, batch, h, w] heat map of `word`."""
        return torch.stack(self.maps[word])


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of `word` (or a plural of it) in the encoded prompt, BOS counted.

    Matching is on token ids, so it follows the tokenizer exactly; a word the tokenizer
    does not know (it becomes the unknown token) is never found.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    for form in _surface_forms(word):
        target = tokenizer(form, add_special_tokens=False).input_ids
        if not target or tokenizer.unk_token_id in target:
            continue
        size = len(target)
        starts = [i for i in range(len(ids) - size + 1) if ids[i : i + size] == target]
        if starts:
            return [start + j for start in starts for j in range(size)]
    return []


def _surface_forms(word: str) -> list[str]:
    """`word` and the plurals whose singular it is ("box" -> box, boxs, boxes)."""
    forms = [word, f"{word}s", f"{word}es"]
    return [f for f in forms if f == word or word in singular_forms(f)]


def cross_attention_layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """The denoiser's cross-attention layers (`attn2`), by name."""
    return {
        name: module
        for name, module in denoiser.named_modules()
        if name.endswith("attn2") and hasattr(module, "get_processor")
    }


class _Tracer(DenoiserHooks):
    """Hooks on the denoiser's cross-attention layers that add up the traced words' maps."""

    def __init__(
        self,
        trace: AttentionTrace,
        positions: dict[str, list[int]],
        branch: str,
        pipe,
        layers: dict[str, nn.Module],
    ):
        super().__init__(denoiser_of(pipe), layers, timestep_at_noise(pipe))
        self.trace = trace
        self.positions = positions
        self.branch = branch
        self.pipe = pipe
        self.latent_size: tuple[int, int] = (0, 0)
        self.cfg = False

    def on_call(self, arguments: dict[str, object]) -> None:
        grid = patch_grid(self.denoiser, arguments)
        self.latent_size = grid or tuple(arguments["sample"].shape[-2:])
        self.cfg = is_cfg_batch(self.pipe, arguments)
        self.trace.steps.append(self.t)
        for word in self.positions:
            self.trace.maps.setdefault(word, []).append(None)

    def on_output(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        if context is not None and hidden_states.ndim == 3:
            self.add(module, hidden_states, context)

    def _rows(self, batch: int) -> slice:
        if not self.cfg:
            return slice(0, batch)
        half = batch // 2
        return slice(half, batch) if self.branch == "cond" else slice(0, half)

    @torch.no_grad()
    def add(self, attn, hidden_states: Tensor, context: Tensor) -> None:
        rows = self._rows(hidden_states.shape[0])
        hidden, context = hidden_states[rows], context[rows]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key, None)  # [batch * heads, hw, tokens]
        batch, positions = hidden.shape[0], hidden.shape[1]
        probs = probs.view(batch, attn.heads, positions, -1).mean(dim=1).float()
        height, width = self._grid(positions)
        for word, tokens in self.positions.items():
            layer_map = probs[..., tokens].sum(dim=-1).view(batch, 1, height, width)
            layer_map = F.interpolate(layer_map, self.latent_size, mode="bilinear")[:, 0].cpu()
            maps = self.trace.maps[word]
            maps[-1] = layer_map if maps[-1] is None else maps[-1] + layer_map

    def _grid(self, positions: int) -> tuple[int, int]:
        """The layer's (h, w): the latent's aspect ratio at `positions` cells."""
        latent_h, latent_w = self.latent_size
        height = round((positions * latent_h / latent_w) ** 0.5)
        return height, positions // height


@contextmanager
def trace_cross_attention(
    pipe, prompt: str, words: Sequence[str], branch: str = "cond"
) -> Iterator[AttentionTrace]:
    """Record the cross-attention heat map of each of `words` at every denoiser call.

    `branch` picks the guidance half that is traced ("cond" attends to the prompt).
    Words missing from the prompt are listed in `trace.missing` and not traced.
    """
    if branch not in ("cond", "uncond"):
        raise ValueError(f'branch must be "cond" or "uncond", got {branch!r}')
    positions = {w: token_positions(pipe.tokenizer, prompt, w) for w in dict.fromkeys(words)}
    found = {w: p for w, p in positions.items() if p}
    missing = [w for w in positions if w not in found]
    denoiser = denoiser_of(pipe)
    layers = cross_attention_layers(denoiser)
    if layers:
        trace = AttentionTrace(list(found), missing)
    else:
        layout = layout_of(denoiser).name
        why = f"{layout} has no cross-attention layer (its image and text tokens attend jointly)"
        trace = AttentionTrace([], missing, unavailable=why)
    traced = {w: found[w] for w in trace.words}  # none where there is no layer to trace
    with _Tracer(trace, traced, branch, pipe, layers).attached():
        yield trace
