"""G-Blending: weights follow the OGR formula; the estimate never reads val/test; held-out split."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer
from mmbalance.utils import to_device
from mmbalance.methods.gblending import gblending_weights, holdout_split
from mmbalance.registry import ConfigError
from helpers import tiny_data as make_tiny_data


def tiny_data(n=60, seed=0, mods=("a", "b")):
    return make_tiny_data(n, mods, n_eval=15, seed=seed, signal={"a": 1.5, "b": 0.3}, hidden=[8], dropout=0.0)


def trainer(data=None, **method_opts):
    opts = {f"method.{k}": v for k, v in method_opts.items()}
    cfg = load_config(None, {"train.epochs": 1, "method.name": "gblending", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "optim.lr": 0.1, **opts})
    return Trainer(cfg, data=data or tiny_data())


class Poisoned(Dataset):
    def __len__(self):
        raise AssertionError("G-Blending read a forbidden split")

    def __getitem__(self, i):
        raise AssertionError("G-Blending read a forbidden split")


def test_weights_follow_formula_by_hand():
    # outputs: a, b, fused; losses before N and after N + n on T (train part) and V (held out)
    t0, t1 = [2.0, 2.0, 2.0], [1.0, 1.5, 0.8]
    v0, v1 = [2.0, 2.0, 2.0], [1.5, 1.6, 2.1]
    # gains 0.5, 0.4, -0.1; overfitting change (v1 - t1) - (v0 - t0) = 0.5, 0.1, 1.3
    w = gblending_weights(t0, t1, v0, v1, eps=0.0)
    raw = torch.tensor([0.5 / 0.25, 0.4 / 0.01, 0.0], dtype=torch.float64)
    torch.testing.assert_close(w, raw / raw.sum())
    wa = gblending_weights(t0, t1, v0, v1, eps=0.0, negative_gain="abs")
    raw = torch.tensor([2.0, 40.0, 0.1 / 1.69], dtype=torch.float64)
    torch.testing.assert_close(wa, raw / raw.sum())
    assert abs(float(wa.sum()) - 1) < 1e-12


def test_weights_eps_and_degenerate_cases():
    # zero overfitting change: eps keeps the weight finite
    w = gblending_weights([1.0, 1.0], [0.5, 0.5], [1.0, 1.0], [0.5, 0.4], eps=1e-2)
    raw = torch.tensor([0.5 / 1e-2, 0.6 / (0.01 + 1e-2)], dtype=torch.float64)
    torch.testing.assert_close(w, raw / raw.sum())
    # no output generalises: uniform
    w = gblending_weights([1.0, 1.0], [0.5, 0.5], [1.0, 1.0], [1.2, 1.0])
    torch.testing.assert_close(w, torch.full((2,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="negative_gain"):
        gblending_weights([1.0], [1.0], [1.0], [1.0], negative_gain="clip")


def test_holdout_split_disjoint_stratified_seeded():
    labels = np.repeat(np.arange(4), 25)
    tr, ho = holdout_split(labels, 0.2, seed=3)
    assert set(tr.tolist()).isdisjoint(ho.tolist())
    assert sorted(tr.tolist() + ho.tolist()) == list(range(100))
    assert np.bincount(labels[ho.numpy()]).tolist() == [5, 5, 5, 5]
    tr2, ho2 = holdout_split(labels, 0.2, seed=3)
    assert torch.equal(ho, ho2)
    assert not torch.equal(ho, holdout_split(labels, 0.2, seed=4)[1])
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_split(labels, 1.0, seed=0)
    for bad in (0.0, 1.2, -0.2):  # a direct call outside (0, 1) never returns a split
        with pytest.raises(ValueError, match=r"holdout_fraction must be in \(0, 1\)"):
            holdout_split(labels, bad, seed=0)
    with pytest.raises(ConfigError, match="leaves an empty part"):  # data-dependent
        holdout_split(np.arange(3), 0.1, seed=0)


def test_options_are_typed_one_line_errors():
    from mmbalance.methods import create_method

    for bad, msg in ((dict(mode="both"), "'mode' takes one of 'offline', 'online', got 'both'"),
                     (dict(estimate_epochs=0), "'estimate_epochs' takes an integer >= 1, got 0"),
                     (dict(super_epoch=0), "'super_epoch' takes an integer >= 1, got 0"),
                     (dict(holdout_fraction=1.0), "'holdout_fraction' takes a number in (0, 1), got 1.0"),
                     (dict(holdout_fraction=0), "'holdout_fraction' takes a number in (0, 1), got 0"),
                     (dict(holdout_seed=-1), "'holdout_seed' takes an integer >= 0 or null, got -1"),
                     (dict(eps=-1e-3), "'eps' takes a number >= 0, got -0.001"),
                     (dict(negative_gain="clip"), "'negative_gain' takes one of 'zero', 'abs', got 'clip'"),
                     (dict(train_on_holdout="maybe"), "'train_on_holdout' takes true/false or null, got 'maybe'"),
                     (dict(unimodal_heads="shared"),
                      "'unimodal_heads' takes one of 'separate', 'fusion', got 'shared'")):
        with pytest.raises(ConfigError) as e:
            create_method("gblending", **bad)
        assert str(e.value) == f"method 'gblending' option {msg}"
    m = create_method("gblending", estimate_epochs="2", holdout_fraction="0.3", train_on_holdout="no")
    assert (m.estimate_epochs, m.holdout_fraction, m.train_on_holdout) == (2, 0.3, False)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_estimate_never_reads_val_or_test(mode):
    tr = trainer(mode=mode, estimate_epochs=1)
    tr.data.val = Poisoned()
    tr.data.test = Poisoned()
    meth = tr.method
    meth.on_epoch_start(0)  # runs the estimate
    w = meth.weights
    assert set(w) == {"a", "b", "fused"} and abs(sum(w.values()) - 1) < 1e-9
    diag = meth.epoch_diagnostics()
    assert {"gain_a", "overfit_b", "gain_fused"} <= set(diag)
    # the training part and the held-out part are disjoint; online never trains on V
    assert set(meth.train_idx.tolist()).isdisjoint(meth.holdout_idx.tolist())
    ds = meth.train_dataset(0, tr.data.train)
    if mode == "online":
        assert len(ds) == len(meth.train_idx)
        assert {int(ds[i]["index"]) for i in range(len(ds))}.isdisjoint(meth.holdout_idx.tolist())
    else:
        assert len(ds) == len(tr.data.train)
    # the main model was not changed by the estimate (copies only)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    meth.estimate_weights()
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_training_step_uses_blended_loss_and_logs_weights():
    tr = trainer()
    meth = tr.method
    meth.weights = {"a": 0.2, "b": 0.3, "fused": 0.5}
    batch = to_device(next(iter(tr.loader(tr.data.train, batch_size=16))), tr.device)
    tr.model.eval()  # no dropout anyway; compute the reference loss before the step
    with torch.no_grad():
        out = tr.model(batch["inputs"], batch["present"])
        ce = torch.nn.functional.cross_entropy
        ref = 0.2 * ce(out.unimodal_logits["a"], batch["label"]) + 0.3 * ce(out.unimodal_logits["b"], batch["label"]) \
            + 0.5 * ce(out.logits, batch["label"])
    tr.model.train()
    stats = meth.training_step(batch)
    assert abs(stats["loss"] - float(ref)) < 1e-5
    meth.on_epoch_end(0)
    assert meth.epoch_diagnostics()["w_b"] == pytest.approx(0.3)
    assert meth.state_dict()["weights"]["fused"] == 0.5


def test_fit_end_to_end_offline():
    tr = trainer(estimate_epochs=1)
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    assert res["method_options"]["mode"] == "offline"


# ---------------------------------------------------------------------------------------------
# architecture, reference step, estimation details, modes, resume
import copy

import torch.nn.functional as F

from mmbalance.engine.seed import epoch_seed
from mmbalance.engine.trainer import fusion_name
from mmbalance.methods.gblending import FUSED, BlendingHeads
from helpers import capture_step_grads


def bn_data(n=60, seed=0):
    return make_tiny_data(n, ("a", "b"), n_eval=15, seed=seed, signal={"a": 1.5, "b": 0.3}, hidden=[8],
                          dropout=0.0, batchnorm=True)


def first_batch(tr, n=16):
    return to_device(next(iter(tr.loader(tr.data.train, batch_size=n))), tr.device)


def test_estimation_with_a_one_sample_trailing_batch_and_batchnorm():
    """(training-part size mod batch size) = 1 with BatchNorm encoders: the copies' loader must
    drop that one-sample batch, as the engine does for the main loader (it crashed before)."""
    for n in range(40, 90):
        data = bn_data(n)
        tr = trainer(data=data, estimate_epochs=1)
        if len(tr.method.train_idx) % 16 == 1:
            break
    else:  # pragma: no cover
        pytest.fail("no split size with a one-sample trailing batch")
    tr.method.on_epoch_start(0)
    assert abs(sum(tr.method.weights.values()) - 1) < 1e-9


def test_separate_heads_are_the_default_and_fusion_heads_an_option():
    tr = trainer()
    fusion = tr.model.fusion
    assert isinstance(fusion, BlendingHeads) and fusion_name(tr.model) == "concat"
    batch = first_batch(tr)
    tr.model.eval()
    with torch.no_grad():
        out = tr.model(batch["inputs"], batch["present"])
        h = {m: tr.model.encode(m, batch["inputs"][m]) for m in ("a", "b")}
        # fused logits from the run's fusion, unimodal logits from the separate linear heads
        assert torch.allclose(out.logits, fusion.inner(h)[0], atol=1e-6)
        for m in ("a", "b"):
            assert torch.allclose(out.unimodal_logits[m], F.linear(h[m], fusion.heads[m].weight,
                                                                   fusion.heads[m].bias), atol=1e-6)
    plain = trainer(unimodal_heads="fusion")
    assert type(plain.model.fusion).__name__ == "ConcatFusion"
    with pytest.raises(ConfigError, match="option 'unimodal_heads' takes one of 'separate', 'fusion'"):
        trainer(unimodal_heads="shared")


def _reference_grads(model, batch, weights):
    """Expected gradients of one G-Blending step, by plain autograd on a copy of the model."""
    ref = copy.deepcopy(model)
    ref.train()
    out = ref(batch["inputs"], batch["present"])
    y = batch["label"]
    loss = weights[FUSED] * F.cross_entropy(out.logits, y)
    for m in ("a", "b"):
        loss = loss + weights[m] * F.cross_entropy(out.unimodal_logits[m], y)
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}, float(loss.detach())


@pytest.mark.parametrize("heads", ["separate", "fusion"])
def test_training_step_gradients_equal_a_hand_written_reference(heads):
    tr = trainer(unimodal_heads=heads)
    tr.method.weights = {"a": 0.6, "b": 0.15, FUSED: 0.25}
    batch = first_batch(tr)
    expected, loss = _reference_grads(tr.model, batch, tr.method.weights)
    tr.model.train()
    got = capture_step_grads(tr, batch)
    assert set(got) == set(expected)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_each_weight_reaches_only_its_own_output():
    """Weight on modality a alone: only a's encoder and a's head get gradient (separate heads);
    on the fused output alone: the unimodal heads get none."""
    tr = trainer()
    batch = first_batch(tr)
    tr.method.weights = {"a": 1.0, "b": 0.0, FUSED: 0.0}
    got = capture_step_grads(tr, batch)
    for n, g in got.items():
        reached = n.startswith("encoders.a.") or n.startswith("fusion.heads.a.")
        assert bool(g.abs().sum() > 0) == reached, n
    tr.method.weights = {"a": 0.0, "b": 0.0, FUSED: 1.0}
    got = capture_step_grads(tr, batch)
    assert all(float(g.abs().sum()) == 0.0 for n, g in got.items() if n.startswith("fusion.heads."))
    assert all(float(g.abs().sum()) > 0.0 for n, g in got.items() if n.startswith("fusion.inner."))


def test_unimodal_output_loss_uses_only_that_modality():
    tr = trainer()
    batch = first_batch(tr)
    poisoned = {**batch, "inputs": {**batch["inputs"], "b": torch.full_like(batch["inputs"]["b"], float("nan"))}}
    model = tr.model
    model.eval()
    with torch.no_grad():
        la = tr.method._output_loss(model, poisoned, "a")
        ref = F.cross_entropy(model.fusion.heads["a"](model.encode("a", batch["inputs"]["a"])), batch["label"])
        assert torch.isfinite(la) and torch.allclose(la, ref, atol=1e-6)
        assert torch.isnan(tr.method._output_loss(model, poisoned, FUSED))


def test_loss_pass_is_an_eval_mode_mean_over_the_dataset():
    tr = trainer(data=bn_data())
    model = tr.model
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    ds = torch.utils.data.Subset(tr.data.train, list(range(23)))
    got = tr.method._mean_loss(model, ds, "b")
    assert model.training  # the model's mode is restored after the pass ...
    assert all(torch.equal(buffers[k], model.state_dict()[k]) for k in buffers)  # ... which ran in eval mode
    model.eval()
    with torch.no_grad():
        x = torch.stack([ds[i]["inputs"]["b"] for i in range(23)])
        y = torch.stack([ds[i]["label"] for i in range(23)])
        ref = F.cross_entropy(model.fusion.heads["b"](model.encode("b", x)), y)
    assert got == pytest.approx(float(ref), abs=1e-6)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_estimation_equals_a_hand_written_reference(mode, monkeypatch):
    """One output's curves (losses on T and V before and after two epochs of CE(z_k) on T) from
    plain torch: same copy, same optimizer (fresh offline; the main one's state online), same
    shuffles, the one-sample batch dropped, the run's gradient clip; and the weights follow from
    the logged gains and overfitting changes with the run's eps and negative_gain."""
    from mmbalance.engine.optim import build_optimizer

    cfg = load_config(None, {"train.epochs": 1, "method.name": "gblending", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "optim.lr": 0.1, "optim.momentum": 0.9,
                             "optim.grad_clip": 0.05, "method.mode": mode, "method.estimate_epochs": 2,
                             "method.eps": 0.3, "method.negative_gain": "abs"})
    tr = Trainer(cfg, data=bn_data(61))
    meth = tr.method
    tr.model.train()
    meth.weights = {"a": 0.3, "b": 0.3, FUSED: 0.4}
    meth.training_step(first_batch(tr))  # the main optimizer now holds momentum
    T, V = meth.train_idx.tolist(), meth.holdout_idx.tolist()
    assert len(T) % 16 == 1

    def stack(ids):
        items = [tr.data.train[i] for i in ids]
        return torch.stack([it["inputs"]["a"] for it in items]), torch.stack([it["label"] for it in items])

    def za(model, x):
        return model.fusion.heads["a"](model.encode("a", x))

    model = copy.deepcopy(tr.model)
    opt = build_optimizer(model.parameters(), tr.cfg.optim)
    if mode == "online":
        opt.load_state_dict(copy.deepcopy(tr.optimizer.state_dict()))
    (xt, yt), (xv, yv) = stack(T), stack(V)

    def losses():
        model.eval()
        with torch.no_grad():
            return float(F.cross_entropy(za(model, xt), yt)), float(F.cross_entropy(za(model, xv), yv))

    t0, v0 = losses()
    for e in range(2):
        g = torch.Generator()
        g.manual_seed(epoch_seed(tr.cfg.train.seed, 0) + 1 + e)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(tr.data.train, T), batch_size=16,
                                             shuffle=True, generator=g, drop_last=True)
        model.train()
        for batch in loader:
            opt.zero_grad()
            F.cross_entropy(za(model, batch["inputs"]["a"]), batch["label"]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
    t1, v1 = losses()
    meth.epoch_diagnostics()
    import mmbalance.methods.gblending as gb

    seen = []
    real = gb.gblending_weights
    monkeypatch.setattr(gb, "gblending_weights", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    w = meth.estimate_weights()
    (args, kwargs), = seen  # the options reach the formula
    assert {**dict(zip(("eps", "negative_gain"), args[4:])), **kwargs} == {"eps": 0.3, "negative_gain": "abs"}
    diag = meth.epoch_diagnostics()
    assert diag["gain_a"] == pytest.approx(v0 - v1, abs=1e-5)
    assert diag["overfit_a"] == pytest.approx((v1 - t1) - (v0 - t0), abs=1e-5)
    raw = {k: abs(diag[f"gain_{k}"]) / (diag[f"overfit_{k}"] ** 2 + 0.3) for k in ("a", "b", FUSED)}
    for k in raw:
        assert w[k] == pytest.approx(raw[k] / sum(raw.values()), rel=1e-6)


@pytest.mark.parametrize("was_training", [True, False])
def test_estimation_leaves_the_main_model_and_its_mode_unchanged(was_training):
    tr = trainer(data=bn_data(), estimate_epochs=1)
    tr.model.train(was_training)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.method.on_epoch_start(0)
    assert tr.model.training == was_training
    assert all(m.training == was_training for m in tr.model.modules())
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())  # weights and BN buffers


def test_online_re_estimation_epochs(monkeypatch):
    """Online: estimates at epochs 0, S, 2S (first and last of each super-epoch boundary), not in
    between; offline: only once."""
    calls = []

    def fake(self):
        calls.append(self.trainer.epoch)
        return {"a": 0.2, "b": 0.3, FUSED: 0.5}

    monkeypatch.setattr("mmbalance.methods.gblending.GBlending.estimate_weights", fake)
    tr = trainer(mode="online", super_epoch=3)
    for e in range(8):
        tr.epoch = e
        tr.method.on_epoch_start(e)
    assert calls == [0, 3, 6]
    calls.clear()
    tr = trainer(mode="offline", super_epoch=3)
    for e in range(8):
        tr.epoch = e
        tr.method.on_epoch_start(e)
    assert calls == [0]


def test_resume_state_round_trip_gives_the_same_next_step(monkeypatch):
    a = trainer(mode="online", super_epoch=4)
    a.method.weights = {"a": 0.5, "b": 0.1, FUSED: 0.4}
    batch = first_batch(a)
    a.model.train()
    a.method.training_step(batch)  # moves weights and optimizer state
    b = trainer(mode="online", super_epoch=4)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # as through a checkpoint file
    b.method.load_state_dict(a.method.state_dict())
    assert b.method.weights == a.method.weights and b.method.weights is not a.method.weights

    def boom(self):
        raise AssertionError("resumed run re-estimated between super-epochs")

    monkeypatch.setattr("mmbalance.methods.gblending.GBlending.estimate_weights", boom)
    b.epoch = 1
    b.method.on_epoch_start(1)
    b.model.train()
    ga, gb = capture_step_grads(a, batch), capture_step_grads(b, batch)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_holdout_options_reach_the_split():
    from mmbalance.data.base import labels_of

    data = tiny_data()
    labels = labels_of(data.train)
    tr = trainer(data=data, holdout_fraction=0.3, holdout_seed=7)
    assert torch.equal(tr.method.holdout_idx, holdout_split(labels, 0.3, 7)[1])
    tr = trainer(data=data)  # default: the run's seed, 20 %
    assert torch.equal(tr.method.holdout_idx, holdout_split(labels, 0.2, tr.cfg.train.seed)[1])


# ---------------------------------------------------------------------------------------------
# mutation-testing additions
def test_unimodal_output_loss_with_encoders_of_unequal_width():
    """A modality's copy sees only that modality even when the others' features have another
    width (the absent features take each modality's own width)."""
    data = tiny_data()
    data.encoder_options["b"] = {"hidden": [5], "dropout": 0.0}
    tr = trainer(data=data)
    model = tr.model
    assert model.feature_dim("a") == 8 and model.feature_dim("b") == 5
    batch = first_batch(tr)
    model.eval()
    with torch.no_grad():
        for m in ("a", "b"):
            ref = F.cross_entropy(model.fusion.heads[m](model.encode(m, batch["inputs"][m])), batch["label"])
            torch.testing.assert_close(tr.method._output_loss(model, batch, m), ref)


def test_fused_output_loss_applies_the_absent_policy():
    """``feature`` policy with missing modalities: the fused copy's loss is the model's output
    for the batch's present masks (absent features zeroed), not for everything present."""
    data = make_tiny_data(60, ("a", "b"), n_eval=15, signal={"a": 1.5, "b": 0.3}, hidden=[8], dropout=0.0,
                          missing=0.4)
    cfg = load_config(None, {"train.epochs": 1, "method.name": "gblending", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "model.absent_policy": "feature"})
    tr = Trainer(cfg, data=data)
    batch = first_batch(tr)
    assert not all(bool(p.all()) for p in batch["present"].values())
    model = tr.model.eval()
    with torch.no_grad():
        got = tr.method._output_loss(model, batch, FUSED)
        want = F.cross_entropy(model(batch["inputs"], batch["present"]).logits, batch["label"])
        everything = F.cross_entropy(model(batch["inputs"]).logits, batch["label"])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, everything)


def test_loss_passes_read_the_deterministic_copy_of_the_training_split(monkeypatch):
    """L^T and L^V are measured on ``train_eval`` (test-time transforms), the copies train on
    ``train`` (training transforms), each on its own positions."""
    data = tiny_data()
    data.train_eval = copy.copy(data.train)  # another object standing for the eval-transform view
    tr = trainer(data=data, estimate_epochs=1)
    meth = tr.method
    measured, fitted = [], []
    monkeypatch.setattr(meth, "_mean_loss", lambda model, ds, k: (measured.append(ds), 1.0)[1])
    monkeypatch.setattr(meth, "_train_copy", lambda model, opt, ds, k: fitted.append(ds))
    meth.estimate_weights()
    assert len(measured) == 4 * 3 and len(fitted) == 3
    assert all(ds.dataset is data.train_eval for ds in measured)
    assert all(ds.dataset is data.train and ds.indices == meth.train_idx.tolist() for ds in fitted)
    assert {tuple(ds.indices) for ds in measured} == {tuple(meth.train_idx.tolist()), tuple(meth.holdout_idx.tolist())}


def test_training_step_without_the_epoch_hooks_estimates_the_weights_first():
    tr = trainer(estimate_epochs=1)
    meth = tr.method
    assert meth.weights is None
    batch = first_batch(tr)
    before = copy.deepcopy(tr.model)
    tr.model.train()
    stats = meth.training_step(batch)
    w = meth.weights
    assert set(w) == {"a", "b", FUSED} and abs(sum(w.values()) - 1) < 1e-9
    before.train()
    with torch.no_grad():
        out = before(batch["inputs"], batch["present"])
        y = batch["label"]
        ref = w[FUSED] * F.cross_entropy(out.logits, y) + sum(w[m] * F.cross_entropy(out.unimodal_logits[m], y)
                                                               for m in ("a", "b"))
    assert float(stats["loss"]) == pytest.approx(float(ref), rel=1e-5)


def test_state_saved_before_any_estimate_resumes_into_an_estimate():
    a = trainer(estimate_epochs=1)
    state = a.method.state_dict()
    assert state == {"weights": None}
    b = trainer(estimate_epochs=1)
    b.method.weights = {"a": 0.2, "b": 0.3, FUSED: 0.5}
    b.method.load_state_dict(state)
    assert b.method.weights is None and b.method.estimate_due(3)


def test_copies_train_on_each_ranks_share_of_the_global_batches(monkeypatch):
    """Two simulated processes: each rank's copy trains on half of every global batch, and the
    two halves are exactly the batch one process trains on (sharded, not repeated whole)."""
    tr = trainer(estimate_epochs=2)
    meth = tr.method
    fit_set = torch.utils.data.Subset(tr.data.train, meth.train_idx.tolist())
    seen = []
    real = meth._output_loss
    monkeypatch.setattr(meth, "_output_loss",
                        lambda model, batch, k, reduction="mean": (seen.append(batch["index"].tolist()),
                                                                   real(model, batch, k, reduction))[1])
    monkeypatch.setattr(tr, "average_gradients", lambda params: None)
    monkeypatch.setattr(tr, "broadcast_buffers", lambda module: None)

    def run(rank, world):
        monkeypatch.setattr(Trainer, "rank", property(lambda self: rank))
        monkeypatch.setattr(Trainer, "world_size", property(lambda self: world))
        seen.clear()
        model = copy.deepcopy(tr.model)
        meth._train_copy(model, tr.make_optimizer(model.parameters()), fit_set, "a")
        return list(seen)

    one, r0, r1 = run(0, 1), run(0, 2), run(1, 2)
    assert len(one) == len(r0) == len(r1) == 2 * 3  # 48 training-part samples, global batch 16, 2 epochs
    for a, b, c in zip(r0, r1, one):
        assert len(a) == len(b) == len(c) // 2 == 8
        assert sorted(a + b) == sorted(c)


def test_step_ignores_what_absent_inputs_hold_under_both_policies():
    """With missing modalities the blended step reads the presence masks: noise in the absent
    rows' inputs changes no gradient (``feature`` policy: absent features are zeroed by the
    masks, not by the data)."""
    from helpers import assert_step_ignores_absent_inputs

    data = make_tiny_data(60, ("a", "b"), n_eval=15, signal={"a": 1.5, "b": 0.3}, hidden=[8], dropout=0.0,
                          batchnorm=False, missing=0.4)
    for policy in ("input", "feature"):
        cfg = load_config(None, {"train.epochs": 1, "method.name": "gblending", "train.progress": "off",
                                 "train.probe": False, "train.batch_size": 16, "model.absent_policy": policy,
                                 "method.estimate_epochs": 1})
        make = lambda: Trainer(cfg, data=data)  # noqa: E731
        assert_step_ignores_absent_inputs(make, first_batch(make()))
