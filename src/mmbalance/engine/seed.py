"""Seeding (kept for compatibility; the functions live in :mod:`mmbalance.utils`)."""
from ..utils import epoch_seed, seed_everything, set_deterministic, worker_init_fn

__all__ = ["epoch_seed", "seed_everything", "set_deterministic", "worker_init_fn"]
