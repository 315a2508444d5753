"""MLA: OWM projector, head-weight-only projection, update order, per-sample entropy fusion,
alternation touching only the scheduled encoder, missing modalities, resume state."""
import math

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
    with pytest.raises(ConfigError):
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
    with pytest.raises(ConfigError):
        mla_fusion_weights([za, zv], "fixed", [1.0])


# ----------------------------------------------------------------------------- training step
def _splits(dims=(6, 6), n=48, C=3, present=None, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    arrays = {f"m{i}": (rng.normal(size=(n, d)) + (1.5 - i * 0.5) * y[:, None]).astype(np.float32)
              for i, d in enumerate(dims)}
    ds = ArrayDataset(arrays, y, present=present)
    return DataSplits(train=ds, val=ds, test=ds, modalities=list(arrays), num_classes=C,
                      input_shapes={m: (d,) for m, d in zip(arrays, dims)},
                      default_encoders={m: "mlp" for m in arrays},
                      encoder_options={m: {"hidden": [8, 8], "dropout": 0.0} for m in arrays})


def _trainer(dims=(6, 6), present=None, optimizer="sgd", encoder_width=None, **opts):
    over = {"train.epochs": 2, "method.name": "mla", "train.progress": "off", "train.probe": False,
            "train.batch_size": 16, "optim.name": optimizer, "optim.weight_decay": 0.0}
    over.update({f"method.{k}": v for k, v in opts.items()})
    data = _splits(dims, present=present)
    if encoder_width is not None:  # unequal encoder output widths -> the fusion projects them
        for m, w in zip(data.modalities, encoder_width):
            data.encoder_options[m] = {"hidden": [8, w], "dropout": 0.0}
    return Trainer(load_config(None, over), run_dir=None, data=data)


def _batch(tr):
    return next(iter(tr.loader(tr.data.train, batch_size=16)))


def _plain_head_grads(tr, batch, m):
    """Unprojected head gradients and the batch-mean head input for modality m."""
    f = tr.model.fusion
    tr.zero_grad()
    pres = batch["present"][m]
    u = f.head_input(m, tr.model.encode(m, batch["inputs"][m][pres]))
    torch.nn.functional.cross_entropy(f.head(u), batch["label"][pres]).backward()
    out = f.head.weight.grad.clone(), f.head.bias.grad.clone(), u.detach().mean(0)
    tr.zero_grad()
    return out


def _captured_step(tr, batch):
    grads = []
    real = tr.optimizer_step

    def capture():
        grads.append({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        real()

    tr.optimizer_step = capture
    tr.method.training_step(batch)
    tr.optimizer_step = real
    return grads


@pytest.mark.parametrize("order", ["before", "after"])
def test_head_weight_projected_bias_never_and_update_order(order):
    tr = _trainer(update_order=order, alpha=0.1)
    batch = _batch(tr)
    d = tr.model.fusion.head.in_features
    m0, m1 = tr.model.modalities
    # step 1 (modality m0)
    gW, gb, hbar = _plain_head_grads(tr, batch, m0)
    [got] = _captured_step(tr, batch)
    P1 = owm_update(torch.eye(d), hbar, 0.1)
    assert torch.allclose(got["fusion.head.bias"], gb, atol=1e-7)  # bias untouched
    want = gW @ P1 if order == "before" else gW  # after: P = I for the very first step
    assert torch.allclose(got["fusion.head.weight"], want, atol=1e-6)
    assert torch.allclose(tr.method.P, P1, atol=1e-6)  # P holds the current batch in both orders
    # step 2 (modality m1): before projects with P updated by m1's features, after with P1
    gW2, gb2, hbar2 = _plain_head_grads(tr, batch, m1)
    [got2] = _captured_step(tr, batch)
    P2 = owm_update(P1, hbar2, 0.1)
    assert torch.allclose(got2["fusion.head.bias"], gb2, atol=1e-7)
    want2 = gW2 @ (P2 if order == "before" else P1)
    assert torch.allclose(got2["fusion.head.weight"], want2, atol=1e-5)
    assert torch.allclose(tr.method.P, P2, atol=1e-5)
    diag = tr.method.epoch_diagnostics()
    assert {"P_fro", "grad_ratio", f"grad_ratio_{m0}", f"grad_ratio_{m1}", f"loss_{m0}"} <= set(diag)
    assert diag["P_fro"] < math.sqrt(d)


def test_before_projection_removes_the_current_mean_feature_direction():
    """'before': the projected gradient barely moves the head along hbar (small alpha)."""
    tr = _trainer(update_order="before", alpha=1e-4)
    batch = _batch(tr)
    _, _, hbar = _plain_head_grads(tr, batch, tr.model.modalities[0])
    [got] = _captured_step(tr, batch)
    assert float((got["fusion.head.weight"] @ hbar).abs().max()) < 1e-3 * float(hbar.norm())


def test_gradient_modification_off_leaves_gradient_and_P():
    tr = _trainer(gradient_modification=False)
    batch = _batch(tr)
    gW, gb, _ = _plain_head_grads(tr, batch, tr.model.modalities[0])
    [got] = _captured_step(tr, batch)
    assert torch.allclose(got["fusion.head.weight"], gW, atol=1e-7)
    assert torch.equal(tr.method.P, torch.eye(tr.model.fusion.head.in_features))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_alternating_step_changes_only_the_scheduled_encoder(optimizer):
    # three modalities of unequal encoder widths: the fusion projects them to a common width
    tr = _trainer(dims=(6, 4, 5), optimizer=optimizer, encoder_width=(8, 5, 8))
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


def test_schedule_all_steps_every_modality_on_one_batch():
    tr = _trainer(schedule="all")
    batch = _batch(tr)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    grads = _captured_step(tr, batch)
    assert len(grads) == 2  # one optimizer step per modality
    assert all(not torch.equal(before[n], p) for n, p in tr.model.named_parameters())
    # each optimizer step sees exactly one encoder's gradients
    assert all(sum(1 for n in g if n.startswith(f"encoders.{m}.")) > 0 and
               all(not n.startswith(f"encoders.{o}.") for n in g for o in tr.model.modalities if o != m)
               for g, m in zip(grads, tr.model.modalities))


def test_absent_samples_are_skipped_in_their_modality_steps():
    n = 48
    present = {"m0": np.arange(n) % 3 != 0}
    tr = _trainer(present=present)
    batch = _batch(tr)
    pres = batch["present"]["m0"]
    assert 0 < int(pres.sum()) < len(pres)
    _, _, hbar = _plain_head_grads(tr, batch, "m0")  # mean over present samples only
    tr.method.training_step(batch)
    assert torch.allclose(tr.method.P, owm_update(torch.eye(hbar.numel()), hbar, 0.1), atol=1e-6)
    # a batch where m1 is absent everywhere: its step does nothing
    batch["present"]["m1"] = torch.zeros_like(batch["present"]["m1"])
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    P = tr.method.P.clone()
    assert tr.method.training_step(batch) == {}
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert torch.equal(tr.method.P, P)


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

    for bad in ({"update_order": "later"}, {"schedule": "random"}, {"fusion": "max"}, {"fusion": "fixed"},
                {"alpha": 0.0}):
        with pytest.raises(ConfigError):
            create_method("mla", **bad)
    with pytest.raises(ConfigError):
        _trainer(fusion="fixed", fixed_weights=[1.0, 2.0, 3.0])


def test_fit_builds_shared_head_and_runs():
    tr = _trainer(dims=(6, 4, 5), fusion="fixed", fixed_weights=[0.5, 0.3, 0.2], alpha_schedule="official",
                  normalize_P=True)
    res = tr.fit()
    assert res["fusion"] == "shared_head"
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    assert float(tr.method.P.norm()) == pytest.approx(1.0, abs=1e-5)
