"""Engine: the training loop, optimizers, checkpoints, seeding."""
from .trainer import Trainer, TrainingDiverged, default_run_dir, load_run_config

__all__ = ["Trainer", "TrainingDiverged", "default_run_dir", "load_run_config"]
