"""ReconBoost: the stage schedule, the boosting weights / loss and the consolidation term by hand,
the ensemble head, one phase-1 and one phase-2 step against hand-written references (which
parameters each reaches), the frozen learners' mode, optimizer resets at phase starts, two
simulated processes, resume across a phase boundary and option errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.reconboost import (BoostEnsemble, boosting_loss, boosting_weights, consolidation_loss,
                                          reconboost_schedule)
from mmbalance.registry import ConfigError

from helpers import capture_step_grads, tiny_data
from mmbalance.utils import to_device
from simulated_ranks import run_two_ranks, shard_batch


# ---------------------------------------------------------------------------------------------
# pure math
def test_schedule_by_hand():
    got = [(p.stage, p.phase, p.learner, p.phase_start) for p in (reconboost_schedule(e, 2, 3, 2) for e in range(11))]
    assert got == [(0, 1, 0, True), (0, 1, 0, False), (0, 2, 0, True), (0, 2, 0, False), (0, 2, 0, False),
                   (1, 1, 1, True), (1, 1, 1, False), (1, 2, 1, True), (1, 2, 1, False), (1, 2, 1, False),
                   (2, 1, 0, True)]
    # three modalities, no rectification: a, v, t, a, ... one epoch each, every epoch a phase start
    got = [(p.stage, p.phase, p.learner, p.phase_start) for p in (reconboost_schedule(e, 1, 0, 3) for e in range(4))]
    assert got == [(0, 1, 0, True), (1, 1, 1, True), (2, 1, 2, True), (3, 1, 0, True)]
    # one modality: every stage boosts it (the others' ensemble is then the uniform prediction)
    got = [(p.stage, p.phase, p.learner) for p in (reconboost_schedule(e, 2, 1, 1) for e in range(4))]
    assert got == [(0, 1, 0), (0, 1, 0), (0, 2, 0), (1, 1, 0)]
    # each argument is checked on its own: no boosting epoch, a negative rectification, no modality
    for bad in ((0, 1, 2), (2, -1, 2), (2, 1, 0)):
        with pytest.raises(ConfigError):
            reconboost_schedule(0, *bad)


def test_boosting_weights_and_loss_by_hand():
    z_others = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 2])
    p = torch.tensor([1 / 3, torch.e ** 2 / (torch.e ** 2 + 2), 1 / (torch.e + 2)])
    w = boosting_weights(z_others, y, 5.0, 1.0, 3)
    assert torch.allclose(w, (5.0 - p) / 3)
    assert torch.allclose(boosting_weights(None, y, 5.0, 1.0, 3), torch.full((3,), (5.0 - 1 / 3) / 3))
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    per = boosting_loss(z, z_others, y, 5.0, 1.0)
    logp = torch.log_softmax(z.detach(), 1)[torch.arange(3), y]
    assert torch.allclose(per, -(5.0 - p) / 3 * logp)
    # the official form: -w1 mean_c(onehot * log p) + w2 mean_c(onehot * softmax(F) * log p)
    onehot = F.one_hot(y, 3).float()
    lp = torch.log_softmax(z.detach(), 1)
    official = -5.0 * (onehot * lp).mean(1) + 1.0 * (onehot * z_others.softmax(1) * lp).mean(1)
    assert torch.allclose(per, official)
    # the weights are constants: the gradient is the weighted CE gradient of z only
    per.sum().backward()
    assert torch.allclose(z.grad, ((5.0 - p) / 3).view(-1, 1) * (torch.softmax(z.detach(), 1) - onehot))


def test_consolidation_term_and_its_gradient():
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    zp = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    per = consolidation_loss(z, zp)
    p, q = z.detach().softmax(1), zp.detach().softmax(1)
    assert torch.allclose(per, ((p - q) ** 2).mean(1))
    assert torch.allclose(per.mean(), F.mse_loss(p, q))  # the public code's MSELoss
    per.sum().backward()
    # d/dz mean_c (p - q)^2 = (2 / C) J^T (p - q), J = diag(p) - p p^T
    for i in range(2):
        J = torch.diag(p[i]) - torch.outer(p[i], p[i])
        assert torch.allclose(z.grad[i], 2 / 3 * J.T @ (p[i] - q[i]), atol=1e-7)
    assert zp.grad is None  # the previous learner never gets a gradient
    z2 = z.detach().clone().requires_grad_(True)
    out = consolidation_loss(z2, zp, detach_current=True)
    assert torch.allclose(out, per.detach()) and not out.requires_grad  # the public code: no gradient


def test_ensemble_head_is_beta_times_the_sum_of_learners():
    torch.manual_seed(0)
    head = BoostEnsemble({"a": 4, "v": 4, "t": 2}, 3, head_hidden=5, boost_rate=0.7)
    assert isinstance(head.proj["a"], torch.nn.Identity) and isinstance(head.proj["t"], torch.nn.Linear)
    feats = {m: torch.randn(6, d) for m, d in (("a", 4), ("v", 4), ("t", 2))}
    z, zm = head(feats)
    for m in feats:
        assert torch.allclose(zm[m], head.head(head.proj[m](feats[m])))
    assert torch.allclose(z, 0.7 * (zm["a"] + zm["v"] + zm["t"]))
    # the shared head by hand: Linear -> ReLU -> Linear (the public code's Head)
    first, last = head.head[0], head.head[-1]
    hand = torch.relu(feats["a"] @ first.weight.T + first.bias) @ last.weight.T + last.bias
    assert torch.allclose(zm["a"], hand, atol=1e-6)
    assert isinstance(BoostEnsemble({"a": 4}, 3, head_hidden=0).head, torch.nn.Linear)
    # the single-learner boosting weights live on the labels' device (a CUDA run with one modality)
    w = boosting_weights(None, torch.zeros(4, dtype=torch.long, device="meta"), 5.0, 1.0, 3)
    assert w.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# training steps against hand-written references
def _trainer(mods=("a", "v"), missing=0.0, seed=0, bn=False, data_seed=0, **method):
    opts = {"epochs_per_stage": 1, "correct_epochs": 1, "head_hidden": 5, "boost_rate": 0.6, **method}
    over = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 6, "method.name": "reconboost", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "train.seed": seed, **over})
    return Trainer(cfg, data=tiny_data(32, mods, seed=data_seed, missing=missing, hidden=[6], dropout=0.0,
                                       batchnorm=bn, signal={"a": 2.0, "v": 0.3, "t": 0.8}))


def _batch(tr, seed=0, n=16):
    return next(iter(tr.loader(tr.data.train, batch_size=n, shuffle=True, seed=seed)))


def _step(tr, batch):
    """One ``training_step``: (the gradients the optimizer sees, the step's result)."""
    out = {}
    orig = tr.method.training_step

    def step(b):
        out["result"] = orig(b)
        return out["result"]

    tr.method.training_step = step
    try:
        grads = capture_step_grads(tr, batch)
    finally:
        del tr.method.training_step
    return grads, out["result"]


def _phase1_reference(tr, batch, m, prev, alpha, w1=5.0, w2=1.0, real=True):
    model = tr.model
    y, present = batch["label"], batch["present"]
    out = model(batch["inputs"], present)
    zm = out.unimodal_logits
    beta = float(model.fusion.beta.detach())
    ens = beta * sum(zm[j].detach() for j in model.modalities if j != m)
    C = zm[m].shape[1]
    p_ens = ens.softmax(1)[torch.arange(len(y)), y]
    logp = torch.log_softmax(zm[m], 1)[torch.arange(len(y)), y]
    pm = present[m]
    loss = (-(w1 - w2 * p_ens) / C * logp)[pm].mean()
    if prev is not None and alpha:
        both = pm & present[prev]
        cur = zm[m] if real else zm[m].detach()
        mse = ((cur.softmax(1) - zm[prev].detach().softmax(1)) ** 2).mean(1)
        loss = loss + alpha * (mse[both].mean() if both.any() else 0.0 * mse.sum())
    names, params = zip(*model.named_parameters())
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: g for n, g in zip(names, gs) if g is not None}


@pytest.mark.parametrize("mods,missing,epoch,opts", [
    (("a", "v"), 0.0, 0, {}),                                   # stage 0: learner a, no previous learner
    (("a", "v"), 0.0, 2, {}),                                   # stage 1: learner v, previous a
    (("a", "v"), 0.4, 2, {"reconcile_grad": "detached"}),       # the public code: the alpha term has no gradient
    (("a", "v", "t"), 0.3, 4, {"alpha": 2.0, "weight1": 3.0, "weight2": 2.0}),  # stage 2: learner t, previous v
    # BatchNorm, and absent inputs the loader left as they were: the learner's absent samples must
    # enter its batch statistics as the zeros of the input absent policy
    (("a", "v"), 0.4, 2, {"bn": True}),
])
def test_phase1_step_equals_the_hand_written_reference(mods, missing, epoch, opts):
    tr = _trainer(mods, missing, **opts)
    tr.epoch = epoch
    pos = tr.method.position(epoch)
    assert pos.phase == 1
    m = mods[pos.learner]
    prev = mods[(pos.stage - 1) % len(mods)] if pos.stage else None
    p_others = []
    for s in range(2):
        batch = _batch(tr, seed=s)
        if opts.get("bn"):
            for j in mods:
                absent = ~batch["present"][j]
                batch["inputs"][j][absent] = 3.0 + torch.randn(int(absent.sum()), 5)
        tr.model.train()
        with torch.no_grad():  # the others' ensemble's mean true-class probability over the samples with m
            zm = tr.model(batch["inputs"], batch["present"]).unimodal_logits
            ens = 0.6 * sum(zm[j] for j in mods if j != m)
            p = ens.softmax(1)[torch.arange(len(batch["label"])), batch["label"]]
            p_others.append(float(p[batch["present"][m]].mean()))
        expected = _phase1_reference(tr, batch, m, prev, opts.get("alpha", 0.5), opts.get("weight1", 5.0),
                                     opts.get("weight2", 1.0), opts.get("reconcile_grad", "real") == "real")
        got = capture_step_grads(tr, batch)
        # only learner m's encoder and the shared head move; the other learners and beta are frozen
        assert set(got) == {n for n, _ in tr.model.named_parameters()
                            if n.startswith(f"encoders.{m}.") or n.startswith("fusion.head.")}
        for n in got:
            assert torch.allclose(got[n], expected[n], atol=1e-6, rtol=1e-5), n
    logs = tr.method.epoch_diagnostics()
    assert logs[f"learner_{m}"] == 1.0 and logs["phase"] == 1.0 and logs["stage"] == pos.stage
    assert ("consolidation_loss" in logs) == (prev is not None)
    assert "boost_loss" in logs
    assert logs["beta"] == pytest.approx(0.6)  # frozen in phase 1
    assert logs["p_others"] == pytest.approx(sum(p_others) / 2, rel=1e-5)


def test_real_and_detached_consolidation_differ_only_in_the_alpha_term_gradient():
    grads = {}
    for mode in ("real", "detached"):
        tr = _trainer(reconcile_grad=mode, alpha=3.0)
        tr.epoch = 2  # stage 1: learner v, previous learner a
        grads[mode] = capture_step_grads(tr, _batch(tr))
    no_alpha = _trainer(alpha=0.0)
    no_alpha.epoch = 2
    plain = capture_step_grads(no_alpha, _batch(no_alpha))
    assert all(torch.allclose(grads["detached"][n], plain[n], atol=1e-7) for n in plain)
    assert any(not torch.allclose(grads["real"][n], plain[n], atol=1e-6) for n in plain)


def test_phase2_rectifies_every_learner_and_beta_with_the_fused_loss():
    tr = _trainer(missing=0.3)
    tr.epoch = 1  # stage 0, phase 2
    batch = _batch(tr)
    tr.model.train()
    out = tr.model(batch["inputs"], batch["present"])
    zm = out.unimodal_logits
    beta = tr.model.fusion.beta
    loss = F.cross_entropy(beta * (zm["a"] + zm["v"]), batch["label"])
    names, params = zip(*tr.model.named_parameters())
    expected = dict(zip(names, torch.autograd.grad(loss, params)))
    got, result = _step(tr, batch)
    assert set(got) == set(names) and "fusion.beta" in got
    for n in names:
        assert torch.allclose(got[n], expected[n], atol=1e-6, rtol=1e-5), n
    assert float(result["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)  # the engine averages it
    logs = tr.method.epoch_diagnostics()
    assert logs["phase"] == 2.0 and logs["learner_a"] == 0.0
    assert logs["rectify_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert logs["beta"] == pytest.approx(0.6)  # logged before the step moves it


def test_prediction_is_the_ensemble():
    tr = _trainer()
    batch = _batch(tr)
    tr.model.eval()
    with torch.no_grad():
        out = tr.method.predict(batch)
        assert torch.allclose(out.logits, tr.model.fusion.beta * sum(out.unimodal_logits.values()))


def test_frozen_learners_run_in_train_mode_without_gradients():
    """Phase 1, learner v: encoder a runs under no_grad in train mode (its BatchNorm statistics
    move, as in the public code), its weights get no gradient and do not move."""
    tr = _trainer(bn=True)
    tr.epoch = 2
    enc_a = tr.model.encoders["a"]
    bn = next(mod for mod in enc_a.modules() if isinstance(mod, torch.nn.BatchNorm1d))
    stats, weights = bn.running_mean.clone(), {n: p.detach().clone() for n, p in enc_a.named_parameters()}
    tr.model.train()
    tr.method.training_step(_batch(tr))
    assert not torch.equal(bn.running_mean, stats)
    assert all(torch.equal(p, weights[n]) for n, p in enc_a.named_parameters())
    assert all(p.grad is None for p in enc_a.parameters())


def test_no_sample_of_the_learner_makes_no_step():
    tr = _trainer()
    tr.epoch = 2  # learner v
    batch = _batch(tr)
    batch["present"]["v"] = torch.zeros_like(batch["present"]["v"])
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    assert tr.method.training_step(batch) == {}
    assert all(torch.equal(p, before[n]) for n, p in tr.model.named_parameters())


def test_optimizer_state_is_cleared_at_phase_starts_only():
    tr = _trainer(epochs_per_stage=2, correct_epochs=2)  # SGD with momentum: a state per stepped parameter
    batch = _batch(tr)
    for epoch, cleared in ((0, True), (1, False), (2, True), (3, False), (4, True)):
        tr.epoch = epoch
        tr.model.train()
        tr.method.training_step(batch)
        assert len(tr.optimizer.state) > 0
        tr.method.on_epoch_start(epoch + 1)
        assert (len(tr.optimizer.state) == 0) == tr.method.position(epoch + 1).phase_start
    keep = _trainer(epochs_per_stage=2, correct_epochs=2, reset_optimizer=False)
    keep.method.training_step(batch)
    keep.method.on_epoch_start(2)
    assert len(keep.optimizer.state) > 0


# ---------------------------------------------------------------------------------------------
# several processes, resume, options
@pytest.mark.parametrize("epoch", [1, 2])  # phase 2 of stage 0, phase 1 of stage 1
@pytest.mark.parametrize("missing", [0.0, 0.5, {"v": 0.9}])
def test_two_processes_equal_one_process_on_the_global_batch(epoch, missing, monkeypatch):
    def make():
        return _trainer(missing=missing, seed=1, alpha=1.0)

    def at_epoch(tr):
        tr.epoch = epoch

    single = make()
    at_epoch(single)
    batch = _batch(single, seed=2)
    single.model.train()
    expected = capture_step_grads(single, batch)
    def body(tr, r):
        at_epoch(tr)
        tr.model.train()
        return capture_step_grads(tr, shard_batch(batch, r))

    g0, g1 = run_two_ranks(monkeypatch, make, body)
    assert set(g0) == set(expected)
    for n in expected:
        assert torch.equal(g0[n], g1[n]), n
        assert torch.allclose(g0[n], expected[n], atol=1e-6, rtol=1e-5), n


def _fit(tmp_path, name, resume=False, stop=None, **opts):
    opts = {"epochs_per_stage": 1, "correct_epochs": 1, **opts}
    cfg = load_config(None, {"train.epochs": 4, "method.name": "reconboost", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "train.stop_after_epochs": stop,
                             **{f"method.{k}": v for k, v in opts.items()}})
    return Trainer(cfg, run_dir=tmp_path / name, resume=resume, data=tiny_data(40, hidden=[6], dropout=0.0)).fit()


def test_resume_across_a_phase_boundary_equals_an_uninterrupted_run(tmp_path):
    """Stopped after epoch 2 (stage 0's rectification), resumed into stage 1's boosting phase:
    the same metrics, diagnostics and results (the optimizer state cleared at the phase start
    either way)."""
    full = _fit(tmp_path, "full")
    assert _fit(tmp_path, "part", stop=2) is None
    part = _fit(tmp_path, "part", resume=True)
    lines = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
             for k in ("full", "part")}
    assert [x["diagnostics"]["phase"] for x in lines["full"]] == [1.0, 2.0, 1.0, 2.0]
    for key in ("val", "diagnostics", "train"):
        assert [x[key] for x in lines["full"]] == [x[key] for x in lines["part"]], key
    assert full["test"] == part["test"] and full["best_epoch"] == part["best_epoch"]
    assert full["fusion"] == "reconboost_ensemble"


def test_options_are_typed_and_cross_checked():
    with pytest.raises(ConfigError, match="weight2 .* must not exceed weight1"):
        create_method("reconboost", weight1=1.0, weight2=2.0)
    for bad in ({"epochs_per_stage": 0}, {"correct_epochs": -1}, {"reconcile_grad": "maybe"}, {"alpha": -1}):
        with pytest.raises(ConfigError):
            create_method("reconboost", **bad)
    m = create_method("reconboost", weight1="4", correct_epochs="0")
    assert m.weight1 == 4.0 and m.correct_epochs == 0 and m.hparams()["reconcile_grad"] == "real"


def test_defaults_are_the_public_codes_crema_d_setting():
    m = create_method("reconboost")
    assert m.hparams() == {"epochs_per_stage": 4, "correct_epochs": 4, "weight1": 5.0, "weight2": 1.0, "alpha": 0.5,
                           "reconcile_grad": "real", "boost_rate": 1.0, "head_hidden": 256, "reset_optimizer": True}


def test_boosting_step_ignores_what_absent_inputs_hold_under_both_policies():
    """The stage step's fused pass reads the presence masks: noise in the absent rows' inputs
    changes no gradient, also under the ``feature`` policy (where only the masks zero them)."""
    from helpers import assert_step_ignores_absent_inputs

    data = tiny_data(32, ("a", "v"), missing=0.5, hidden=[6], dropout=0.0, batchnorm=False,
                     signal={"a": 2.0, "v": 0.3})
    for policy in ("input", "feature"):
        cfg = load_config(None, {"train.epochs": 6, "method.name": "reconboost", "train.progress": "off",
                                 "train.probe": False, "train.batch_size": 16, "model.absent_policy": policy,
                                 "method.epochs_per_stage": 1, "method.correct_epochs": 1, "method.head_hidden": 5})

        def make():
            tr = Trainer(cfg, data=data)
            tr.method.on_epoch_start(1)  # the second stage: the other learner is in the ensemble
            return tr

        tr = make()
        batch = to_device(next(iter(tr.loader(tr.data.train, shuffle=True, batch_size=16, seed=0))), tr.device)
        assert_step_ignores_absent_inputs(make, batch)


def test_consolidation_over_a_single_sample_with_both_modalities():
    """The consolidation term averages over the samples holding both the learner's and the
    previous learner's modality: with exactly one such sample it is that sample's term."""
    from mmbalance.methods.reconboost import consolidation_loss

    tr = _trainer(("a", "v"), 0.0)
    tr.epoch = 2
    pos = tr.method.position(2)
    assert pos.phase == 1 and pos.stage
    m = ("a", "v")[pos.learner]
    prev = ("a", "v")[(pos.stage - 1) % 2]
    batch = _batch(tr, seed=0)
    other = batch["present"][prev].clone()
    other[1:] = False  # only row 0 holds the previous learner's modality (and m, present everywhere)
    batch["present"][prev] = other
    batch["inputs"][prev] = batch["inputs"][prev] * other.view(-1, 1).to(batch["inputs"][prev].dtype)
    tr.model.train()
    with torch.no_grad():
        zm = tr.model(batch["inputs"], batch["present"]).unimodal_logits
        want = float(consolidation_loss(zm[m], zm[prev])[0])
    tr.method.training_step(batch)
    assert tr.method.epoch_diagnostics()["consolidation_loss"] == pytest.approx(want, rel=1e-5)
