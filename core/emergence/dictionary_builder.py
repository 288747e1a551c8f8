"""Build a concept dictionary from annotated images (paper 1): a latent whose normalised
activation map, binarised at `ACTIVATION_THRESHOLD`, overlaps an object's mask with IoU above
`IOU_THRESHOLD` gets the object's name added to its entry.

    builder = DictionaryBuilder(key, sae.cfg.num_latents)
    for grid, objects in annotated_images:     # LatentGrid of one image, [(name, mask), ...]
        builder.add_codes(grid.top_acts[0], grid.top_indices[0], objects)
    dictionary = builder.build(load_word_vectors())
    dictionary.save(root / bank_subfolder(key))        # beside the SAE
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.emergence.concepts import ConceptDictionary, LabelEvidence, checked_label
from core.emergence.words import WordVectors
from core.sae.bank import SAEKey

ACTIVATION_THRESHOLD = 0.1
IOU_THRESHOLD = 0.5


class DictionaryBuilder:
    """Gathers the IoU evidence of paper 1, one annotated image at a time.

    Resolution: the latent grid is coarse (16x16 for SD v1.4's down/up blocks) and the masks
    fine (512x512); the paper does not say how it compares them. Here the binarised map stays
    on the latent grid and each mask becomes the fraction of every grid cell it covers (area
    averaging). Counting each "on" cell as its whole block of pixels, the IoU is then exactly
    the IoU at mask resolution of the map upsampled with nearest neighbour, when the mask
    size is a multiple of the grid (512 = 32 x 16); otherwise cells overlap slightly and it is
    a close approximation. Nearest rather than bilinear because the SAE has no information
    below a cell, and because it costs O(H*W) per latent instead of O(512*512): an image
    costs a sum over its (cell, active latent) pairs, about 2.5 ms on a 2-core CPU
    (16x16 grid, n = 5120, k = 20, four 512x512 masks), most of it reading the masks.

    Both thresholds are strict: a cell is on if activation / max > activation_threshold, a
    label is added if IoU > iou_threshold.
    """

    def __init__(
        self,
        key: SAEKey,
        num_latents: int,
        *,
        activation_threshold: float = ACTIVATION_THRESHOLD,
        iou_threshold: float = IOU_THRESHOLD,
    ) -> None:
        for name, value in (("activation", activation_threshold), ("iou", iou_threshold)):
            if not 0 <= value < 1:
                raise ValueError(f"the {name} threshold must be in [0, 1), got {value}")
        self.key = key
        self.num_latents = num_latents
        self.activation_threshold = activation_threshold
        self.iou_threshold = iou_threshold
        self.num_images = 0
        self._counts: Counter[tuple[int, str]] = Counter()
        self._iou_sums: Counter[tuple[int, str]] = Counter()

    def add_codes(
        self,
        top_acts: Tensor,
        top_indices: Tensor,
        objects: Sequence[tuple[str, np.ndarray | Tensor]],
    ) -> int:
        """Add the evidence of one image; returns the number of (CID, label) matches.

        top_acts, top_indices: the image's TopK code on its latent grid, [H, W, k], as in
        `LatentGrid` (grid.top_acts[i], grid.top_indices[i] for image i of a batch).
        objects: (name, mask) pairs, each mask 2-D at the image's resolution, non-zero on
        the object.

        Per CID: on cells = activation / the CID's max in the image > threshold;
        intersection = sum of the objects' coverage over its on cells, union = on cells +
        object area - intersection, all in cells; only CIDs with an activation > 0 count.
        """
        if top_acts.ndim != 3 or top_acts.shape != top_indices.shape:
            raise ValueError(
                f"expected top_acts and top_indices of one shape [H, W, k], got "
                f"{tuple(top_acts.shape)} and {tuple(top_indices.shape)}"
            )
        if (
            top_indices.numel()
            and not 0 <= int(top_indices.min()) <= int(top_indices.max()) < self.num_latents
        ):
            raise ValueError(
                f"the code has CIDs outside [0, {self.num_latents}); is it from the SAE of "
                f"{self.key.describe()}?"
            )
        self.num_images += 1
        if not objects:
            return 0
        height, width, k = top_acts.shape
        labels = [checked_label(name) for name, _ in objects]
        coverage = _cell_coverage([mask for _, mask in objects], (height, width))  # [HW, objects]
        cells = torch.arange(height * width).repeat_interleave(k)
        cids, acts = top_indices.flatten().cpu().long(), top_acts.detach().flatten().cpu().float()
        firing = acts > 0
        cells, cids, acts = cells[firing], cids[firing], acts[firing]
        maxima = torch.zeros(self.num_latents).scatter_reduce_(0, cids, acts, reduce="amax")
        on = acts / maxima[cids] > self.activation_threshold
        cells, cids = cells[on], cids[on]
        active = cids.unique()
        intersection = torch.zeros(self.num_latents, len(objects))
        intersection.index_add_(0, cids, coverage[cells])
        intersection = intersection[active]
        size = torch.bincount(cids, minlength=self.num_latents)[active, None]
        ious = intersection / (size + coverage.sum(dim=0) - intersection)
        matches = (ious > self.iou_threshold).nonzero().tolist()
        for row, obj in matches:
            match = (int(active[row]), labels[obj])
            self._counts[match] += 1
            self._iou_sums[match] += float(ious[row, obj])
        return len(matches)

    def state(self) -> dict:
        """The evidence so far as plain values (JSON), to resume a build from (`add_state`)."""
        matches = [
            [cid, label, n, self._iou_sums[cid, label]] for (cid, label), n in self._counts.items()
        ]
        return {"num_images": self.num_images, "matches": sorted(matches)}

    def add_state(self, state: dict) -> None:
        """Add the evidence of another builder's `state` (of the same SAE and thresholds)."""
        self.num_images += state["num_images"]
        for cid, label, count, iou_sum in state["matches"]:
            self._counts[cid, label] += count
            self._iou_sums[cid, label] += iou_sum

    def evidence(self) -> dict[int, dict[str, LabelEvidence]]:
        """The entries gathered so far."""
        evidence: dict[int, dict[str, LabelEvidence]] = {}
        for (cid, label), count in sorted(self._counts.items()):
            mean_iou = self._iou_sums[cid, label] / count
            evidence.setdefault(cid, {})[label] = LabelEvidence(count, mean_iou)
        return evidence

    def build(self, word_vectors: WordVectors) -> ConceptDictionary:
        return ConceptDictionary.from_evidence(
            self.key,
            self.num_latents,
            self.evidence(),
            word_vectors,
            num_images=self.num_images,
            thresholds={"activation": self.activation_threshold, "iou": self.iou_threshold},
        )


def _cell_coverage(masks: Sequence[np.ndarray | Tensor], grid: tuple[int, int]) -> Tensor:
    """[H * W, num_masks]: fraction of each latent-grid cell that each mask covers."""
    masks = [torch.as_tensor(m) for m in masks]
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"object masks must be 2-D and all of one image's size, got shapes {sorted(shapes)}"
        )
    (mask_h, mask_w), (height, width) = shapes.pop(), grid
    if mask_h * width != mask_w * height:
        raise ValueError(
            f"the object masks are {mask_h}x{mask_w} but the latent grid is {height}x{width}: "
            "their aspect ratios differ; pass masks at the generated image's resolution"
        )
    stacked = torch.stack([m.cpu().bool() for m in masks]).float()  # .bool() is free on bool masks
    return F.adaptive_avg_pool2d(stacked, grid).reshape(len(masks), -1).T
