"""The inspect view: one concept (CID) of one SAE, from its dictionary entry to a picture.

- `concept_card`: the dictionary entry (labels, counts, IoU evidence), firing statistics
  and the nearest concepts, by label embedding and by decoder direction.
- `search`: the CIDs labelled with a word, or nearest to its word vector.
- `top_examples`: the images on which the CID has the largest spatial mean (paper 1),
  from the index shipped with the SAEs, or one built on demand from a few prompts;
  regenerated and shown with the CID's activation map.
- `activation_on`: the CID's activation map on a new generation.

Activation maps share one scale per CID (`activation_scale`): 0 to its largest activation
in training, so a weak activation looks weak on every image.
- `feature_icon`: a generation from the empty prompt with only this concept added (a
  global edit at the steps that use this SAE).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from core.diffusion.hooks import record
from core.emergence.composition import latent_grid
from core.emergence.concept_measures import top_examples as rank_examples
from core.emergence.concepts import normalize_label
from core.sae.bank import SAEKey
from core.sae.model import TopKSAE
from core.steer.intervene import Intervention, intervene
from core.steer.kinds import MAX_STRENGTH
from core.views.inputs import check_cid, check_number, check_prompt, check_seed
from core.views.model_cache import Loaded
from core.views.render import heat_map, overlay

NEAREST = 5


@dataclass
class ConceptCard:
    key: SAEKey
    cid: int
    entry: list[list]
    """Rows [label, count, mean IoU] of the dictionary entry, most frequent first."""
    stats: dict[str, object]
    nearest: list[list]
    """Rows [by, CID, cosine, labels]."""
    notes: list[str] = field(default_factory=list)


def describe_labels(loaded: Loaded, key: SAEKey, cid: int, including: str | None = None) -> str:
    """The CID's four most frequent labels with their counts, and `including` after them if
    it is a label of the CID but not among those four."""
    dictionary = loaded.dictionaries.get(key)
    labels = dictionary.labels(cid) if dictionary else None
    if not labels:
        return "no label"
    shown = labels.most_common(4)
    if including in labels and including not in dict(shown):
        shown.append((including, labels[including]))
    return ", ".join(f"{label} x{n}" for label, n in shown)


def _sae(loaded: Loaded, block: str, t: object, branch: str, cid: object):
    t = check_number(t, "The SAE's t", 0.0, 1.0)
    key, sae = loaded.sae(block, t, branch)
    return key, sae, check_cid(cid, sae.cfg.num_latents)


def concept_card(loaded: Loaded, block: str, t: object, branch: str, cid: object) -> ConceptCard:
    key, sae, cid = _sae(loaded, block, t, branch, cid)
    dictionary = loaded.dictionaries.get(key)
    notes = [] if dictionary else ["this SAE has no concept dictionary"]
    entry = []
    if dictionary:
        for label, ev in sorted(dictionary.evidence.get(cid, {}).items(), key=lambda x: -x[1][0]):
            entry.append([label, ev.count, None if ev.mean_iou is None else round(ev.mean_iou, 3)])
        if not entry:
            notes.append(f"CID {cid} matched no annotated object in {dictionary.num_images} images")
    nearest = _nearest_by_decoder(loaded, key, sae, cid)
    if dictionary is not None and bool(dictionary.has_embedding[cid]):
        nearest = _nearest_by_embedding(loaded, key, cid) + nearest
    stats = {**_firing_stats(loaded, key, sae, cid), "lineage across t": _lineage(loaded, key, cid)}
    return ConceptCard(key, cid, entry, stats, nearest, notes)


def _lineage(loaded: Loaded, key: SAEKey, cid: int) -> str:
    """The concept's chain through the block's SAEs at other t, matched by decoder direction
    (`core.emergence.lineage`), as one line."""
    from core.emergence.lineage import chain_through, lineage, top_label  # imports scipy: slow

    same = [k for k in loaded.bank if (k.block, k.branch) == (key.block, key.branch)]
    ts = sorted({k.t for k in same if k.t is not None})
    if key.t is None or len(ts) < 2:
        return "this block has one SAE for every t: there is no other t to follow it to"
    try:
        found = loaded.cached(
            f"lineage:{key.block}:{key.branch}",
            lambda: lineage(loaded.bank, key.block, key.branch, ts, labels=loaded.dictionaries),
        )
    except ValueError as error:
        return str(error)
    steps = []
    chain = chain_through(found, key.t, cid)
    for step_key, step_cid, similarity in chain:
        label = top_label(loaded.dictionaries.get(step_key), step_cid) or "unlabelled"
        match = "" if similarity is None else f", cos {similarity:.2f}"
        steps.append(f"t={step_key.t:g} CID {step_cid} ({label}{match})")
    threshold = min(m.threshold for m in found.matchings)
    if len(chain) == 1:
        others = ", ".join(f"{t:g}" for t in reversed(ts) if t != key.t)
        return (
            f"{steps[0]}: no concept at t = {others} matches it above the null cosine "
            f"{threshold:.2f}"
        )
    return " -> ".join(steps) + f" (matches above the null cosine {threshold:.2f})"


def _firing_stats(loaded: Loaded, key: SAEKey, sae: TopKSAE, cid: int) -> dict[str, object]:
    stats: dict[str, object] = {"sae": f"{key.block}, t={key.t}, {key.branch}"}
    if sae.stats is None:
        stats["training statistics"] = "none saved with this SAE"
    else:
        frequency = sae.stats.firing_frequency.cpu()
        rank = int((frequency > frequency[cid]).sum()) + 1
        stats.update(
            {
                "firing frequency": (
                    f"{float(frequency[cid]):.4f} of {sae.stats.num_samples} positions"
                ),
                "frequency rank": f"{rank} of {sae.cfg.num_latents}",
                "mean activation when firing": round(float(sae.stats.mean_activation[cid]), 4),
                "max activation": round(float(sae.stats.act_max[cid]), 4),
            }
        )
    index = loaded.examples.shipped
    if index is not None and key in index.means:
        means = index.means[key][:, cid]
        stats["fires on example images"] = f"{int((means > 0).sum())} of {len(means)}"
    return stats


def _nearest(scores: Tensor, cid: int) -> list[tuple[int, float]]:
    scores = scores.clone()
    scores[cid] = -float("inf")
    values, indices = scores.topk(min(NEAREST, len(scores) - 1))
    return [(int(i), round(float(v), 3)) for i, v in zip(indices, values, strict=True)]


def _nearest_by_decoder(loaded: Loaded, key: SAEKey, sae: TopKSAE, cid: int) -> list[list]:
    directions = F.normalize(sae.concept_vectors.float(), dim=1)
    pairs = _nearest(directions @ directions[cid], cid)
    return [["decoder direction", c, s, describe_labels(loaded, key, c)] for c, s in pairs]


def _nearest_by_embedding(loaded: Loaded, key: SAEKey, cid: int) -> list[list]:
    dictionary = loaded.dictionaries[key]
    embeddings = F.normalize(dictionary.embeddings.float(), dim=1)
    scores = (embeddings @ embeddings[cid]).masked_fill(~dictionary.has_embedding, -float("inf"))
    pairs = [(c, s) for c, s in _nearest(scores, cid) if s > -float("inf")]
    return [["label embedding", c, s, describe_labels(loaded, key, c)] for c, s in pairs]


def search(
    loaded: Loaded, block: str, t: object, branch: str, word: str
) -> tuple[list[tuple[int, str]], str]:
    """(CID, description) pairs for `word`, and how they were found."""
    t = check_number(t, "The SAE's t", 0.0, 1.0)
    key, _ = loaded.sae(block, t, branch)
    word = " ".join(str(word or "").split())
    if not word:
        raise ValueError("Type a word to search for, e.g. 'cat'.")
    dictionary = loaded.dictionaries.get(key)
    if dictionary is None:
        raise ValueError("This SAE has no concept dictionary; choose a concept by CID.")
    label = normalize_label(word)
    cids = dictionary.ranked_cids(word)
    if cids:
        found = [(c, describe_labels(loaded, key, c, label)) for c in cids]
        return found, f"labelled {word!r}"
    vector = loaded.dictionaries.word_vectors.vector(word)
    if vector is None or not bool(dictionary.has_embedding.any()):
        raise ValueError(f"No concept of this SAE is labelled {word!r}, and none can be compared.")
    embeddings = F.normalize(dictionary.embeddings.float(), dim=1)
    target = F.normalize(torch.as_tensor(vector, device=embeddings.device).float(), dim=0)
    scores = (embeddings @ target).masked_fill(~dictionary.has_embedding, -float("inf"))
    values, indices = scores.topk(min(NEAREST, int(dictionary.has_embedding.sum())))
    found = [
        (int(c), f"{describe_labels(loaded, key, int(c))} (cosine {float(v):.2f})")
        for c, v in zip(indices, values, strict=True)
    ]
    return found, f"no concept is labelled {word!r}; nearest by word vector"


def _cid_maps(
    loaded: Loaded,
    key: SAEKey,
    sae: TopKSAE,
    cid: int,
    prompts: list[str],
    seeds: list[int],
    on_step: Callable[[int, int], None] | None = None,
    **generation,
) -> tuple[list[Image.Image], Tensor]:
    """Generate; return the images and the CID's activation map [B, h, w] at the SAE's t."""
    t = 1.0 if key.t is None else key.t
    with record(loaded.pipe, [key.block], at_t=[t], site=sae.cfg.site) as recording:
        images = loaded.generate(prompts, seeds, on_step=on_step, **generation)
    recorded = recording.at(key.block, t, key.branch)
    grid = latent_grid(sae, recorded.delta, recorded.site)
    return images, grid.activation([cid]).cpu()


def top_examples(
    loaded: Loaded,
    block: str,
    t: object,
    branch: str,
    cid: object,
    count: int = 6,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[list[tuple[Image.Image, str]], str]:
    """The CID's top-activating example images with its activation map on each."""
    key, sae, cid = _sae(loaded, block, t, branch, cid)
    index = loaded.examples.index
    if key not in index.means:
        return [], "the example index has no entry for this SAE"
    ranked = rank_examples(index.means[key], cid, count)
    chosen = ranked.images.tolist()
    if not chosen:
        return [], f"CID {cid} fires on none of the {len(index.prompts)} example images"
    prompts = [index.prompts[i] for i in chosen]
    seeds = [index.seeds[i] for i in chosen]
    images, maps = _cid_maps(
        loaded,
        key,
        sae,
        cid,
        prompts,
        seeds,
        on_step,
        steps=index.steps,
        guidance_scale=index.guidance_scale,
    )
    scale, _ = activation_scale(sae, cid, maps)
    panels = [
        (overlay(image, maps[i] / scale, alpha=0.6), f"{prompts[i]} (mean {float(v):.3g})")
        for i, (image, v) in enumerate(zip(images, ranked.values, strict=True))
    ]
    note = f"{len(panels)} of {len(index.prompts)} images ({index.source} index)"
    return panels, note


def activation_on(
    loaded: Loaded,
    block: str,
    t: object,
    branch: str,
    cid: object,
    prompt: object,
    seed: object,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[Image.Image, Image.Image, str]:
    """(image with the CID's map, the map as a heat map, a caption) on a new generation."""
    key, sae, cid = _sae(loaded, block, t, branch, cid)
    prompt, seed = check_prompt(prompt), check_seed(seed)
    images, maps = _cid_maps(
        loaded, key, sae, cid, [prompt], [seed], on_step, steps=loaded.preset.steps
    )
    peak = float(maps[0].max())
    scale, scale_name = activation_scale(sae, cid, maps)
    caption = f"CID {cid} at t={key.t}: max activation {peak:.3g}; scale 0 to {scale_name}"
    if peak <= 0:
        caption += " (it does not fire on this image)"
    elif peak > scale:
        caption += " (exceeded here, shown at the top of the scale)"
    return (
        overlay(images[0], maps[0] / scale, alpha=0.6),
        heat_map(maps[0], 0, scale, "activation"),
        caption,
    )


def activation_scale(sae: TopKSAE, cid: int, maps: Tensor) -> tuple[float, str]:
    """The top of a CID's colour scale and what it is: its largest activation in training,
    the same for every image; without training statistics (or if it never fired there),
    the largest in `maps`."""
    return fixed_scale(float(sae.stats.act_max[cid]) if sae.stats is not None else 0.0, maps)


def fixed_scale(trained: float, maps: Tensor, whose: str = "its") -> tuple[float, str]:
    """The top of a colour scale and what it is (`whose` largest ...): `trained` if positive,
    else the largest finite value of `maps`, else 1."""
    if trained > 0:
        return trained, f"{whose} largest in training ({trained:.3g})"
    peak = float(torch.nan_to_num(maps.float(), nan=0.0).max())
    return (peak, f"{whose} largest on these images ({peak:.3g})") if peak > 0 else (1.0, "1")


def feature_icon(
    loaded: Loaded,
    block: str,
    t: object,
    branch: str,
    cid: object,
    strength: object,
    seed: object,
    on_step: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """A generation from the empty prompt with only this concept added, everywhere, at the
    steps whose nearest SAE is this one (a global edit with the CID's concept vector)."""
    key, _, cid = _sae(loaded, block, t, branch, cid)
    strength = check_number(strength, "The icon strength", 0.0, MAX_STRENGTH)
    seed = check_seed(seed)
    edit = Intervention(
        "global", {key: [cid]}, strength, (0.0, 1.0), (key.branch,), sae_choice="nearest"
    )
    size = loaded.image_size()
    with intervene(loaded.pipe, loaded.bank, key.block, edit, size):
        image = loaded.generate([""], [seed], loaded.preset.steps, on_step=on_step)[0]
    return image
