"""Ground utilities every layer may use (nothing here imports from the rest of the package):
moving batches to a device, and seeding every random source."""
from __future__ import annotations

import os
import random
from typing import Any, Mapping

import numpy as np
import torch


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` (a tensor, or mappings / lists / tuples of them) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed used for everything random in one epoch: a run resumed at epoch e replays
    exactly what an uninterrupted run does from e on.

    >>> epoch_seed(0, 0), epoch_seed(0, 1) != epoch_seed(1, 0)
    (12345, True)
    """
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 12_345) % (2**31)


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def worker_init_fn(worker_id: int) -> None:
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)
