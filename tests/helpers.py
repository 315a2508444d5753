"""Small builders shared by the method tests."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from mmbalance.config import RunConfig, load_config
from mmbalance.data.base import ArrayDataset, DataSplits


def quick_config(method: str, epochs: int = 2, **overrides: Any) -> RunConfig:
    """A short, quiet run of ``method`` on the embedded data; dotted ``overrides`` win."""
    base = {"train.epochs": epochs, "method.name": method, "train.progress": "off", "train.probe": False,
            "train.eval_batch_size": 512}
    base.update(overrides)
    return load_config(None, base)


def tiny_data(n: int = 48, mods: Sequence[str] = ("a", "b"), n_eval: int = 12, seed: int = 0,
              signal: Mapping[str, float] | None = None, **encoder_options: Any) -> DataSplits:
    """Three classes, 5-d features per modality: noise + ``signal[m] * label`` (default 1.0);
    MLP encoders with ``encoder_options``."""
    rng = np.random.default_rng(seed)
    signal = signal or {}

    def split(k: int) -> ArrayDataset:
        y = np.arange(k) % 3
        arrays = {m: (rng.standard_normal((k, 5)) + y[:, None] * signal.get(m, 1.0)).astype(np.float32)
                  for m in mods}
        return ArrayDataset(arrays, y)

    return DataSplits(train=split(n), val=split(n_eval), test=split(n_eval), modalities=list(mods),
                      num_classes=3, input_shapes={m: (5,) for m in mods},
                      default_encoders={m: "mlp" for m in mods},
                      encoder_options={m: dict(encoder_options) for m in mods})


def capture_step_grads(trainer, batch) -> dict:
    """Run one ``training_step`` and return every parameter's gradient as the optimizer sees it."""
    model = trainer.model
    captured: dict = {}
    orig = trainer.optimizer_step

    def capture():
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        orig()

    trainer.optimizer_step = capture
    try:
        trainer.method.training_step(batch)
    finally:
        trainer.optimizer_step = orig
    return captured
