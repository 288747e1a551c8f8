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
"""The model that is built from configs (`core.diffusion.tiny`) instead of loaded."""
SD14_BLOCKS = ("down_blocks.2.attentions.1", "mid_block.attentions.0", "up_blocks.1.attentions.0")


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
"""SDXL-Turbo's stages. Its 4 steps (trailing spacing) sit at t = 0.999, 0.749, 0.499 and
0.249, where the paper's windows would leave "final" empty: here the first step is early,
the next two middle and the last final; its default single step is early only, so its
steer tab generates 4. SDLens's SAEs read every step, so the t of each stage's SAE picks
nothing among them."""
SD14_SAES_ENV = "SD14_SAES"
"""Environment variable naming the `sd14` preset's SAE source (Hub repo or folder)."""


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
    """Names of the Transformer2DModel blocks whose residual updates are studied."""
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


PRESETS: dict[str, Preset] = {
    "sd14": Preset(
        name="sd14",
        model="CompVis/stable-diffusion-v1-4",
        steps=50,
        guidance_scale=7.5,
        hook_points=SD14_BLOCKS,
        app=AppDefaults(
            "Stable Diffusion v1.4, 512 px, DDIM 50 (paper 1); SAEs from the repo named by "
            f"--sd14-saes or {SD14_SAES_ENV}; wants a GPU",
            block="up_blocks.1.attentions.0",
            steer_block="mid_block.attentions.0",
            word="cat",
        ),
        word_vectors="word2vec-google-news-300",
        resolution=512,
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
