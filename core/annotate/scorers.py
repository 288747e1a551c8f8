"""CLIP similarity between images and a text: the emergence paper's scorer of global edits
(does the image show the added concept more?) and of the steer view's change."""

from collections.abc import Sequence

import torch
from PIL import Image

from core.annotate.loading import HubModel, model_inputs
from core.annotate.tags import CLIP_ID


class ClipScorer(HubModel):
    """Cosine similarity between images and a text, with CLIP (always in fp32)."""

    model_class = "CLIPModel"
    source = CLIP_ID
    what = "CLIP scorer"
    default_dtype = torch.float32

    @torch.no_grad()
    def similarity(self, images: Sequence[Image.Image], text: str) -> list[float]:
        inputs = self.processor(
            text=[text],
            images=[im.convert("RGB") for im in images],
            padding=True,
            return_tensors="pt",
        )
        out = self.model(**model_inputs(inputs, self.device, self.dtype))
        image_embeds = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image_embeds @ text_embeds.T)[:, 0].tolist()
