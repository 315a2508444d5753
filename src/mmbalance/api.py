"""The Python API: train a run, load a saved one, predict and evaluate.

>>> import mmbalance
>>> "arl" in mmbalance.list_methods() and "uci_mfeat" in mmbalance.list_datasets()
True

A complete session (it trains, so it is run by ``tests/test_api.py`` from the README, not here)::

    run = mmbalance.train(method="arl", epochs=5, output_dir="runs/demo", **{"method.T": 4})
    run.results["test"]["accuracy"]
    again = mmbalance.load_run("runs/demo")          # no training data, no optimizer
    again.predict({"pix": x_pix, "fou": x_fou}).labels
    again.evaluate("test")                           # the numbers of results.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from .config import SHORT_FLAGS, RunConfig, load_config
from .data import DataSplits, build_dataset, list_datasets
from .engine.assembly import amp_dtype, build_method, resolve_device, spec_from_dict
from .engine.inference import InferenceHandle, predict_batches, split_metrics
from .engine.rundir import RunFolder, load_model_state
from .engine.trainer import Trainer, load_run_config
from .methods import Method, ModelSpec, create_method, list_methods
from .models import MultimodalModel, list_encoders, list_fusions
from .registry import ConfigError
from .utils import to_device

__all__ = ["Prediction", "Run", "create_method", "list_datasets", "list_encoders", "list_fusions", "list_methods",
           "load_dataset", "load_run", "train"]


def load_dataset(name: str = "uci_mfeat", **options: Any) -> DataSplits:
    """A registered dataset (or a ``.npz`` features file) as train/val/test splits."""
    return build_dataset(name, **options)


@dataclass
class Prediction:
    """Fused logits, class probabilities and predicted labels, plus each modality's logits."""

    logits: torch.Tensor
    probabilities: torch.Tensor
    labels: torch.Tensor
    unimodal_logits: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Run:
    """A trained run: its resolved config, model, method (prediction rule) and results."""

    config: RunConfig
    method: Method
    model: MultimodalModel
    spec: ModelSpec
    device: torch.device
    results: dict[str, Any] | None = None
    run_dir: Path | None = None
    best_epoch: int | None = None

    @property
    def modalities(self) -> list[str]:
        return list(self.spec.modalities)

    def _handle(self) -> InferenceHandle:
        h = getattr(self, "_h", None)
        if h is None:
            h = InferenceHandle(self.model, self.device, self.config,
                                amp_dtype(self.config.train.precision, self.device), self.best_epoch or 0)
            self._h = h
        if self.method.trainer is None:
            self.method.trainer = h
        return h

    @torch.no_grad()
    def predict(self, inputs: Mapping[str, Any], present: Mapping[str, Any] | None = None) -> Prediction:
        """Predict a batch: ``inputs`` maps every modality to an array/tensor with a batch axis
        (shapes as in training); ``present`` optionally marks absent modalities per sample."""
        h = self._handle()
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ConfigError(f"predict needs inputs for {', '.join(missing)} (the run's modalities: "
                              f"{', '.join(self.modalities)})")
        x = {m: torch.as_tensor(inputs[m], dtype=torch.float32) for m in self.modalities}
        n = {m: v.shape[0] for m, v in x.items()}
        if len(set(n.values())) != 1:
            raise ConfigError(f"predict: inputs have different batch sizes {n}")
        for m, v in x.items():
            want = tuple(self.spec.input_shapes[m])
            if tuple(v.shape[1:]) != want:
                raise ConfigError(f"predict: modality {m} has per-sample shape {tuple(v.shape[1:])}, the model "
                                  f"expects {want}")
        B = next(iter(n.values()))
        pres = {m: torch.as_tensor(present[m], dtype=torch.bool) if present and m in present
                else torch.ones(B, dtype=torch.bool) for m in self.modalities}
        batch = to_device({"inputs": x, "present": pres, "label": torch.zeros(B, dtype=torch.long),
                           "index": torch.arange(B)}, self.device)
        was = self.model.training
        self.model.eval()
        try:
            with h.autocast():
                out = self.method.predict(batch)
        finally:
            self.model.train(was)
        logits = out.logits.float().cpu()
        return Prediction(logits, torch.softmax(logits, dim=1), logits.argmax(1),
                          {m: z.float().cpu() for m, z in out.unimodal_logits.items()})

    def evaluate(self, dataset: Dataset | str) -> dict[str, Any]:
        """Accuracy, macro-F1, mAP and loss, fused and per modality, on a dataset that follows
        the batch contract, or on ``"val"`` / ``"test"`` of the run's own dataset."""
        if isinstance(dataset, str):
            if dataset not in ("val", "test", "train"):
                raise ConfigError(f"evaluate takes a dataset or 'val'/'test'/'train', got {dataset!r}")
            data = build_dataset(self.config.dataset.name, **self.config.dataset.options)
            dataset = {"val": data.val, "test": data.test, "train": data.train_eval}[dataset]
        h = self._handle()
        logits, uni, labels = predict_batches(self.method, h.batches(dataset), self.modalities, h.autocast)
        return split_metrics(logits, uni, labels, self.spec.num_classes)


def _config_from(config: RunConfig | str | Path | Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> RunConfig:
    overrides: dict[str, Any] = {}
    path = None
    if isinstance(config, RunConfig):
        base = config
    else:
        base = None
        if isinstance(config, (str, Path)):
            path = config
        elif isinstance(config, Mapping):
            overrides.update(config)
        elif config is not None:
            raise ConfigError(f"train takes a RunConfig, a YAML path or a mapping, got {type(config).__name__}")
    for k, v in kwargs.items():
        key = k.replace("__", ".")
        overrides[SHORT_FLAGS.get(key, key)] = v
    return load_config(path, overrides, base=base)


def train(config: RunConfig | str | Path | Mapping[str, Any] | None = None, /, *, data: DataSplits | None = None,
          **kwargs: Any) -> Run:
    """Train a run and return it. ``config``: a RunConfig, a YAML file, or a mapping (nested or
    dotted keys); keyword arguments override it: the CLI's short names (``method``, ``dataset``,
    ``fusion``, ``epochs``, ``seed``, ``lr``, ``output_dir``, ...), dotted keys
    (``**{"method.T": 4}``) or ``__`` for the dot (``method__T=4``). ``data`` trains on
    in-memory :class:`DataSplits` instead of ``dataset.name``. Writes a run folder only when
    ``output_dir`` is given."""
    cfg = _config_from(config, kwargs)
    trainer = Trainer(cfg, cfg.output_dir, data=data)
    results = trainer.fit()
    return Run(trainer.cfg, trainer.method, trainer.model, trainer.spec, trainer.device, results,
               Path(cfg.output_dir) if cfg.output_dir else None, trainer.best_epoch)


def load_run(run_dir: str | Path, device: str = "cpu", checkpoint: str = "best.pt") -> Run:
    """Rebuild a saved run's model from its spec and checkpoint (``best.pt``: the one selected
    on validation), without its training data or an optimizer. Loads with ``weights_only``."""
    folder = RunFolder(run_dir, writes=False)
    cfg = load_run_config(folder.path)
    spec_path = folder / "model.json"
    if not spec_path.exists():
        raise ConfigError(f"{spec_path} does not exist (a run written by mmbalance < 0.2); "
                          f"re-evaluate it with mmbalance evaluate --run {folder.path}")
    try:
        spec = spec_from_dict(json.loads(spec_path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{spec_path} is damaged ({type(e).__name__}: {e})") from None
    dev = resolve_device(device)
    method = build_method(cfg)
    model = method.build_model(spec).to(dev)
    state = folder.load(checkpoint, dev)
    load_model_state(model, state["model"], folder / checkpoint)
    run = Run(cfg, method, model, spec, dev, None, folder.path, int(state.get("epoch", 0)))
    run._handle()  # the method gets its (inference) handle before its state is restored
    method.load_state_dict(state.get("method", {}))
    model.eval()
    if (folder / "results.json").exists():
        run.results = json.loads((folder / "results.json").read_text())
    return run
