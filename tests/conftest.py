import os

import pytest

os.environ.setdefault("MMBALANCE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))


@pytest.fixture
def quick_overrides():
    """Config overrides for a short, quiet run on the embedded data."""
    return {"train.epochs": 4, "train.progress": "off", "train.probe": True}

import torch

# Tiny models: one thread is as fast as two and avoids thread over-subscription when several
# test processes share the machine.
torch.set_num_threads(1)
