import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402
import torch  # noqa: E402

from core.diffusion.tiny import build_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return build_tiny_pipeline()
