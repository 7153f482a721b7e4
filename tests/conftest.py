import os
import sys
from pathlib import Path

import pytest
import torch

# The suite checks the math on the op-by-op kernels, whose random draws the hand-written tests
# reproduce; tests/test_kernels.py compiles the fused ones and holds them to the same math.
# Subprocesses (train.py) inherit it, so they start without compiling anything.
os.environ.setdefault("Q8_KERNELS", "eager")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    import q8

    q8.seed_rounding(None)  # a test that gave rounding its own stream must not change the next one's draws
