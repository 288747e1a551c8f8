"""Vision-only object annotation behind the concept dictionary: tag -> detect -> segment.

The emergence paper labels each generated image with RAM tags, Grounding DINO boxes for
those tags, and SAM masks inside the boxes, giving (label, mask) pairs that SAE latents
are matched against by IoU. `GroundedSamAnnotator` does the same with transformers'
Grounding DINO and SAM; the tag step is one of the taggers in `core.annotate.tags`
(by default the vision-only one).
Anything with an `annotate(image, prompt)` method returning `ObjectAnnotation`s is an
`Annotator`, so a ground-truth labeller can stand in for the models.

The CLIPSeg evaluator of spatial edits lives in `core.annotate.clipseg`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from core.annotate.annotation import Box, ObjectAnnotation
from core.annotate.loading import HubModel, Source, model_inputs
from core.annotate.tags import Tagger, make_tagger, normalise_vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

DINO_ID = "IDEA-Research/grounding-dino-tiny"
SAM_ID = "facebook/sam-vit-base"


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: Box


def box_iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def deduplicate(detections: Iterable[Detection], iou_threshold: float) -> list[Detection]:
    """Per-label non-maximum suppression: drop a box overlapping a better one of its label.

    Boxes of different labels never suppress each other (a cup on a table is two objects).
    """
    kept: list[Detection] = []
    for det in sorted(detections, key=lambda d: -d.score):
        if all(k.label != det.label or box_iou(k.box, det.box) <= iou_threshold for k in kept):
            kept.append(det)
    return kept


def grounding_query(labels: Sequence[str]) -> str:
    """Grounding DINO's text prompt: lower-case names, each ending with "." ("cat. dog.")."""
    return " ".join(f"{label.lower()}." for label in labels)


def _pixel_boxes(centre_boxes: torch.Tensor, size: tuple[int, int]) -> list[Box]:
    """Relative (cx, cy, w, h) rows to pixel (x0, y0, x1, y1), clipped to the image."""
    width, height = size
    cx, cy, w, h = centre_boxes.unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0, 1)
    scale = torch.tensor([width, height, width, height], dtype=corners.dtype)
    return [tuple(row) for row in (corners.cpu() * scale).tolist()]


class GroundingDinoDetector(HubModel):
    """Open-set detection of named objects with Grounding DINO.

    Grounding DINO scores every box against every token of the text. A box's score is
    its best token (as in the reference post-processing); its label is the name whose
    best token scores highest. A box is kept when its score exceeds `box_threshold` and
    its label's score exceeds `text_threshold`, so a box matching only "." or [CLS] is
    dropped, and every label is one of the names asked for, never a fragment of the
    query. Long name lists are split into several queries that fit the text length.
    """

    model_class = "GroundingDinoForObjectDetection"
    source = DINO_ID
    what = "Grounding DINO detector"

    def __init__(
        self,
        model: Source | PreTrainedModel | None = None,
        processor: Source | ProcessorMixin | None = None,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(model, processor, device=device, dtype=dtype)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        tokenizer = self.processor.tokenizer
        self._separators = {*tokenizer.all_special_ids, tokenizer.convert_tokens_to_ids(".")}

    def detect(self, image: Image.Image, labels: Iterable[str]) -> list[Detection]:
        """Boxes for the named objects in `image`, before de-duplication."""
        image = image.convert("RGB")
        return [det for chunk in self._chunks(labels) for det in self._detect(image, chunk)]

    def _chunks(self, labels: Iterable[str]) -> list[list[str]]:
        """Names packed into queries of at most `max_text_len` tokens ([CLS] and [SEP] included)."""
        budget = self.model.config.max_text_len - 2
        chunks: list[list[str]] = [[]]
        used = 0
        for label in normalise_vocabulary(labels):
            cost = len(self.processor.tokenizer(label, add_special_tokens=False).input_ids) + 1
            if chunks[-1] and used + cost > budget:
                chunks.append([])
                used = 0
            chunks[-1].append(label)
            used += cost
        return [chunk for chunk in chunks if chunk]

    def _spans(self, input_ids: list[int], count: int) -> list[list[int]]:
        """Token positions of each name in the query, split at "." and special tokens."""
        spans: list[list[int]] = [[]]
        for position, token in enumerate(input_ids):
            if token not in self._separators:
                spans[-1].append(position)
            elif spans[-1]:
                spans.append([])
        spans = [span for span in spans if span]
        if len(spans) != count:
            raise RuntimeError(f"query tokenised into {len(spans)} names, expected {count}")
        return spans

    @torch.no_grad()
    def _detect(self, image: Image.Image, labels: list[str]) -> list[Detection]:
        inputs = self.processor(images=image, text=grounding_query(labels), return_tensors="pt")
        outputs = self.model(**model_inputs(inputs, self.device, self.dtype))
        probs = outputs.logits[0].float().sigmoid()  # [queries, max_text_len]
        spans = self._spans(inputs["input_ids"][0].tolist(), len(labels))
        label_probs = torch.stack([probs[:, span].amax(-1) for span in spans], -1)
        label_scores, label_ids = label_probs.max(-1)
        scores = probs.amax(-1)
        keep = (scores > self.box_threshold) & (label_scores > self.text_threshold)
        boxes = _pixel_boxes(outputs.pred_boxes[0].float(), image.size)
        return [
            Detection(labels[label_ids[i]], float(scores[i]), boxes[i])
            for i in keep.nonzero().flatten().tolist()
        ]


class SamBoxSegmenter(HubModel):
    """SAM masks for box prompts, at the image's resolution (one mask per box)."""

    model_class = "SamModel"
    source = SAM_ID
    what = "SAM segmenter"

    @torch.no_grad()
    def segment_boxes(self, image: Image.Image, boxes: Sequence[Box]) -> np.ndarray:
        """bool [len(boxes), H, W]: SAM's single best mask inside each box."""
        image = image.convert("RGB")
        if not boxes:
            return np.zeros((0, image.height, image.width), dtype=bool)
        prompts = [[[float(v) for v in box] for box in boxes]]
        inputs = self.processor(images=image, input_boxes=prompts, return_tensors="pt")
        sizes = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
        inputs = model_inputs(inputs, self.device, self.dtype)
        outputs = self.model(**inputs, multimask_output=False)
        masks = self.processor.post_process_masks(outputs.pred_masks.float().cpu(), *sizes)
        return masks[0][:, 0].numpy()


class GroundedSamAnnotator:
    """Tags -> Grounding DINO boxes -> per-label NMS -> SAM masks, as in the emergence paper.

    The default tagger is the paper's kind: vision only (`ClipTagger` over the shipped
    vocabulary, standing in for RAM), so no label comes from the prompt. Pass
    `make_tagger("prompt+vision")` to add the prompt's nouns, which a softmax over many
    names often misses when the image holds several objects. Detections SAM finds no
    pixel for are dropped.
    """

    def __init__(
        self,
        tagger: Tagger | None = None,
        detector: GroundingDinoDetector | Source = DINO_ID,
        segmenter: SamBoxSegmenter | Source = SAM_ID,
        *,
        nms_iou: float = 0.5,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if tagger is None:
            tagger = make_tagger("vision", device=device, dtype=dtype)
        if isinstance(detector, str | Path):
            detector = GroundingDinoDetector(detector, device=device, dtype=dtype)
        if isinstance(segmenter, str | Path):
            segmenter = SamBoxSegmenter(segmenter, device=device, dtype=dtype)
        self.tagger, self.detector, self.segmenter = tagger, detector, segmenter
        self.nms_iou = nms_iou

    def annotate(self, image: Image.Image, prompt: str | None = None) -> list[ObjectAnnotation]:
        image = image.convert("RGB")
        labels = self.tagger.tag(image, prompt)
        detections = deduplicate(self.detector.detect(image, labels), self.nms_iou)
        masks = self.segmenter.segment_boxes(image, [det.box for det in detections])
        return [
            ObjectAnnotation(det.label, mask, det.score, det.box)
            for det, mask in zip(detections, masks, strict=True)
            if mask.any()
        ]
