"""MSES: patience and smoothing by hand; a stopped modality's parameters never move again; rollback;
the step against a reference; the validation pass; resume."""
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


# ---------------------------------------------------------------------------------- smoothing, rollback
import copy  # noqa: E402
import json  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from mmbalance.methods.mses import MSES, mses_smoothed_loss  # noqa: E402
from mmbalance.registry import ConfigError  # noqa: E402
from helpers import capture_step_grads  # noqa: E402


def test_smoothed_loss_by_hand_and_option_errors():
    assert mses_smoothed_loss(None, 2.0, 0.6) == 2.0  # the first epoch uses its own loss
    assert mses_smoothed_loss(1.0, 2.0, 0.6) == pytest.approx(0.6 * 1.0 + 0.4 * 2.0)
    assert mses_smoothed_loss(1.0, 2.0, 0.0) == 2.0
    m = MSES()
    assert (m.patience, m.min_delta, m.loss_smoothing, m.rollback) == (5, 0.0, 0.0, "none")  # the paper's rule
    from mmbalance.methods import create_method

    for bad, msg in (({"patience": 0}, "'patience' takes an integer >= 1, got 0"),
                     ({"min_delta": -1.0}, "'min_delta' takes a number >= 0, got -1.0"),
                     ({"loss_smoothing": 1.0}, "'loss_smoothing' takes a number in [0, 1), got 1.0"),
                     ({"loss_smoothing": -0.1}, "'loss_smoothing' takes a number in [0, 1), got -0.1"),
                     ({"rollback": "best"}, "'rollback' takes one of 'none', 'encoder', 'model', got 'best'")):
        with pytest.raises(ConfigError) as e:
            create_method("mses", **bad)
        assert str(e.value) == f"method 'mses' option {msg}"
    assert create_method("mses", patience="81", loss_smoothing="0.6").patience == 81


def _scripted(monkeypatch, m, losses):
    script = iter(losses)
    monkeypatch.setattr(m, "unimodal_val_loss", lambda: next(script))


def test_smoothing_blends_the_previous_raw_loss(monkeypatch):
    # raw losses 1.0, 0.5, 0.9: raw scoring stops at epoch 2 (patience 1); smoothed scores are
    # 1.0, 0.6*1.0+0.4*0.5 = 0.8, 0.6*0.5+0.4*0.9 = 0.66 (previous *raw* loss): always improving
    raw = [{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.9}, {"a": 0.9, "b": 0.8}]
    plain = make(patience=1)
    _scripted(monkeypatch, plain.method, raw)
    for e in range(3):
        plain.method.on_epoch_end(e)
    assert plain.method.stopped == ["a"]
    tr = make(patience=1, loss_smoothing=0.6)
    m = tr.method
    _scripted(monkeypatch, m, raw)
    m.on_epoch_end(0)
    m.epoch_diagnostics()
    m.on_epoch_end(1)
    assert m.best["a"] == pytest.approx(0.8) and m.epoch_diagnostics()["val_score_a"] == pytest.approx(0.8)
    m.on_epoch_end(2)
    assert m.stopped == [] and m.best["a"] == pytest.approx(0.66) and m.bad_epochs == {"a": 0, "b": 0}
    diag = m.epoch_diagnostics()
    assert diag["val_score_a"] == pytest.approx(0.66) and diag["val_loss_a"] == 0.9
    assert "val_score_a" not in plain.method.epoch_diagnostics()


def _train_steps(tr, k, seed=0):
    loader = tr.loader(tr.data.train, shuffle=True, batch_size=16, seed=seed)
    tr.model.train()
    for i, batch in zip(range(k), loader):
        tr.method.training_step(to_device(batch, tr.device))


@pytest.mark.parametrize("rollback", ["none", "encoder", "model"])
def test_rollback_returns_to_the_best_epoch(monkeypatch, rollback):
    tr = make(patience=2, rollback=rollback)
    m = tr.method
    _scripted(monkeypatch, m, [{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 2.0}, {"a": 0.6, "b": 0.4},
                               {"a": 0.7, "b": 0.3}])
    states = []
    for epoch in range(4):
        _train_steps(tr, 2, seed=epoch)
        states.append({"model": copy.deepcopy(tr.model.state_dict()),
                       "opt": copy.deepcopy(tr.optimizer.state_dict())})
        if epoch == 3:
            tr.optimizer.param_groups[0]["lr"] = 0.005  # a scheduled lr is kept by a rollback
        m.on_epoch_end(epoch)
    # a: best at epoch 1, two bad epochs (2, 3) -> stopped at epoch 3; b improves throughout
    assert m.stopped == ["a"]
    now = tr.model.state_dict()
    src = states[1] if rollback == "model" else states[3]
    for k, v in now.items():
        if k.startswith("encoders.a."):
            expect = states[1]["model"][k] if rollback != "none" else states[3]["model"][k]
        else:
            expect = src["model"][k]
        assert torch.equal(v, expect), k
    opt = tr.optimizer.state_dict()
    mom = {i: s["momentum_buffer"] for i, s in opt["state"].items()}
    src_opt = (states[1] if rollback == "model" else states[3])["opt"]
    assert all(torch.equal(mom[i], s["momentum_buffer"]) for i, s in src_opt["state"].items())
    assert tr.optimizer.param_groups[0]["lr"] == 0.005
    assert not any(p.requires_grad for p in tr.model.encoders["a"].parameters())


def test_model_rollback_keeps_an_earlier_stopped_encoder(monkeypatch):
    tr = make(patience=1, rollback="model")
    m = tr.method
    # b's best is epoch 1 (snapshot taken before a stops at epoch 2); b stops at epoch 3
    _scripted(monkeypatch, m, [{"a": 1.0, "b": 1.0}, {"a": 1.1, "b": 0.5}, {"a": 1.2, "b": 0.6}])
    _train_steps(tr, 2, seed=0)
    m.on_epoch_end(0)
    _train_steps(tr, 2, seed=1)
    m.on_epoch_end(1)  # a stops here (rolled back to epoch 0), b's best
    assert m.stopped == ["a"]
    frozen_a = copy.deepcopy(tr.model.encoders["a"].state_dict())
    _train_steps(tr, 2, seed=2)
    m.on_epoch_end(2)  # b stops: the model returns to b's best epoch, a's frozen encoder stays
    assert m.stopped == ["a", "b"]
    assert all(torch.equal(v, frozen_a[k]) for k, v in tr.model.encoders["a"].state_dict().items())


def _reference_grads(tr, batch, stopped):
    ref = copy.deepcopy(tr.model)
    ref.train()
    for s in stopped:
        ref.encoders[s].eval()
        for p in ref.encoders[s].parameters():
            p.requires_grad_(False)
    torch.manual_seed(5)
    loss = F.cross_entropy(ref(batch["inputs"], batch["present"]).logits, batch["label"])
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}, float(loss)


@pytest.mark.parametrize("stopped", [[], ["a"]])
def test_training_step_matches_reference(stopped):
    """Fused CE only; a stopped encoder runs in eval mode (no dropout, BatchNorm statistics
    used, not updated) and gets no gradient; everything else trains."""
    tr = make()
    _train_steps(tr, 2)
    for s in stopped:
        tr.method.freeze(s)
    tr.model.train()  # as the engine does at every epoch start
    batch = to_device(next(iter(tr.loader(tr.data.train, batch_size=16))), tr.device)
    ref, ref_loss = _reference_grads(tr, batch, stopped)
    torch.manual_seed(5)
    reported = {}
    orig = tr.method.training_step
    tr.method.training_step = lambda b: reported.update(orig(b)) or reported
    grads = capture_step_grads(tr, batch)
    del tr.method.training_step
    # the loss the step reports (the epoch's train loss in metrics.jsonl) is the fused CE it stepped on
    assert float(reported["loss"]) == pytest.approx(ref_loss, rel=1e-6)
    assert set(grads) == set(ref)
    assert any(n.startswith("encoders.b.") for n in grads) and any(n.startswith("fusion.heads.a.") for n in grads)
    assert any(n.startswith("encoders.a.") for n in grads) == (not stopped)
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_validation_pass_is_eval_mode_and_leaves_train_mode_and_buffers():
    tr = make(patience=1, min_delta=10.0)  # every epoch after the first is "not better"
    m = tr.method
    _train_steps(tr, 2)
    buffers = {k: v.clone() for k, v in tr.model.named_buffers()}
    # the validation loss by hand: eval-mode model (dropout off, BatchNorm running statistics)
    ref = copy.deepcopy(tr.model).eval()
    val = tr.data.val
    xs = {mm: torch.stack([val[i]["inputs"][mm] for i in range(len(val))]) for mm in ("a", "b")}
    ys = torch.stack([val[i]["label"] for i in range(len(val))])
    with torch.no_grad():
        out = ref(xs)
    expect = {mm: float(F.cross_entropy(out.unimodal_logits[mm], ys)) for mm in ("a", "b")}
    tr.model.train()
    m.on_epoch_end(0)
    diag = m.epoch_diagnostics()
    assert diag["val_loss_a"] == pytest.approx(expect["a"], rel=1e-5)
    assert diag["val_loss_b"] == pytest.approx(expect["b"], rel=1e-5)
    assert all(torch.equal(v, buffers[k]) for k, v in tr.model.named_buffers())  # the pass moved no statistic
    assert all(mod.training for mod in tr.model.modules())
    m.on_epoch_end(1)  # both stop
    assert m.stopped == ["a", "b"]
    m.on_epoch_end(2)  # a later pass (train mode again at its end) leaves stopped encoders in eval mode
    assert not any(mod.training for mm in ("a", "b") for mod in tr.model.encoders[mm].modules())
    assert tr.model.fusion.training


def _fit(tmp_path, name, resume=False, **opts):
    o = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 3, "method.name": "mses", "train.progress": "off", "train.probe": False,
                             "model.fusion": "sum", "train.batch_size": 16, "train.stop_after_epochs": 2, **o})
    if not resume:
        cfg.train.stop_after_epochs = 2 if name == "part" else None
    return Trainer(cfg, run_dir=tmp_path / name, resume=resume, data=tiny_data()).fit()


def test_resume_equals_uninterrupted(tmp_path):
    """Stopped after 2 of 3 epochs, resumed: both modalities stop (and roll back to the first
    epoch's snapshot, taken before the interruption) in the third epoch; the same metrics,
    diagnostics and results as an uninterrupted run."""
    opts = {"patience": 2, "min_delta": 10.0, "loss_smoothing": 0.6, "rollback": "model"}
    full = _fit(tmp_path, "full", **opts)
    assert _fit(tmp_path, "part", **opts) is None
    part = _fit(tmp_path, "part", resume=True, **opts)
    lines = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
             for k in ("full", "part")}
    assert [x["diagnostics"]["stopped_a"] for x in lines["full"]] == [0.0, 0.0, 1.0]
    for key in ("val", "diagnostics", "train"):
        assert [x[key] for x in lines["full"]] == [x[key] for x in lines["part"]], key
    assert full["test"] == part["test"] and full["best_epoch"] == part["best_epoch"]
