import os

import torch

os.environ.setdefault("MMBALANCE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test"))

# Tiny models: one thread is as fast as two and avoids thread over-subscription when several
# test processes share the machine.
torch.set_num_threads(1)
