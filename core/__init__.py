"""Find, record and steer concepts in text-to-image diffusion models with sparse autoencoders."""

import logging


class _NoTorchvisionFallbackNotice(logging.Filter):
    """Drop transformers' notice that an image processor falls back to PIL without torchvision.

    diffusers imports `CLIPImageProcessor` and `SiglipImageProcessor` (for IP-Adapter) on
    every start; without torchvision, transformers uses their PIL versions, which is what
    this project wants: PyPI's torchvision does not load with the CPU build of torch.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
