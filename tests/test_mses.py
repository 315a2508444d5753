"""MSES: patience logic by hand; a stopped modality's parameters never move again."""
import numpy as np
import pytest
import torch

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer, to_device
from mmbalance.methods.mses import mses_update
from helpers import tiny_data as make_tiny_data


def tiny_data(n=48, mods=("a", "b")):
    return make_tiny_data(n, mods, hidden=[8], dropout=0.2, batchnorm=True)


def make(**opts):
    o = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 3, "method.name": "mses", "train.progress": "off", "train.probe": False,
                             "model.fusion": "sum", "optim.name": "sgd", "optim.momentum": 0.9,
                             "optim.weight_decay": 1e-2, **o})
    return Trainer(cfg, data=tiny_data())


def run(losses, patience, min_delta=0.0):
    best, bad, out = float("inf"), 0, []
    for loss in losses:
        best, bad, stop = mses_update(best, bad, loss, patience, min_delta)
        out.append((best, bad, stop))
    return out


def test_patience_by_hand():
    out = run([1.0, 0.9, 0.95, 0.91, 0.89], patience=2)
    assert out == [(1.0, 0, False), (0.9, 0, False), (0.9, 1, False), (0.9, 2, True), (0.89, 0, False)]
    # min_delta: 0.96 is not an improvement over 1.0 by more than 0.05
    out = run([1.0, 0.96, 0.94], patience=3, min_delta=0.05)
    assert [o[1] for o in out] == [0, 1, 0] and out[-1][0] == 0.94
    assert run([1.0, 1.0], patience=1)[-1] == (1.0, 1, True)  # equal is not an improvement


def _steps(tr, k):
    loader = tr.loader(tr.data.train, shuffle=True, batch_size=16)
    tr.model.train()
    for i, batch in zip(range(k), loader):
        tr.method.training_step(to_device(batch, tr.device))


def test_stopped_encoder_is_frozen_exactly_other_keeps_training():
    tr = make()
    _steps(tr, 3)  # momentum buffers exist for every parameter now
    tr.method.freeze("a")
    snap = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    _steps(tr, 3)
    now = tr.model.state_dict()
    for k, v in now.items():
        if k.startswith("encoders.a."):  # weights and BatchNorm statistics unchanged, bit for bit
            assert torch.equal(v, snap[k]), k
    assert any(not torch.equal(now[k], snap[k]) for k in now if k.startswith("encoders.b.") and "weight" in k)
    assert not torch.equal(now["fusion.heads.a.weight"], snap["fusion.heads.a.weight"])  # the head trains on
    assert all(p.grad is None for p in tr.model.encoders["a"].parameters())


def test_epoch_end_stops_after_patience_and_state_round_trip(monkeypatch):
    tr = make(patience=2)
    m = tr.method
    script = iter([{"a": 1.0, "b": 1.0}, {"a": 1.1, "b": 0.9}, {"a": 1.2, "b": 0.8}, {"a": 0.1, "b": 0.7}])
    monkeypatch.setattr(m, "unimodal_val_loss", lambda: next(script))
    m.on_epoch_end(0)
    m.on_epoch_end(1)
    assert m.stopped == []
    m.on_epoch_end(2)
    assert m.stopped == ["a"]
    assert not any(p.requires_grad for p in tr.model.encoders["a"].parameters())
    m.on_epoch_end(3)  # a stopped modality stays stopped even if its loss improves
    assert m.stopped == ["a"]
    diag = m.epoch_diagnostics()
    assert diag["stopped_a"] == pytest.approx(0.5) and diag["stopped_b"] == 0.0 and "val_loss_b" in diag
    st = m.state_dict()
    fresh = make(patience=2)
    fresh.method.load_state_dict(st)
    assert fresh.method.stopped == ["a"] and fresh.method.bad_epochs["b"] == 0
    assert not any(p.requires_grad for p in fresh.model.encoders["a"].parameters())
    fresh.method.load_state_dict({"stopped": [], "best": st["best"], "bad_epochs": st["bad_epochs"]})
    assert all(p.requires_grad for p in fresh.model.encoders["a"].parameters())


def test_val_loss_uses_validation_split_only():
    tr = make()

    class Poisoned(torch.utils.data.Dataset):
        def __len__(self):
            raise AssertionError("MSES read the test split")

    tr.data.test = Poisoned()
    losses = tr.method.unimodal_val_loss()
    assert set(losses) == {"a", "b"} and all(np.isfinite(v) for v in losses.values())
