import os

# Kyutai's code calls torch.compile lazily; on CPU that fails or crawls.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_and_seed():
    mx.random.seed(0)
    yield
