"""Named model set-ups: which pipeline, how to sample it, where to hook, which SAEs.

A preset is plain data (this module imports no model library, so that the app's page can
be served before one loads); `core.diffusion.pipelines.load_pipeline` turns one into a
diffusers pipeline. Each preset also carries what the app's page shows first for it
(`AppDefaults`).
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from core.files import ASSETS

PROMPTS = ASSETS / "prompts"
"""Prompt files shipped for presets, one prompt a line."""
TOY_ASSETS = ASSETS / "toy"
"""The embedded shapes-world model: `pipeline/`, `saes/` (SAEs and dictionaries), model card."""
TOY_PROMPTS = Path("check") / "prompts.txt"
"""In a shipped toy model's folder: held-out captions, the preset's prompt file."""
TINY_MODEL = "tiny"
"""The U-Net model that is built from configs (`core.diffusion.tiny`) instead of loaded."""
SD14_BLOCKS = ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0")
PIXART_BLOCKS = ("transformer_blocks.7", "transformer_blocks.14", "transformer_blocks.21")
"""PixArt-α's 28 blocks at a quarter, half and three quarters of its depth, standing in for
the paper's early (down), middle (mid) and late (up) U-Net blocks: no SAE hook points are
published for it."""
SD3_BLOCKS = ("transformer_blocks.6", "transformer_blocks.12", "transformer_blocks.18")
"""SD3.5 Medium's 24 joint blocks at a quarter, half and three quarters of its depth, as
`PIXART_BLOCKS`."""
FLUX_BLOCKS = (
    "transformer_blocks.18",
    "single_transformer_blocks.9",
    "single_transformer_blocks.37",
)
"""FLUX.1's last dual-stream block (a third of its 57), a single-stream block half way and
its last block: blocks of the FLUX SAEs published with fluxlens (Krea)."""
TINY_DITS = {
    "tiny-pixart": (
        "PixArt",
        ("transformer_blocks.1", "transformer_blocks.2", "transformer_blocks.3"),
    ),
    "tiny-sd3": ("SD3", ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2")),
    "tiny-flux": (
        "FLUX",
        ("transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"),
    ),
}
"""The small random DiTs built from configs (`core.diffusion.tiny_dit`) instead of loaded:
name -> (layout, its early, middle and late blocks, as the real models' presets have)."""


@dataclass(frozen=True)
class Stages:
    """The denoising stages a steering edit names: each one's t window (t = 1 is pure noise)
    and the t of the SAE that edits it. The names are always early, middle and final; a
    preset whose schedule puts its steps elsewhere (a 1-4-step model, a flow-matching
    schedule) may give its own windows and t."""

    windows: Mapping[str, tuple[float, float]]
    sae_t: Mapping[str, float]

    def __post_init__(self) -> None:
        names = ("early", "middle", "final")
        if tuple(self.windows) != names or tuple(self.sae_t) != names:
            raise ValueError(f"stages are named {', '.join(names)}, in that order")


PAPER_STAGES = Stages(
    {"early": (0.6, 1.0), "middle": (0.2, 0.6), "final": (0.0, 0.2)},
    {"early": 1.0, "middle": 0.5, "final": 0.0},
)
"""The emergence paper's stages; its SAEs are trained at these three t."""
STAGES = PAPER_STAGES.windows
STAGE_T = PAPER_STAGES.sae_t
TURBO_STAGES = Stages(
    {"early": (0.8, 1.0), "middle": (0.4, 0.8), "final": (0.0, 0.4)},
    {"early": 1.0, "middle": 0.6, "final": 0.2},
)
"""SDXL-Turbo's and FLUX.1 [schnell]'s stages. Their 4 steps sit at t = 1 (0.999 for
SDXL-Turbo's trailing timesteps), 0.75, 0.5 and 0.25, where the paper's windows would leave
"final" empty: here the first step is early, the next two middle and the last final;
SDXL-Turbo's default single step is early only, so its steer tab generates 4. SDLens's
SAEs read every step, so the t of each stage's SAE picks nothing among them."""
SD3_STAGES = Stages(
    {"early": (0.82, 1.0), "middle": (0.43, 0.82), "final": (0.0, 0.43)},
    {"early": 1.0, "middle": 0.75, "final": 0.0},
)
"""SD3's stages in its t (sigma, 1 = noise). Its flow-matching schedule with shift 3 puts a
step at fraction s of the way from the end at sigma = 3s / (1 + 2s); the paper's windows
and SAE times, fractions of DDIM's evenly spaced timesteps (0.6, 0.2; 1, 0.5, 0), map to
sigma 0.82, 0.43 and 1, 0.75, 0."""


SHAPES_PROMPTS = (
    "a white triangle and a red circle on a teal gradient background",
    "a yellow star and a purple triangle on a brown striped background",
    "a green square on a navy dotted background",
    "a red circle and a blue square on a black plain background",
)
"""Captions of the toy model's shapes world."""


@dataclass(frozen=True)
class AppDefaults:
    """What the app's page shows for a preset before a person changes anything."""

    about: str
    """What the preset is, for the status line."""
    block: str
    """The block the emergence and inspect tabs open on."""
    steer_block: str
    """The block the steer tab opens on."""
    word: str = ""
    """The steering word, a concept label of `steer_block`; empty: concepts by CID only."""
    strength: float | None = None
    """The steering strength proposed for spatial and global edits at every stage; None: the
    paper's for the edit type and stage (or the SAEs' calibrated ones)."""
    cid: int = 0
    """The concept the inspect tab opens on (with `block`, at t = 0.5)."""
    prompts: tuple[str, ...] = SHAPES_PROMPTS
    """The prompts the tabs open with (the first) and offer as examples."""
    steer_steps: int | None = None
    """The steps of the steer tab's two images; None: the preset's `steps`. A model sampled
    in one step steers at more, so that each stage has a step to edit."""


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    """Hub repo id or local folder of a diffusers pipeline; `TINY_MODEL` builds one from
    configs."""
    steps: int
    """Default number of denoising steps."""
    guidance_scale: float
    """Default classifier-free guidance scale (<= 1 disables guidance)."""
    hook_points: tuple[str, ...]
    """Names of the blocks whose residual updates are studied: a U-Net's Transformer2DModels
    or a diffusion transformer's blocks (`core.diffusion.layouts`)."""
    app: AppDefaults
    """What the app's page opens with for this preset."""
    scheduler: str | None = "ddim"
    """`"ddim"` swaps in a DDIM scheduler built from the pipeline's own config; None keeps it."""
    sae_source: str | None = None
    """Hub repo id or local folder of the SAE bank; None until a user names or trains one."""
    sae_variant: str | None = None
    """Which run to load where the SAE repo holds several per block (`SAEBank.from_pretrained`)."""
    dictionary_source: str | None = None
    """Hub repo or folder of concept dictionaries published for SAEs that come without them
    (`build_dictionary --push-to-hub`); None: built on first use where none are found."""
    word_vectors: str = "glove-6b-50d"
    """Word-vector source: a gensim-data name, a local file, or the offline GloVe default."""
    resolution: int | None = None
    """Image side in pixels; None uses the pipeline's default."""
    assets: str | None = None
    """Folder of shipped files whose model card lists their checksums, checked before a
    pipeline from inside it is loaded."""
    annotator: str = "grounded-sam"
    """What labels its images: "grounded-sam" (tags, Grounding DINO and SAM; downloads its
    models) or "toy" (the shapes world's annotator, from pixels, offline)."""
    prompts: str | None = None
    """A prompt file shipped for it: what the evaluations and an example index generate."""
    stages: Stages = PAPER_STAGES
    """The steering stages' t windows and the t of each one's SAE."""
    sae_env: str | None = None
    """Environment variable that names its SAE source (a Hub repo or folder), for a preset
    whose SAEs a user trains."""


PRESETS: dict[str, Preset] = {
    "sd14": Preset(
        name="sd14",
        model="CompVis/stable-diffusion-v1-4",
        steps=50,
        guidance_scale=7.5,
        hook_points=SD14_BLOCKS,
        app=AppDefaults(
            "Stable Diffusion v1.4, 512 px, DDIM 50 (paper 1); SAEs from the repo named by "
            "--saes sd14=REPO or SD14_SAES; wants a GPU",
            block="up_blocks.1.attentions.0",
            steer_block="mid_block.attentions.0",
            word="cat",
        ),
        word_vectors="word2vec-google-news-300",
        resolution=512,
        sae_env="SD14_SAES",
    ),
    "sdxl-turbo": Preset(
        name="sdxl-turbo",
        model="stabilityai/sdxl-turbo",
        steps=1,
        guidance_scale=0.0,
        hook_points=(
            "down_blocks.2.attentions.1",
            "mid_block.attentions.0",
            "up_blocks.0.attentions.0",
            "up_blocks.0.attentions.1",
        ),
        app=AppDefaults(
            "SDXL-Turbo, 512 px, 1 step (the steer tab 4: one early, two middle, one final), "
            "with the published SDLens SAEs "
            "(surokpro2/sdxl-saes, one per block for every step), which come without concept "
            "dictionaries: the emergence tab builds them once, from the preset's prompts, and "
            "keeps them; steering strengths are multiples of the concept's mean activation, as "
            "in the SDLens demo",
            block="up_blocks.0.attentions.1",
            steer_block="down_blocks.2.attentions.1",
            word="cat",  # once its dictionaries are built; by CID until then
            strength=10.0,  # the SDLens demo's default
            steer_steps=4,  # one step each for early and final, two for middle
            prompts=(  # objects its labeller's vocabulary names
                "a photo of a cat next to a dog",
                "a photo of a red car in a city street",
                "a bird and a boat by a lake",
                "a photo of a pizza on a wooden table",
            ),
        ),
        scheduler=None,
        sae_source="surokpro2/sdxl-saes",
        sae_variant="k10_hidden5120",
        word_vectors="word2vec-google-news-300",
        resolution=512,
        prompts=str(PROMPTS / "sdxl-turbo.txt"),
        stages=TURBO_STAGES,
    ),
    "toy": Preset(
        name="toy",
        model=str(TOY_ASSETS / "pipeline"),
        steps=25,
        guidance_scale=7.5,
        hook_points=SD14_BLOCKS,
        app=AppDefaults(
            "the embedded shapes-world model (coloured shapes on patterned backgrounds), offline",
            block="down_blocks.2.attentions.1",
            steer_block="mid_block.attentions.0",
            word="circle",
            cid=25,
        ),
        sae_source=str(TOY_ASSETS / "saes"),
        assets=str(TOY_ASSETS),
        annotator="toy",
        prompts=str(TOY_ASSETS / TOY_PROMPTS),
    ),
    "tiny": Preset(
        name="tiny",
        model=TINY_MODEL,
        steps=10,
        guidance_scale=7.5,
        hook_points=SD14_BLOCKS,
        app=AppDefaults(
            "random weights in SD v1.4's block layout, 32 px: images are noise and concepts "
            "arbitrary; it runs offline in seconds and exercises every view",
            block="up_blocks.1.attentions.0",
            steer_block="up_blocks.1.attentions.0",
            word="star",
        ),
        sae_source=str(ASSETS / "tiny" / "saes"),
        resolution=32,
        annotator="toy",
        prompts=str(PROMPTS / "tiny.txt"),
    ),
}


def _dit_preset(name: str, model: str, about: str, blocks: tuple[str, ...], **fields) -> Preset:
    """A preset for a diffusion transformer whose SAEs a user trains (named by
    `<NAME>_SAES`), opening every tab on its middle block."""
    return Preset(
        name=name,
        model=model,
        hook_points=blocks,
        app=AppDefaults(
            f"{about}; SAEs from the repo named by --saes {name}=REPO or "
            f"{name.upper()}_SAES; wants a GPU",
            block=blocks[1],
            steer_block=blocks[0],
            word="cat",
            prompts=("a photo of a cat next to a dog", "a red car in a city street"),
        ),
        scheduler=None,
        word_vectors="word2vec-google-news-300",
        sae_env=f"{name.upper()}_SAES",
        **fields,
    )


def _tiny_dit_preset(model: str, layout: str, blocks: tuple[str, ...]) -> Preset:
    """A small random DiT with the shipped SAEs (scripts/build_tiny_assets), as `tiny`."""
    return Preset(
        name=model,
        model=model,
        steps=10,
        guidance_scale=0.0 if layout == "FLUX" else 4.5,
        hook_points=blocks,
        app=AppDefaults(
            f"random weights in {layout}'s diffusion-transformer layout, 32 px: images are noise "
            "and concepts arbitrary; it runs offline in seconds and exercises every view",
            block=blocks[1],
            steer_block=blocks[1],
            word="star",
        ),
        scheduler=None,
        sae_source=str(ASSETS / model / "saes"),
        resolution=32,
        annotator="toy",
        prompts=str(PROMPTS / "tiny.txt"),
        stages=TURBO_STAGES if layout == "FLUX" else PAPER_STAGES,
    )


PRESETS.update(
    {
        "pixart": _dit_preset(
            "pixart",
            "PixArt-alpha/PixArt-XL-2-512x512",
            "PixArt-α (a DiT of 28 blocks with cross-attention to T5), 512 px, DPM-Solver 20",
            PIXART_BLOCKS,
            steps=20,
            guidance_scale=4.5,
            resolution=512,
        ),
        "sd3": _dit_preset(
            "sd3",
            "stabilityai/stable-diffusion-3.5-medium",
            "Stable Diffusion 3.5 Medium (24 joint image-text blocks), 512 px, flow matching 40",
            SD3_BLOCKS,
            steps=40,
            guidance_scale=4.5,
            resolution=512,
            stages=SD3_STAGES,
        ),
        "flux": _dit_preset(
            "flux",
            "black-forest-labs/FLUX.1-schnell",
            "FLUX.1 [schnell] (19 dual- and 38 single-stream blocks, guidance-distilled: no "
            "uncond branch), 512 px, 4 steps",
            FLUX_BLOCKS,
            steps=4,
            guidance_scale=0.0,
            resolution=512,
            stages=TURBO_STAGES,
        ),
        **{
            model: _tiny_dit_preset(model, layout, blocks)
            for model, (layout, blocks) in TINY_DITS.items()
        },
    }
)


class UnknownPresetError(KeyError, ValueError):
    """A name that is not a preset: a failed lookup and a wrong input at once."""

    __str__ = ValueError.__str__  # the message as written, without KeyError's quotes


def check_preset(name: str) -> None:
    """Raise an error that lists the presets unless `name` is one."""
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def get_preset(name: str, **overrides) -> Preset:
    """Look a preset up by name, optionally replacing some of its fields."""
    check_preset(name)
    return replace(PRESETS[name], **overrides)


def default_preset_name() -> str:
    """`toy` when its weights are in assets/, else `tiny`: the offline default either way."""
    return "toy" if (TOY_ASSETS / "pipeline" / "model_index.json").is_file() else "tiny"
