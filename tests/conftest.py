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


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for the rest of a module's tests: small tensors run faster on one
    than on two threads fighting over a busy 2-core machine, and SAEs trained in the test's
    process then match those of the commands' subprocesses, which use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
