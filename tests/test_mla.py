"""MLA: OWM projector, head-weight-only projection, update order, per-sample entropy fusion,
alternation touching only the scheduled encoder, missing modalities, resume state."""
import copy

import numpy as np
import pytest
import torch

from mmbalance.config import load_config
from mmbalance.data.base import ArrayDataset, DataSplits
from mmbalance.engine import Trainer
from mmbalance.methods.mla import mla_alpha, mla_fuse, mla_fusion_weights, owm_update, project_head_grad
from mmbalance.registry import ConfigError


# ----------------------------------------------------------------------------- pure math
def test_owm_update_annihilates_the_feature_for_small_alpha():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, generator=g)
    P = owm_update(torch.eye(16), x, alpha=1e-6)
    assert float((x @ P).abs().max()) < 1e-5
    # exact value from P = I: x^T P = alpha / (alpha + |x|^2) x^T
    alpha = 0.5
    P = owm_update(torch.eye(16), x, alpha=alpha)
    assert torch.allclose(x @ P, alpha / (alpha + float(x @ x)) * x, atol=1e-6)
    # directions orthogonal to x are untouched
    e = torch.randn(16, generator=g)
    e = e - (e @ x) / (x @ x) * x
    assert torch.allclose(e @ P, e, atol=1e-5)
    # recursive: after a second feature both are (nearly) annihilated, and P stays symmetric
    x2 = torch.randn(16, generator=g)
    P2 = owm_update(owm_update(torch.eye(16), x, 1e-6), x2, 1e-6)
    assert float((x @ P2).abs().max()) < 1e-4 and float((x2 @ P2).abs().max()) < 1e-4
    assert torch.allclose(P2, P2.T, atol=1e-6)
    # the public code's normalisation
    assert float(owm_update(torch.eye(16), x, 0.1, normalize=True).norm()) == pytest.approx(1.0)


def test_project_head_grad_is_right_multiplication():
    G = torch.randn(3, 5)
    P = torch.randn(5, 5)
    assert torch.allclose(project_head_grad(G, P), G @ P)


def test_alpha_schedules():
    assert mla_alpha(0.1) == pytest.approx(0.1)
    assert mla_alpha(0.1, "official", 0, 10) == pytest.approx(0.1)
    assert mla_alpha(0.1, "official", 5, 10) == pytest.approx(0.1 ** 1.5)
    assert mla_alpha(0.1, "official", 9, 10) == pytest.approx(0.1 ** 1.9)
    with pytest.raises(ValueError, match="alpha_schedule"):
        mla_alpha(0.1, "cosine")


def test_entropy_weights_are_per_sample_and_sum_to_one():
    za = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # sample 0: a confident, sample 1: a uniform
    zv = torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    lam = mla_fusion_weights([za, zv], "entropy")
    assert lam.shape == (2, 2)
    assert torch.allclose(lam.sum(1), torch.ones(2))
    assert float(lam[0, 0]) > 0.5 > float(lam[1, 0])  # different weights for the two samples
    # the paper's form exp(max e - e_m) / sum_j exp(max e - e_j)
    def ent(z):
        p = torch.softmax(z, 1)
        return -(p * p.log()).sum(1)

    e = torch.stack([ent(za), ent(zv)], 1)
    paper = torch.exp(e.max(1, keepdim=True).values - e)
    paper = paper / paper.sum(1, keepdim=True)
    assert torch.allclose(lam, paper, atol=1e-6)
    fused, lam2 = mla_fuse([za, zv], "entropy")
    assert torch.allclose(fused, lam[:, :1] * za + lam[:, 1:] * zv)
    # mean / fixed / absent modalities
    assert torch.allclose(mla_fusion_weights([za, zv], "mean"), torch.full((2, 2), 0.5))
    fixed = mla_fusion_weights([za, zv], "fixed", [0.55, 0.45])
    assert torch.allclose(fixed, torch.tensor([[0.55, 0.45]] * 2))
    masked = mla_fusion_weights([za, zv], "entropy", present=[torch.tensor([True, False]), torch.tensor([True, True])])
    assert torch.allclose(masked[1], torch.tensor([0.0, 1.0])) and torch.allclose(masked[0], lam[0])
    with pytest.raises(ValueError, match="one weight per modality"):
        mla_fusion_weights([za, zv], "fixed", [1.0])
    with pytest.raises(ValueError, match="positive sum"):
        mla_fusion_weights([za, zv], "fixed", [0.0, 0.0])
    with pytest.raises(ValueError, match="unknown fusion"):
        mla_fusion_weights([za, zv], "max")


# ----------------------------------------------------------------------------- training step
def _splits(dims=(6, 6), n=48, C=3, present=None, seed=0, batchnorm=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    arrays = {f"m{i}": (rng.normal(size=(n, d)) + (1.5 - i * 0.5) * y[:, None]).astype(np.float32)
              for i, d in enumerate(dims)}
    ds = ArrayDataset(arrays, y, present=present)
    return DataSplits(train=ds, val=ds, test=ds, modalities=list(arrays), num_classes=C,
                      input_shapes={m: (d,) for m, d in zip(arrays, dims)},
                      default_encoders={m: "mlp" for m in arrays},
                      encoder_options={m: {"hidden": [8, 8], "dropout": 0.0, "batchnorm": batchnorm} for m in arrays})


def _trainer(dims=(6, 6), present=None, optimizer="sgd", encoder_width=None, batchnorm=False, **opts):
    over = {"train.epochs": 2, "method.name": "mla", "train.progress": "off", "train.probe": False,
            "train.batch_size": 16, "optim.name": optimizer, "optim.weight_decay": 0.0}
    over.update({f"method.{k}": v for k, v in opts.items()})
    data = _splits(dims, present=present, batchnorm=batchnorm)
    if encoder_width is not None:  # unequal encoder output widths -> the fusion projects them
        for m, w in zip(data.modalities, encoder_width):
            data.encoder_options[m] = {"hidden": [8, w], "dropout": 0.0}
    return Trainer(load_config(None, over), run_dir=None, data=data)


def _batches(tr, k=3):
    return [b for _, b in zip(range(k), tr.loader(tr.data.train, batch_size=16))]


def _batch(tr):
    return _batches(tr, 1)[0]


def _captured_step(tr, batch):
    """Run one training_step; per optimizer step, the parameters and gradients it is handed."""
    seen = []
    real = tr.optimizer_step

    def capture():
        seen.append(({n: p.detach().clone() for n, p in tr.model.named_parameters()},
                     {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}))
        real()

    tr.optimizer_step = capture
    try:
        tr.method.training_step(batch)
    finally:
        tr.optimizer_step = real
    return seen


def _reference(tr, params, batch, m):
    """Plain autograd on a copy holding ``params``: mean CE through encoder m, its projection and
    the shared head over the samples where m is present; returns the gradients and hbar."""
    ref = copy.deepcopy(tr.model)
    ref.load_state_dict(params, strict=False)
    ref.train()
    pres = batch["present"][m]
    f = ref.fusion
    u = f.proj[m](ref.encoders[m](batch["inputs"][m][pres]))
    loss = torch.nn.functional.cross_entropy(f.head(u), batch["label"][pres])
    names = [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}, u.detach().mean(0)


CASES = [  # (options, description)
    ({}, "defaults: schedule all, before, first step unprojected"),
    ({"project_first_step": True}, "first step projected"),
    ({"update_order": "after"}, "classic OWM order"),
    ({"update_order": "after", "project_first_step": True}, "after, first step enters P"),
    ({"schedule": "alternate"}, "t mod M"),
    ({"gradient_modification": False}, "ablation"),
    ({"alpha_schedule": "official", "normalize_P": True, "alpha": 0.5}, "public-code alpha and norm"),
]


@pytest.mark.parametrize("opts", [c[0] for c in CASES], ids=[c[1] for c in CASES])
def test_training_steps_equal_hand_written_reference(opts):
    """Every optimizer step over three batches (some samples missing m0): the gradients equal plain
    autograd of the mean CE over m's present samples, through encoder m and the shared head only;
    the head weight gradient right-multiplied by the reference P (bias never), P built by the
    reference recursion with the paper's order, first-step rule, alpha and normalisation."""
    n = 48
    present = {"m0": np.arange(n) % 4 != 0}
    tr = _trainer(present=present, **opts)
    meth = tr.method
    meth.on_epoch_start(0)
    meth.train_dataset(0, tr.data.train)  # batches per epoch, for the official alpha schedule
    assert meth._batches_per_epoch == 3
    mods = tr.model.modalities
    o = {"schedule": "all", "update_order": "before", "project_first_step": False, "gradient_modification": True,
         "alpha_schedule": "constant", "normalize_P": False, "alpha": 0.1, **opts}
    d = tr.model.fusion.head.in_features
    P, steps, t = torch.eye(d), 0, 0
    for i, batch in enumerate(_batches(tr)):
        assert 0 < int(batch["present"]["m0"].sum()) < 16
        seen = _captured_step(tr, batch)
        order = list(mods) if o["schedule"] == "all" else [mods[t % 2]]
        assert len(seen) == len(order)
        alpha = o["alpha"] * (0.1 ** (i / 3) if o["alpha_schedule"] == "official" else 1.0)
        for (params, got), m in zip(seen, order):
            want, hbar = _reference(tr, params, batch, m)
            assert set(got) == set(want)  # only encoder m (+ projection) and the head
            assert all(k.startswith(("fusion.head.", f"encoders.{m}.", f"fusion.proj.{m}")) for k in got)
            first = steps == 0 and not o["project_first_step"]
            gW = want["fusion.head.weight"]
            if o["gradient_modification"] and not first:
                if o["update_order"] == "before":
                    P = owm_update(P, hbar, alpha, o["normalize_P"])
                gW = gW @ P
                if o["update_order"] == "after":
                    P = owm_update(P, hbar, alpha, o["normalize_P"])
            steps += 1
            for k in want:
                w = gW if k == "fusion.head.weight" else want[k]
                assert torch.allclose(got[k], w, rtol=1e-4, atol=1e-6), (i, m, k)
        t += 1
        assert torch.allclose(meth.P, P, atol=1e-5)
    if o["gradient_modification"]:
        assert not torch.allclose(P, torch.eye(d))
    diag = meth.epoch_diagnostics()
    assert diag["alpha"] == pytest.approx(sum(o["alpha"] * (0.1 ** (i / 3) if o["alpha_schedule"] == "official"
                                                          else 1.0) for i in range(3)) / 3)
    if o["gradient_modification"]:
        assert {"P_fro", "grad_ratio", f"loss_{mods[0]}"} <= set(diag)


def test_first_step_is_unprojected_and_leaves_P():
    """P_1 = I: the very first modality step is not projected and does not enter P (Eq. 4's
    recursion starts at the second step; public code GSPlugin skips exp_count 0); the second is
    projected with the P of its own features alone."""
    tr = _trainer(schedule="alternate", alpha=1e-4)
    b1, b2 = _batches(tr, 2)
    [(p1, g1)] = _captured_step(tr, b1)
    want1, _ = _reference(tr, p1, b1, "m0")
    assert torch.allclose(g1["fusion.head.weight"], want1["fusion.head.weight"], atol=1e-7)
    assert torch.equal(tr.method.P, torch.eye(8)) and tr.method._steps == 1
    assert "grad_ratio" not in tr.method.epoch_diagnostics()
    [(p2, g2)] = _captured_step(tr, b2)
    want2, hbar2 = _reference(tr, p2, b2, "m1")
    # small alpha: the projected head gradient barely moves the head along hbar
    assert float((g2["fusion.head.weight"] @ hbar2).abs().max()) < 1e-3 * float(hbar2.norm())
    assert float((want2["fusion.head.weight"] @ hbar2).abs().max()) > 1e-2 * float(hbar2.norm())
    assert torch.allclose(tr.method.P, owm_update(torch.eye(8), hbar2, 1e-4), atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_alternating_step_changes_only_the_scheduled_encoder(optimizer):
    # three modalities of unequal encoder widths: the fusion projects them to a common width
    tr = _trainer(dims=(6, 4, 5), optimizer=optimizer, encoder_width=(8, 5, 8), schedule="alternate")
    mods = tr.model.modalities
    assert not isinstance(tr.model.fusion.proj[mods[1]], torch.nn.Identity)
    batch = _batch(tr)
    for t in range(4):
        before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        tr.method.training_step(batch)
        m_t = mods[t % 3]
        for n, p in tr.model.named_parameters():
            moved = not torch.equal(before[n], p)
            parts = n.split(".")
            owner = parts[1] if parts[0] == "encoders" else parts[2] if parts[:2] == ["fusion", "proj"] else None
            if owner is None:  # the shared head
                assert moved, n
            else:
                assert moved == (owner == m_t), (t, n)


def test_alpha_schedule_resets_each_epoch():
    """official alpha: alpha 0.1^(i/n) from batch 0 of every epoch (first and last batch)."""
    tr = _trainer(alpha_schedule="official")
    meth = tr.method
    batch = _batch(tr)
    for epoch in range(2):
        meth.on_epoch_start(epoch)
        meth.train_dataset(epoch, tr.data.train)
        seen = []
        for _ in range(3):
            meth.training_step(batch)
            seen.append(meth.epoch_diagnostics()["alpha"])
        assert seen == pytest.approx([0.1, 0.1 ** (1 + 1 / 3), 0.1 ** (1 + 2 / 3)])


def test_missing_modality_everywhere_skips_the_step():
    """One process, a batch without any sample of m1: its step changes nothing (no NaN, no P
    update, no optimizer step) and the other modality's step still runs."""
    tr = _trainer()
    batch = _batch(tr)
    tr.method.training_step(batch)
    batch["present"]["m1"] = torch.zeros_like(batch["present"]["m1"])
    batch["inputs"]["m1"] = torch.full_like(batch["inputs"]["m1"], float("nan"))  # never read
    P = tr.method.P.clone()
    seen = _captured_step(tr, batch)
    assert len(seen) == 1 and not any(k.startswith("encoders.m1.") for k in seen[0][1])
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.method.schedule = "alternate"
    tr.method._t = 1  # m1's turn: the whole step is skipped
    assert tr.method.training_step(batch) == {}
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert not torch.equal(tr.method.P, P)  # (m0's step above did update P)
    P = tr.method.P.clone()
    tr.method._t = 1
    tr.method.training_step(batch)
    assert torch.equal(tr.method.P, P)


def test_single_present_sample_with_batchnorm():
    """One present sample: BatchNorm runs on its running statistics (one-sample batch statistics
    are undefined) instead of failing; the step trains on that sample and leaves the buffers."""
    tr = _trainer(batchnorm=True, schedule="alternate")
    batch = _batch(tr)
    batch["present"]["m0"] = torch.zeros_like(batch["present"]["m0"])
    batch["present"]["m0"][3] = True
    bufs = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" in k or "num_batches" in k}
    [(params, got)] = _captured_step(tr, batch)
    ref = copy.deepcopy(tr.model)
    ref.load_state_dict(params, strict=False)
    ref.eval()  # (no dropout here: eval differs from train only in BatchNorm)
    x, y = batch["inputs"]["m0"][3:4], batch["label"][3:4]
    loss = torch.nn.functional.cross_entropy(ref.fusion.head(ref.encoders["m0"](x)), y)
    g = torch.autograd.grad(loss, ref.encoders["m0"].net[1].weight)[0]
    assert torch.allclose(got["encoders.m0.net.1.weight"], g, atol=1e-6)
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in bufs.items())
    assert all(mod.training for mod in tr.model.modules())


class _Collectives:
    """Stand-ins for the collective calls of one rank of two: records their sequence and the
    gradient tensors averaged; ``others`` is what the other rank adds to every all-reduce."""

    def __init__(self, monkeypatch, tr, others=1.0):
        from mmbalance.engine import distributed as du

        self.calls = []
        self.shapes = []

        def all_reduce_sum(t):
            self.calls.append(("all_reduce_sum", tuple(t.shape)))
            return t + others

        def average_gradients(params):
            grads = [(n, p.grad) for n, p in tr.model.named_parameters() if p.grad is not None]
            self.calls.append(("average_gradients", len(grads)))
            self.shapes.append([(n, tuple(g.shape)) for n, g in grads])
            self.grads = {n: g.clone() for n, g in grads}

        monkeypatch.setattr(tr, "all_reduce_sum", all_reduce_sum)
        monkeypatch.setattr(du, "average_gradients", average_gradients)
        monkeypatch.setattr(du, "broadcast_buffers", lambda module: self.calls.append(("broadcast_buffers",)))


@pytest.mark.parametrize("schedule", ["all", "alternate"])
def test_absent_modality_on_this_rank_makes_the_same_collective_calls(monkeypatch, schedule):
    """A rank whose share of the batch has no sample of a modality must make the same collective
    calls, averaging gradients of the same parameters, as a rank that has them (otherwise the
    ranks' collectives fall out of step); its contribution is zero. BatchNorm buffers stay and
    every module is back in train mode after the zero-weight placeholder pass."""
    runs = {}
    for case in ("present", "absent"):
        tr = _trainer(batchnorm=True, schedule=schedule)
        batch = _batch(tr)
        if case == "absent":
            for m in tr.model.modalities:
                batch["present"][m] = torch.zeros_like(batch["present"][m])
                batch["inputs"][m] = torch.full_like(batch["inputs"][m], float("nan"))  # never read
        rec = _Collectives(monkeypatch, tr)
        buffers = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" in k or "num_batches" in k}
        tr.method.training_step(batch)
        runs[case] = (rec, tr, buffers)
    (p, _, _), (a, tr, buffers) = runs["present"], runs["absent"]
    assert a.calls == p.calls and len(a.calls) > 0
    assert a.shapes == p.shapes
    assert all(float(g.abs().max()) == 0.0 for g in a.grads.values())
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in buffers.items())
    assert all(mod.training for mod in tr.model.modules())


def test_loss_is_the_global_mean_over_present_samples(monkeypatch):
    """Several processes: the local loss sum is scaled by world / global count, so the averaged
    gradient is the gradient of the mean over the global batch's present samples."""
    tr = _trainer(schedule="alternate", project_first_step=True)
    batch = _batch(tr)
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    want, hbar = _reference(tr, params, batch, "m0")
    rec = _Collectives(monkeypatch, tr, others=0.0)
    monkeypatch.setattr(type(tr), "world_size", property(lambda self: 2))
    # the synchronous gradient average (the one _Collectives stands in for), not the bucketed one
    monkeypatch.setattr(tr.cfg.train, "bucket_mb", 0.0, raising=False)
    # the other rank holds 3x as many present samples: global count N = 4n
    monkeypatch.setattr(tr, "all_reduce_sum", lambda t: t * 4)
    tr.method.training_step(batch)
    # this rank's gradient before averaging: world x sum / N = 2 n mean / 4n = half the local mean's
    for k in ("encoders.m0.net.1.weight", "fusion.head.bias"):
        assert torch.allclose(rec.grads[k], want[k] / 2, atol=1e-6), k
    # hbar = global sum / global count (here equal to this rank's mean)
    assert torch.allclose(tr.method.P, owm_update(torch.eye(hbar.numel()), hbar, 0.1), atol=1e-6)


def test_state_roundtrip_gives_the_same_next_step():
    """Model, optimizer and method state after 1 step (the first-step rule: P = I, one step
    taken) and after 3 steps, loaded into a fresh trainer: the next step is identical."""
    for k in (1, 3):
        a = _trainer(schedule="alternate")
        batches = _batches(a, 3)
        for i in range(k):
            a.method.training_step(batches[i % 3])
        b = _trainer(schedule="alternate")
        b.model.load_state_dict(a.model.state_dict())
        b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # (it shares tensors)
        b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
        assert b.method._t == k and b.method._steps == k
        nxt = batches[k % 3]
        a.method.training_step(nxt)
        b.method.training_step(nxt)
        for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
            assert torch.equal(pa, pb), (k, n)
        assert torch.equal(a.method.P, b.method.P)


def test_predict_entropy_fusion_and_state_roundtrip():
    tr = _trainer()
    batch = _batch(tr)
    for _ in range(3):
        tr.method.training_step(batch)
    tr.model.eval()
    with torch.no_grad():
        out = tr.method.predict(batch)
        zm = [tr.model.fusion.head(tr.model.fusion.head_input(m, tr.model.encode(m, batch["inputs"][m])))
              for m in tr.model.modalities]
    for m, z in zip(tr.model.modalities, zm):
        assert torch.allclose(out.unimodal_logits[m], z, atol=1e-6)  # g(h_m)
    assert torch.allclose(out.logits, mla_fuse(zm, "entropy")[0], atol=1e-6)
    st = tr.method.state_dict()
    assert st["t"] == 3 and not torch.equal(st["P"], torch.eye(st["P"].shape[0]))
    fresh = _trainer()
    fresh.method.load_state_dict(st)
    assert torch.equal(fresh.method.P, st["P"]) and fresh.method._t == 3


def test_options_validated():
    from mmbalance.methods import create_method

    for bad, msg in (({"update_order": "later"}, "'update_order' takes one of 'before', 'after', got 'later'"),
                     ({"schedule": "random"}, "'schedule' takes one of 'all', 'alternate', got 'random'"),
                     ({"fusion": "max"}, "'fusion' takes one of 'entropy', 'mean', 'fixed', got 'max'"),
                     ({"alpha": 0.0}, "'alpha' takes a number > 0, got 0.0"),
                     ({"project_first_step": "maybe"}, "'project_first_step' takes true/false, got 'maybe'"),
                     ({"normalize_P": 3}, "'normalize_P' takes true/false, got 3"),
                     ({"alpha_schedule": "cosine"}, "'alpha_schedule' takes one of 'constant', 'official', got 'cosine'"),
                     ({"fixed_weights": [0.5, -0.1]},
                      "'fixed_weights' takes a list of numbers >= 0 or null, got [0.5, -0.1]")):
        with pytest.raises(ConfigError) as e:
            create_method("mla", **bad)
        assert str(e.value) == f"method 'mla' option {msg}"
    # cross-option and data-dependent checks stay with the method, one line each
    with pytest.raises(ConfigError, match="^mla: fusion 'fixed' needs fixed_weights"):
        create_method("mla", fusion="fixed")
    with pytest.raises(ConfigError, match=r"^mla option fixed_weights needs a positive sum, got \[0.0, 0.0\]$"):
        create_method("mla", fusion="fixed", fixed_weights=[0, 0])
    with pytest.raises(ConfigError, match="fixed_weights has 3 entries for 2 modalities"):
        _trainer(fusion="fixed", fixed_weights=[1.0, 2.0, 3.0])
    assert create_method("mla", fusion="fixed", fixed_weights="0.55,0.45").fixed_weights == [0.55, 0.45]


def test_fit_builds_shared_head_and_runs():
    tr = _trainer(dims=(6, 4, 5), fusion="fixed", fixed_weights=[0.5, 0.3, 0.2], alpha_schedule="official",
                  normalize_P=True)
    res = tr.fit()
    assert res["fusion"] == "shared_head"
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    assert float(tr.method.P.norm()) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- mutation-testing additions
def test_fusion_rule_defaults_to_the_papers_entropy_weights():
    za = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    zv = torch.tensor([[0.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    assert torch.equal(mla_fusion_weights([za, zv]), mla_fusion_weights([za, zv], "entropy"))
    assert torch.equal(mla_fuse([za, zv])[0], mla_fuse([za, zv], "entropy")[0])


def test_shared_head_options_are_used_and_another_fusion_is_replaced_with_a_warning(warnings_of_mmbalance):
    """``--fusion shared_head`` keeps its fusion options (here the head width); any other
    fusion than the engine's default is replaced by shared_head with a warning naming it."""
    data = _splits()
    over = {"train.epochs": 1, "method.name": "mla", "train.progress": "off", "train.probe": False,
            "model.fusion": "shared_head", "model.fusion_options": {"common_dim": 12}}
    tr = Trainer(load_config(None, over), run_dir=None, data=data)
    assert tr.model.fusion.head.in_features == 12 and tr.method.P.shape == (12, 12)
    assert isinstance(tr.model.fusion.proj["m0"], torch.nn.Linear)
    for fusion, warned in (("sum", True), ("concat", False)):
        over = {"train.epochs": 1, "method.name": "mla", "train.progress": "off", "train.probe": False,
                "model.fusion": fusion}
        warnings_of_mmbalance.clear()
        tr = Trainer(load_config(None, over), run_dir=None, data=_splits())
        msgs = [r.getMessage() for r in warnings_of_mmbalance]
        assert hasattr(tr.model.fusion, "head_input")
        assert any(f"--fusion {fusion} is ignored" in m for m in msgs) == warned, msgs


def test_official_alpha_schedule_counts_the_batches_the_loader_yields():
    """``alpha * 0.1^(i / len(loader))``: 40 samples in batches of 16 are 2 batches with
    drop_last, 3 without."""
    for drop_last, n_batches in ((True, 2), (False, 3)):
        data = _splits(n=40)
        over = {"train.epochs": 1, "method.name": "mla", "train.progress": "off", "train.probe": False,
                "train.batch_size": 16, "train.drop_last": drop_last, "method.alpha_schedule": "official"}
        tr = Trainer(load_config(None, over), run_dir=None, data=data)
        meth = tr.method
        batch = _batch(tr)
        meth.on_epoch_start(0)
        meth.train_dataset(0, tr.data.train)
        seen = []
        for _ in range(2):
            meth.training_step(batch)
            seen.append(meth.epoch_diagnostics()["alpha"])
        assert seen == pytest.approx([0.1, 0.1 ** (1 + 1 / n_batches)]), drop_last


def test_step_reports_the_mean_modality_loss_and_the_projection_ratio():
    """One ``all`` step over two modalities, both projected: ``loss_<m>`` is each modality's CE
    before its optimizer step, the returned loss their mean; ``grad_ratio_<m>`` is
    ``||grad_W P|| / ||grad_W||`` with the P of that step."""
    tr = _trainer(project_first_step=True)
    batch = _batch(tr)
    mods = tr.model.modalities
    captured = []
    real = tr.optimizer_step
    tr.optimizer_step = lambda: (captured.append({n: p.detach().clone() for n, p in tr.model.named_parameters()}),
                                 real())[1]
    out = tr.method.training_step(batch)
    diag = tr.method.epoch_diagnostics()
    P = torch.eye(tr.model.fusion.head.in_features)
    losses = []
    for params, m in zip(captured, mods):
        want, hbar = _reference(tr, params, batch, m)
        ref = copy.deepcopy(tr.model)
        ref.load_state_dict(params, strict=False)
        with torch.no_grad():
            z = ref.fusion.head(ref.fusion.proj[m](ref.encoders[m](batch["inputs"][m])))
            losses.append(float(torch.nn.functional.cross_entropy(z, batch["label"])))
        P = owm_update(P, hbar, 0.1)
        gW = want["fusion.head.weight"]
        ratio = float((gW @ P).norm() / gW.norm())
        assert 0.0 < ratio < 1.0
        assert diag[f"grad_ratio_{m}"] == pytest.approx(ratio, rel=1e-4)
        assert diag[f"loss_{m}"] == pytest.approx(losses[-1], rel=1e-5)
    assert out["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_loaded_projector_lands_on_the_trainers_device_in_float32():
    """Resume: P goes to the device the run trains on (``meta`` stands in for an accelerator
    here) and is kept in float32 whatever the checkpoint holds."""
    tr = _trainer()
    st = tr.method.state_dict()
    st["P"] = (2.0 * st["P"]).double()
    tr.device = torch.device("meta")
    tr.method.load_state_dict(st)
    assert tr.method.P.device.type == "meta" and tr.method.P.dtype == torch.float32
    tr.device = torch.device("cpu")
    tr.method.load_state_dict(st)
    assert tr.method.P.dtype == torch.float32 and torch.equal(tr.method.P, 2.0 * torch.eye(8))
