"""Concept dictionaries built on first use, for SAEs published without them: from the
preset's prompt file, by its labeller, in parts that each fit one GPU call, into the cache
of `core.views.dictionary_cache`.

    plan = first_use_plan(loaded)               # what would be built, before anything runs
    for index in parted_build(loaded).remaining():
        build_part(loaded, index)                # one GPU call each (ZeroGPU's time limit)
    finish_build(loaded)                         # the dictionaries, now in loaded.dictionaries
"""

from core.annotate.labellers import AnnotatorConfig
from core.emergence.dictionary_builder import IOU_THRESHOLD
from core.emergence.parts import PartedBuild, Plan
from core.sae.bank import SAEKey
from core.training.activations import read_prompts
from core.views.dictionary_cache import cache_folder
from core.views.model_cache import Loaded

FIRST_USE_PROMPTS = 128
"""Prompts of the preset's file a first-use build generates and labels."""
PART_SIZE = 16
"""Prompts per part: one GPU call generates and labels them."""
CPU_SECONDS = {"stabilityai/sdxl-turbo": {"unet": 11.74, "vae": 20.71}}
"""Seconds per U-Net call and VAE decode at the model's 512 px, measured on a 2-core CPU
with random weights in the real architectures (`scripts/bench_first_use_build`)."""
LABELLER_CPU_SECONDS = {"grounded-sam": 20.25, "clipseg": 1.63}
"""Seconds per labelled image, measured the same way: Grounded SAM's CLIP tagger (0.11 s),
Grounding DINO tiny with one query (9.48 s) and SAM ViT-B with 3 boxes (10.66 s); CLIPSeg
with 10 words."""
GPU_CPU_RATIO = 100
"""How much faster a GPU is taken to be: SD v1.4's U-Net runs about 7 s a call on that
CPU and about 0.03 s on an H100 (x230); ZeroGPU lends a slice of a GPU, so half that."""


def first_use_plan(loaded: Loaded) -> Plan:
    """What a first-use build generates, labels and gives dictionaries to: the first
    `FIRST_USE_PROMPTS` prompts of the preset's file, from seed 0, at its steps, for its
    SAEs of the cond branch, labelled by its labeller."""
    preset = loaded.preset
    if not preset.prompts:
        raise ValueError(
            f"The preset {preset.name!r} ships no prompt file to build concept dictionaries "
            "from; build them with `python -m core.emergence.build_dictionary`."
        )
    keys = cond_keys(loaded)
    return Plan(
        model=preset.model,
        saes=str(preset.sae_source),
        keys=tuple(key.describe() for key in keys),
        prompts=tuple(read_prompts(preset.prompts)[:FIRST_USE_PROMPTS]),
        seed=0,
        steps=preset.steps,
        guidance_scale=preset.guidance_scale,
        resolution=preset.resolution,
        iou_threshold=IOU_THRESHOLD,
        labeller=AnnotatorConfig(annotator=preset.annotator).record(),
        part_size=PART_SIZE,
    )


def estimate_seconds(plan: Plan, device_type: str) -> float | None:
    """An estimate of a build's time on this kind of device from `CPU_SECONDS` and
    `LABELLER_CPU_SECONDS`, for the models and labellers measured there; None for others."""
    costs = CPU_SECONDS.get(plan.model)
    labelling = LABELLER_CPU_SECONDS.get(plan.labeller.get("annotator", ""))
    if costs is None or labelling is None:
        return None
    per_image = plan.steps * costs["unet"] + costs["vae"] + labelling
    return len(plan.prompts) * per_image / (GPU_CPU_RATIO if device_type == "cuda" else 1)


def cond_keys(loaded: Loaded) -> list[SAEKey]:
    return [key for key in loaded.bank if key.branch == "cond"]


def parted_build(loaded: Loaded) -> PartedBuild:
    """The first-use build of the loaded preset, with the parts done so far."""
    plan, keys = first_use_plan(loaded), cond_keys(loaded)
    return PartedBuild(cache_folder(loaded.preset), plan, loaded.bank, keys)


def build_part(loaded: Loaded, index: int) -> None:
    """Generate, label and keep part `index` of the first-use build."""
    annotator, labeller = loaded.labelling.dictionary_annotator
    if annotator is None:
        raise ValueError(f"The concept dictionaries cannot be built: {labeller}.")
    parted_build(loaded).build(index, loaded.pipe, annotator, labelled_by=labeller)


def finish_build(loaded: Loaded) -> int:
    """The dictionaries of a build whose parts are all done, written to the cache and put in
    `loaded`; returns how many objects the labeller found. A build whose images show no
    object is refused, its parts kept."""
    parts = parted_build(loaded)
    gathered = parts.merged()
    if not gathered.num_objects:
        raise ValueError(
            f"The labeller found no object in the {len(parts.plan.prompts)} images of "
            f"{loaded.preset.prompts}, so no concept can be named; build the dictionaries "
            "from other prompts with `python -m core.emergence.build_dictionary`."
        )
    info = {
        "model": parts.plan.model,
        "steps": parts.plan.steps,
        "guidance_scale": parts.plan.guidance_scale,
        **parts.plan.labeller,
        "labelled_by": parts.labellers(),
        "word_vectors": loaded.preset.word_vectors,
    }
    parts.finish(gathered, loaded.dictionaries.word_vectors, info)
    loaded.find_built_dictionaries()
    return gathered.num_objects
