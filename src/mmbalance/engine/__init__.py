"""Engine: assembly of a run, the training loop, the run folder, optimizers, distributed helpers."""
from .assembly import build_method, model_spec, resolve_config, resolve_device
from .rundir import RunFolder
from .trainer import Trainer, TrainingDiverged, default_run_dir, load_run_config

__all__ = ["RunFolder", "Trainer", "TrainingDiverged", "build_method", "default_run_dir", "load_run_config",
           "model_spec", "resolve_config", "resolve_device"]
