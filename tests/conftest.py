import os
import sys
from pathlib import Path

import pytest

# Tests never reach the network and never log to wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are collected everywhere and skipped where no GPU is usable (CI, this project's CPU
    machines); `python -m pytest -m cuda tests/gpu` on a GPU machine runs them."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def full_float32_matmuls():
    """float32 matmuls in full precision for the test (torch's default; train.py lets CUDA use TF32, and a test that
    runs train.main in this process must not leave that to the next), restoring whatever was set before."""
    import torch
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
