"""Paper 1's composition task: IoU of the mask predicted at every step (`predict_over_steps`)
with the annotation mask of the final image, per block, beside two baselines that ignore the
model (the word's mean annotation mask over the other images, and a centred box)."""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from core.annotate.annotation import Annotator  # noqa: E402
from core.annotate.tags import PromptNounTagger  # noqa: E402
from core.diffusion.hooks import record  # noqa: E402
from core.diffusion.sampling import generate_image  # noqa: E402
from core.emergence.composition import (  # noqa: E402
    DEFAULT_THRESHOLD,
    iou,
    predict_over_steps,
)
from core.emergence.concepts import (  # noqa: E402
    ConceptDictionary,
)
from core.emergence.metrics import (  # noqa: E402
    label_masks,
)
from core.emergence.results import PAPER_COMPOSITION, Rows, mean_by, save_figure  # noqa: E402
from core.emergence.words import WordVectors  # noqa: E402
from core.sae.bank import SAEBank, SAEKey  # noqa: E402


def target_words(
    prompt: str,
    masks: Mapping[str, np.ndarray],
    word_vectors: WordVectors,
    labelled: set[str],
    targets: str | Sequence[str],
) -> list[str]:
    """The words scored for one image: annotated, with a word vector and with CIDs.

    targets: "nouns" (the prompt's object nouns), "labels" (every annotation label) or an
    explicit list of words.
    """
    if targets == "nouns":
        candidates = PromptNounTagger().tag(None, prompt)
    elif targets == "labels":
        candidates = list(masks)
    else:
        candidates = list(targets)
    return [w for w in candidates if w in masks and w in labelled and w in word_vectors]


def target_choice(text: str) -> str | list[str]:
    """A --targets option as `composition_rows` takes it: "nouns", "labels" or a comma list."""
    return text if text in ("nouns", "labels") else text.split(",")


def check_words(words: Sequence[str], word_vectors: WordVectors) -> None:
    missing = [w for w in words if w not in word_vectors]
    if missing:
        raise ValueError(
            f"no word vector for {missing} in {word_vectors.source!r}; pick other words"
        )


def composition_rows(
    pipe,
    bank: SAEBank,
    dictionaries: Mapping[SAEKey, ConceptDictionary],
    prompts: Sequence[str],
    annotator: Annotator,
    word_vectors: WordVectors,
    *,
    blocks: Sequence[str],
    branch: str = "cond",
    targets: str | Sequence[str] = "nouns",
    seed: int = 0,
    steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    reading: str = "top",
) -> Rows:
    """One row per (prompt, block, step, word): IoU of the predicted mask with the final
    image's annotation mask, and the two baselines' IoU (same for every step). `reading`:
    how a position's concept is picked (`core.emergence.composition.concept_map`)."""
    if not isinstance(targets, str):
        check_words(targets, word_vectors)
    labelled = {label for d in dictionaries.values() for label in d.vocabulary()}
    rows, masks_by_image = [], []
    for i, prompt in enumerate(tqdm(prompts, desc="composition")):
        with record(pipe, blocks, site=bank.sites(blocks)) as recording:
            image = generate_image(pipe, prompt, seed + i, steps, guidance_scale, resolution)
        masks = label_masks(annotator.annotate(image, prompt))
        masks_by_image.append(masks)
        words = target_words(prompt, masks, word_vectors, labelled, targets)
        if not words:
            continue
        for block in blocks:
            predictions = predict_over_steps(
                recording,
                bank,
                dictionaries,
                words,
                word_vectors,
                block=block,
                branch=branch,
                threshold=threshold,
                reading=reading,
            )
            for step in predictions:
                for word in words:
                    score = iou(step.predictions[word].mask[0], masks[word])
                    rows.append(
                        {
                            "prompt": prompt,
                            "seed": seed + i,
                            "image": i,
                            "block": block,
                            "branch": branch,
                            "step": step.step.index,
                            "t": round(step.step.t, 4),
                            "word": word,
                            "iou": float(score),
                        }
                    )
    add_baselines(rows, masks_by_image)
    return rows


def centred_box(shape: tuple[int, int]) -> np.ndarray:
    """The middle half of the image in each direction (a quarter of its area)."""
    height, width = shape
    box = np.zeros(shape, dtype=bool)
    box[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return box


def add_baselines(rows: Rows, masks_by_image: Sequence[Mapping[str, np.ndarray]]) -> None:
    """baseline_mean_iou: the word's mean mask over the other images (> 0.5), NaN if no other
    image has it; baseline_centre_iou: a centred box."""
    cache: dict[tuple[int, str], tuple[float, float]] = {}
    for row in rows:
        key = (row["image"], row["word"])
        if key not in cache:
            target = masks_by_image[row["image"]][row["word"]]
            others = [
                m[row["word"]]
                for j, m in enumerate(masks_by_image)
                if j != row["image"] and row["word"] in m and m[row["word"]].shape == target.shape
            ]
            mean_iou = math.nan
            if others:
                mean_mask = torch.as_tensor(np.mean(others, axis=0) > 0.5)
                mean_iou = float(iou(mean_mask, target))
            centre_iou = float(iou(torch.as_tensor(centred_box(target.shape)), target))
            cache[key] = (mean_iou, centre_iou)
        row["baseline_mean_iou"], row["baseline_centre_iou"] = cache[key]


def plot_composition(rows: Rows, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    means = mean_by(rows, ("block", "t"), "iou")
    for block in sorted({row["block"] for row in rows}):
        points = sorted((t, v) for (b, t), v in means.items() if b == block)
        ax.plot(*zip(*points, strict=True), marker="o", label=block)
    for name, style in (("baseline_mean_iou", ":"), ("baseline_centre_iou", "--")):
        value = mean_by(rows, (), name).get((), math.nan)
        if not math.isnan(value):
            ax.axhline(value, color="grey", linestyle=style, label=name.removesuffix("_iou"))
    ax.set(xlabel="t (1 = noise)", ylabel="mean IoU", xlim=(1.02, -0.02))
    ax.set_title(f"composition IoU\n{PAPER_COMPOSITION}", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path)
