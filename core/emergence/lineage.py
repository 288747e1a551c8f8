"""Concept lineage across denoising time: which concepts of one t's SAE go on at the next t.

The emergence paper trains its SAEs independently per timestep, which "precludes direct
cross-timestep concept comparison". This module compares them anyway, for one block and
branch, two ways:

- by decoder direction: the cosine of two latents' decoder rows;
- by co-activation: the IoU of the positions where two latents fire on the same
  generations, each SAE applied at its own step.

Latents are matched one-to-one (`scipy.optimize.linear_sum_assignment`), and a match counts
only above a null threshold, the `NULL_QUANTILE` quantile of a best-match similarity:

- decoder: between random unit directions of the same width and count. It tests "more
  aligned than chance directions".
- co-activation: between the earlier SAE and an SAE of the same size started from another
  seed and trained on the same rows (`retrained_null`). It tests "the same concept": a match
  counts only when two latents of different t fire together as closely as a latent and its
  best counterpart in an independent retraining at the same t do in the top 1%. Shuffling
  positions instead would test only that two latents do not fire independently, which any
  two encoders of the same rows pass: a random SAE reading them got 6% of its latents
  matched against that null, instead of about 1%.

    result = lineage(bank, "mid_block.attentions.0", "cond", method="decoder")
    result.chains      # rows: a chain of CIDs with their similarities and labels
    result.summary()   # per transition: persist, vanish, appear, split, label kept
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from core.emergence.concepts import ConceptDictionary
from core.sae.bank import SAEBank, SAEKey
from core.sae.model import TopKSAE
from core.training.activations import GenerationSource
from core.training.trainer import SAETrainer, TrainConfig, derived_seed

METHODS = ("decoder", "coactivation")
NULL_QUANTILE = 0.99
"""Quantile of the chance best-match similarities a match must exceed."""
NULL_TRAINING = TrainConfig(batch_size=256, lr=1e-3)
"""How `retrained_null` trains its SAE (width and k are the compared SAE's)."""
NULL_STEPS = 1000


@dataclass
class Matching:
    """The one-to-one matches between the latents of two SAEs above the null threshold."""

    source: SAEKey
    target: SAEKey
    method: str
    threshold: float
    pairs: dict[int, tuple[int, float]]
    """Source CID -> (target CID, similarity), for matches above the threshold."""
    splits: dict[int, list[int]]
    """Source CID -> the two or more target CIDs whose best match above the threshold it is."""
    num_source: int
    num_target: int

    @property
    def targets_matched(self) -> set[int]:
        return {target for target, _ in self.pairs.values()}


@dataclass
class Lineage:
    """Matchings between consecutive SAEs (in the order of their t) and the chains they form."""

    keys: list[SAEKey]
    matchings: list[Matching]
    labels: Mapping[SAEKey, ConceptDictionary] = field(default_factory=dict)

    @property
    def chains(self) -> list[dict]:
        """One row per chain: it starts at a CID no earlier match reaches and follows matches."""
        rows = []
        width = self.matchings[0].num_source  # every SAE compared has it (check_comparable)
        for start in range(len(self.keys)):
            reached = self.matchings[start - 1].targets_matched if start else set()
            for cid in range(width):
                if cid not in reached:
                    rows.append(self._chain_row(start, cid))
        return rows

    def summary(self) -> list[dict]:
        """Per transition: shares of persisting, vanishing, appearing and splitting concepts,
        and how often a match keeps its top label (among matches labelled on both sides)."""
        return [transition_summary(m, self.labels) for m in self.matchings]

    def _chain_row(self, start: int, cid: int) -> dict:
        row: dict = {"chain": f"{self.keys[start].t:g}:{cid}"}
        for position in range(start, len(self.keys)):
            key = self.keys[position]
            row[f"cid_t{key.t:g}"] = cid
            row[f"label_t{key.t:g}"] = top_label(self.labels.get(key), cid)
            if position == len(self.keys) - 1 or cid not in self.matchings[position].pairs:
                break
            cid, similarity = self.matchings[position].pairs[cid]
            row[f"similarity_t{key.t:g}"] = round(similarity, 4)
        return row


def top_label(dictionary: ConceptDictionary | None, cid: int) -> str:
    """The label the dictionary gives `cid` most often, or "" if none."""
    if dictionary is None or cid >= dictionary.num_latents:
        return ""
    counts = dictionary.labels(cid)
    return counts.most_common(1)[0][0] if counts else ""


def check_comparable(key_a: SAEKey, a: TopKSAE, key_b: SAEKey, b: TopKSAE) -> None:
    """One sentence if two SAEs cannot be matched latent by latent."""
    if (key_a.block, key_a.branch) != (key_b.block, key_b.branch):
        raise ValueError(
            f"lineage compares SAEs of one block and branch; got {key_a.describe()} and "
            f"{key_b.describe()}"
        )
    if (a.cfg.d_in, a.cfg.num_latents) != (b.cfg.d_in, b.cfg.num_latents):
        raise ValueError(
            f"lineage compares SAEs of one width; {key_a.describe()} has "
            f"{a.cfg.num_latents} latents of {a.cfg.d_in} channels, {key_b.describe()} "
            f"{b.cfg.num_latents} of {b.cfg.d_in}"
        )


def decoder_cosines(a: TopKSAE, b: TopKSAE) -> np.ndarray:
    """[n_a, n_b] cosine similarity of the decoder rows."""
    return _cosines(a.W_dec.detach().float().cpu(), b.W_dec.detach().float().cpu())


def _cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = torch.nn.functional.normalize(a, dim=1)
    b = torch.nn.functional.normalize(b, dim=1)
    return (a @ b.T).numpy()


def random_direction_null(n_a: int, n_b: int, width: int, seed: int = 0) -> float:
    """The best-match cosine that random unit directions reach by chance (its quantile)."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n_a, width, generator=generator)
    b = torch.randn(n_b, width, generator=generator)
    return float(np.quantile(_cosines(a, b).max(axis=1), NULL_QUANTILE))


def firing(codes: torch.Tensor, num_latents: int) -> sparse.csr_matrix:
    """[positions, num_latents] boolean matrix of where each latent fires, from top-k indices
    `codes` [positions, k] (a latent fires where it is among the k)."""
    positions, k = codes.shape
    rows = np.repeat(np.arange(positions), k)
    data = np.ones(positions * k, dtype=np.float32)
    shape = (positions, num_latents)
    return sparse.csr_matrix((data, (rows, codes.reshape(-1).cpu().numpy())), shape=shape)


def coactivation_iou(a: sparse.csr_matrix, b: sparse.csr_matrix) -> np.ndarray:
    """[n_a, n_b] IoU of the positions where each latent fires; 0 where neither fires."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"co-activation compares firing on the same positions; got {a.shape[0]} and "
            f"{b.shape[0]}"
        )
    intersection = (a.T @ b).toarray()
    union = np.asarray(a.sum(axis=0)).T + np.asarray(b.sum(axis=0)) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def top_indices(sae: TopKSAE, rows: torch.Tensor) -> torch.Tensor:
    """[positions, k] indices of the latents among the top k at each row."""
    with torch.no_grad():
        return sae.encode(rows.to(sae.W_dec.device, sae.W_dec.dtype)).top_indices.cpu()


def retrained_null(sae: TopKSAE, rows: torch.Tensor, seed: int = 0) -> float:
    """The best-match co-activation IoU between `sae` and an SAE of its size started from a
    seed of its own and trained on the same `rows` (their order kept), at `NULL_QUANTILE`
    over the latents of `sae` that fire on them."""
    config = replace(
        NULL_TRAINING, num_latents=sae.cfg.num_latents, k=sae.cfg.k, seed=derived_seed(seed, "null")
    )
    trainer = SAETrainer(sae.cfg.d_in, config)
    rows = rows.float()
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(NULL_STEPS):
        trainer.step(rows[torch.randint(len(rows), (config.batch_size,), generator=generator)])
    retrained = trainer.export()
    fire = firing(top_indices(sae, rows), sae.cfg.num_latents)
    chance = coactivation_iou(fire, firing(top_indices(retrained, rows), sae.cfg.num_latents))
    fired = np.asarray(fire.sum(axis=0)).ravel() > 0
    if not fired.any():
        return 0.0
    return float(np.quantile(chance[fired].max(axis=1), NULL_QUANTILE))


def match(
    similarity: np.ndarray, threshold: float, source: SAEKey, target: SAEKey, method: str
) -> Matching:
    """One-to-one matches above `threshold`, and the splits of the best matches."""
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    pairs = {
        int(r): (int(c), float(similarity[r, c]))
        for r, c in zip(rows, cols, strict=True)
        if similarity[r, c] > threshold
    }
    best_source = similarity.argmax(axis=0)
    strong = similarity.max(axis=0) > threshold
    children: dict[int, list[int]] = {}
    for target_cid in np.flatnonzero(strong):
        children.setdefault(int(best_source[target_cid]), []).append(int(target_cid))
    splits = {cid: found for cid, found in children.items() if len(found) > 1}
    return Matching(source, target, method, threshold, pairs, splits, *similarity.shape)


def transition_summary(matching: Matching, labels: Mapping[SAEKey, ConceptDictionary]) -> dict:
    n_source, n_target = matching.num_source, matching.num_target
    kept = [
        top_label(labels.get(matching.source), source) == top_label(labels.get(matching.target), t)
        for source, (t, _) in matching.pairs.items()
        if top_label(labels.get(matching.source), source)
        and top_label(labels.get(matching.target), t)
    ]
    return {
        "from_t": matching.source.t,
        "to_t": matching.target.t,
        "method": matching.method,
        "threshold": round(matching.threshold, 4),
        "persist": len(matching.pairs) / n_source,
        "vanish": 1 - len(matching.pairs) / n_source,
        "appear": 1 - len(matching.targets_matched) / n_target,
        "split": len(matching.splits) / n_source,
        "label_kept": float(np.mean(kept)) if kept else None,
        "labelled_matches": len(kept),
    }


def ordered_keys(bank: SAEBank, block: str, branch: str, ts: Sequence[float]) -> list[SAEKey]:
    """The bank's keys for `ts`, from the first step's t (1.0) down; one sentence if missing."""
    keys = [SAEKey(block, float(t), branch) for t in sorted(ts, reverse=True)]
    missing = [key.describe() for key in keys if key not in bank]
    if missing:
        held = ", ".join(k.describe() for k in bank) or "none"
        raise ValueError(f"the bank has no SAE for {', '.join(missing)}; it holds {held}")
    if len(keys) < 2:
        raise ValueError("lineage needs SAEs at two t values at least")
    for a, b in zip(keys, keys[1:], strict=False):
        check_comparable(a, bank[a], b, bank[b])
    return keys


def lineage(
    bank: SAEBank,
    block: str,
    branch: str = "cond",
    ts: Sequence[float] = (1.0, 0.5, 0.0),
    method: str = "decoder",
    rows: Mapping[SAEKey, torch.Tensor] | None = None,
    labels: Mapping[SAEKey, ConceptDictionary] | None = None,
    seed: int = 0,
) -> Lineage:
    """Match the SAEs of `block` at `ts` pairwise in time order, by `method`.

    `rows` (co-activation only): the activations [positions, d] each SAE reads on the same
    generations and positions, each at its own step (see `coactivation_rows`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown lineage method {method!r}; choose one of {', '.join(METHODS)}")
    keys = ordered_keys(bank, block, branch, ts)
    if method == "coactivation" and (rows is None or any(k not in rows for k in keys)):
        raise ValueError("co-activation lineage needs the rows every SAE it compares reads")
    matchings = []
    for a, b in zip(keys, keys[1:], strict=False):
        if method == "decoder":
            similarity = decoder_cosines(bank[a], bank[b])
            threshold = random_direction_null(*similarity.shape, bank[a].cfg.d_in, seed)
        else:
            fire_a = firing(top_indices(bank[a], rows[a]), bank[a].cfg.num_latents)
            fire_b = firing(top_indices(bank[b], rows[b]), bank[b].cfg.num_latents)
            similarity = coactivation_iou(fire_a, fire_b)
            threshold = retrained_null(bank[a], rows[a], derived_seed(seed, *a))
        matchings.append(match(similarity, threshold, a, b, method))
    return Lineage(keys, matchings, dict(labels or {}))


def coactivation_rows(
    pipe,
    bank: SAEBank,
    keys: Sequence[SAEKey],
    prompts: Sequence[str],
    *,
    steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int = 0,
    resolution: int | None = None,
) -> dict[SAEKey, torch.Tensor]:
    """The residual updates [positions, d] each SAE reads on the same generations, at the step
    nearest its own t (prompt i uses seed + i)."""
    reading_output = [key.describe() for key in keys if bank[key].cfg.site != "delta"]
    if reading_output:
        raise ValueError(
            f"co-activation lineage reads residual updates; {', '.join(reading_output)} "
            "read the block output"
        )
    source = GenerationSource(
        pipe,
        prompts,
        keys,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        seed=seed,
        resolution=resolution,
    )
    found: dict[SAEKey, list[torch.Tensor]] = {key: [] for key in keys}
    for _, rows in source.rounds():
        for key in keys:
            found[key].append(rows[key].cpu())
    return {key: torch.cat(parts) for key, parts in found.items()}


def chain_through(result: Lineage, t: float, cid: int) -> list[tuple[SAEKey, int, float | None]]:
    """The chain `cid` of the SAE at `t` belongs to, earliest t first: (key, CID, similarity
    of the match that led to it; None for the chain's start)."""
    position = next(i for i, key in enumerate(result.keys) if math.isclose(key.t, t))
    chain: list[tuple[SAEKey, int, float | None]] = [(result.keys[position], cid, None)]
    for back in range(position - 1, -1, -1):
        found = [
            (source, s)
            for source, (target, s) in result.matchings[back].pairs.items()
            if target == chain[0][1]
        ]
        if not found:
            break
        source, similarity = found[0]
        chain[0] = (chain[0][0], chain[0][1], similarity)
        chain.insert(0, (result.keys[back], source, None))
    for forward in range(position, len(result.matchings)):
        pairs = result.matchings[forward].pairs
        if chain[-1][1] not in pairs:
            break
        target, similarity = pairs[chain[-1][1]]
        chain.append((result.keys[forward + 1], target, similarity))
    return chain
