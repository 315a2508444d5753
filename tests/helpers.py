"""Small builders shared by the method tests."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pytest
import torch

from mmbalance.config import RunConfig, load_config
from mmbalance.data.base import ArrayDataset, DataSplits


def quick_config(method: str, epochs: int = 2, **overrides: Any) -> RunConfig:
    """A short, quiet run of ``method`` on the embedded data; dotted ``overrides`` win."""
    base = {"train.epochs": epochs, "method.name": method, "train.progress": "off", "train.probe": False,
            "train.eval_batch_size": 512}
    base.update(overrides)
    return load_config(None, base)


def missing_masks(k: int, mods: Sequence[str], rate: float | Mapping[str, float],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Presence masks: each modality of each sample absent with probability ``rate`` (one for all
    or one per modality), never all modalities of one sample at once (such a sample keeps one
    modality, drawn at random)."""
    rates = np.array([rate.get(m, 0.0) if isinstance(rate, Mapping) else rate for m in mods])
    present = rng.random((k, len(mods))) >= rates
    empty = ~present.any(axis=1)
    present[np.flatnonzero(empty), rng.integers(0, len(mods), int(empty.sum()))] = True
    return {m: present[:, i] for i, m in enumerate(mods)}


def tiny_data(n: int = 48, mods: Sequence[str] = ("a", "b"), n_eval: int = 12, seed: int = 0,
              signal: Mapping[str, float] | None = None, missing: float | Mapping[str, float] = 0.0,
              **encoder_options: Any) -> DataSplits:
    """Three classes, 5-d features per modality: noise + ``signal[m] * label`` (default 1.0);
    MLP encoders with ``encoder_options``. ``missing``: each modality of each sample is absent
    with this probability (or ``{modality: rate}``; never all of a sample's modalities), in
    every split."""
    rng = np.random.default_rng(seed)
    signal = signal or {}

    def split(k: int) -> ArrayDataset:
        y = np.arange(k) % 3
        arrays = {m: (rng.standard_normal((k, 5)) + y[:, None] * signal.get(m, 1.0)).astype(np.float32)
                  for m in mods}
        present = missing_masks(k, mods, missing, rng) if missing else None
        return ArrayDataset(arrays, y, present)

    return DataSplits(train=split(n), val=split(n_eval), test=split(n_eval), modalities=list(mods),
                      num_classes=3, input_shapes={m: (5,) for m in mods},
                      default_encoders={m: "mlp" for m in mods},
                      encoder_options={m: dict(encoder_options) for m in mods})


def capture_step_grads(trainer, batch, outputs: dict | None = None) -> dict:
    """Run one ``training_step`` and return every parameter's gradient as the optimizer sees it
    (the step's own returned dict goes into ``outputs`` when given)."""
    model = trainer.model
    captured: dict = {}
    orig = trainer.optimizer_step

    def capture():
        captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        orig()

    trainer.optimizer_step = capture
    try:
        out = trainer.method.training_step(batch)
    finally:
        trainer.optimizer_step = orig
    if outputs is not None:
        outputs.update(out)
    return captured


def assert_score_diagnostics_skip_absent_steps(tr, batch, modality: str = "v", other: str = "a") -> None:
    """``score_<m>`` (the batch-mean probability of the true class from z_m) averages only the
    steps where m is present: one step on a batch with a single ``modality`` sample, one on a
    batch without it (no 0/0), checked against the model's own probabilities before each step."""
    pres = batch["present"][modality]
    sel = torch.cat([torch.nonzero(pres).view(-1)[:1], torch.nonzero(~pres).view(-1)])

    def rows(idx):
        return {k: ({m: t[idx] for m, t in v.items()} if isinstance(v, dict) else v[idx]) for k, v in batch.items()}

    one, none = rows(sel), rows(sel[1:])
    tr.model.train()
    expected = {other: []}
    for b in (one, none):
        with torch.no_grad():
            zm = tr.model(b["inputs"], b["present"]).unimodal_logits
        p_y = {m: zm[m].softmax(1).gather(1, b["label"].view(-1, 1)).view(-1) for m in (modality, other)}
        expected[other].append(float(p_y[other].mean()))
        if b is one:
            expected[modality] = float(p_y[modality][0])
        tr.method.training_step(b)
    d = tr.method.epoch_diagnostics()
    assert d[f"score_{modality}"] == pytest.approx(expected[modality], rel=1e-5)
    assert d[f"score_{other}"] == pytest.approx(sum(expected[other]) / 2, rel=1e-5)


def assert_step_ignores_absent_inputs(make_trainer, batch) -> None:
    """An invariant of every training step: what an absent modality's input holds cannot matter
    (the data contract zeroes it, but a step must not rely on that). Two identical trainers
    (``make_trainer()``; encoders without BatchNorm, whose batch statistics would see the rows)
    take one step, one on ``batch`` and one on a copy whose absent rows hold noise: the
    gradients must be the same."""
    g = torch.Generator().manual_seed(0)
    noisy = {**batch, "inputs": dict(batch["inputs"])}
    for m, x in batch["inputs"].items():
        absent = ~batch["present"][m].view(-1, *([1] * (x.dim() - 1)))
        noisy["inputs"][m] = torch.where(absent, torch.randn(x.shape, generator=g) * 5.0, x)
    assert any(not bool(p.all()) for p in batch["present"].values()), "the batch needs an absent modality"
    grads = []
    for b in (batch, noisy):
        tr = make_trainer()
        tr.model.train()
        grads.append(capture_step_grads(tr, b))
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
