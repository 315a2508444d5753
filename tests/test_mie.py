"""MIE: SAM with exact restore, T = V Sigma V^T, gradient modification, stages, fusion rules."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer
from mmbalance.methods.mie import (average_fusion, batch_mean_outer, entropy_fusion, entropy_weights,
                                   flat_gm_matrix, modify_weight_gradient, sam_perturbation,
                                   select_gm_layers, stage_of_epoch)
from mmbalance.registry import ConfigError

torch.set_num_threads(1)


def make_trainer(run_dir=None, resume=False, epochs=2, overrides=None, **method):
    ov = {"train.epochs": epochs, "method.name": "mie", "train.progress": "off", "train.probe": False,
          "train.batch_size": 64, "model.encoder_options": {"dropout": 0.0}}
    ov.update({f"method.{k}": v for k, v in method.items()})
    ov.update(overrides or {})
    return Trainer(load_config(None, ov), run_dir=run_dir, resume=resume)


def first_batch(tr, n=32):
    return next(iter(tr.loader(tr.data.train, batch_size=n)))


def capture_step(tr):
    """Replace the optimizer step by a capture of the parameters and gradients it would use."""
    seen = {}

    def fake_step():
        seen["params"] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        seen["grads"] = {n: (None if p.grad is None else p.grad.detach().clone())
                         for n, p in tr.model.named_parameters()}

    tr.optimizer_step = fake_step
    return seen


def unimodal_loss(model, m, x, y):
    return F.cross_entropy(model.fusion.heads[m](model.encode(m, x)).float(), y)


# ------------------------------------------------------------------------------------ pure math
def test_sam_perturbation_global_norm():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    eps, n = sam_perturbation(g, rho=2.0)
    assert n == pytest.approx(5.0)
    assert torch.allclose(eps[0], torch.tensor([1.2, 0.0])) and torch.allclose(eps[1], torch.tensor([[1.6]]))
    assert math.sqrt(sum(float(e.pow(2).sum()) for e in eps)) == pytest.approx(2.0)  # ||eps|| = rho
    eps0, n0 = sam_perturbation([torch.zeros(3)], rho=1.0)
    assert n0 == 0.0 and torch.equal(eps0[0], torch.zeros(3))


def test_flat_gm_matrix_hand_values_and_rotation():
    tau = 0.4
    T, s = flat_gm_matrix(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), tau)
    assert torch.allclose(T, torch.diag(torch.tensor([math.exp(-tau), 1.0], dtype=torch.float64)), atol=1e-12)
    assert s.tolist() == pytest.approx([4.0, 1.0])
    # rotated: Q diag(9, 5, 1) Q^T -> Q diag(e^-tau, e^-tau/2, 1) Q^T
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    Y = Q @ torch.diag(torch.tensor([9.0, 5.0, 1.0], dtype=torch.float64)) @ Q.T
    T, _ = flat_gm_matrix(Y, tau)
    want = Q @ torch.diag(torch.tensor([math.exp(-tau), math.exp(-tau / 2), 1.0], dtype=torch.float64)) @ Q.T
    assert torch.allclose(T, want, atol=1e-10)


@pytest.mark.parametrize("tau", [0.4, 1.5])
def test_flat_gm_matrix_symmetric_with_eigenvalues_in_range(tau):
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(1)) + 0.5
    Y = batch_mean_outer(x, batch_size=12).float()  # 5 batches: rank 5 < 16 (zero eigenvalues)
    T, s = flat_gm_matrix(Y, tau)
    assert T.dtype == torch.float32 and torch.equal(T, T.T)
    ev = torch.linalg.eigvalsh(T.double())
    assert float(ev.min()) >= math.exp(-tau) - 1e-5 and float(ev.max()) <= 1 + 1e-5
    assert float(ev.min()) == pytest.approx(math.exp(-tau), abs=1e-5)  # dominant direction damped
    assert float(ev.max()) == pytest.approx(1.0, abs=1e-5)
    # the damped direction is Ybar's top singular vector
    v = torch.linalg.svd(Y.double())[2][0]
    assert float(v @ T.double() @ v) == pytest.approx(math.exp(-tau), abs=1e-5)


def test_flat_gm_matrix_equal_singular_values_is_identity():
    for Y in (3.0 * torch.eye(4), torch.zeros(4, 4)):
        T, _ = flat_gm_matrix(Y, 0.4)
        assert torch.allclose(T, torch.eye(4), atol=1e-6)


def test_batch_mean_outer_chunks_and_mask_match_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(29, 5, generator=g)
    mask = torch.rand(29, generator=g) > 0.3
    mask[12:24] = False  # one batch with nothing present is skipped
    want = torch.zeros(5, 5, dtype=torch.float64)
    for a in range(0, 29, 12):
        xb, mb = x[a:a + 12].double(), mask[a:a + 12]
        if mb.any():
            z = xb[mb].mean(0)
            want += torch.outer(z, z)
    assert torch.allclose(batch_mean_outer(x, 12, mask), want, atol=1e-12)
    z = x.double().mean(0)
    assert torch.allclose(batch_mean_outer(x), torch.outer(z, z), atol=1e-12)


def test_modify_weight_gradient():
    g = torch.arange(6.0).view(2, 3)
    T = torch.diag(torch.tensor([1.0, 0.5, 2.0]))
    assert torch.equal(modify_weight_gradient(g, T), torch.tensor([[0.0, 0.5, 4.0], [3.0, 2.0, 10.0]]))


def test_stage_of_epoch():
    assert [stage_of_epoch(e, 1) for e in range(4)] == [0, 1, 2, 3]
    assert [stage_of_epoch(e, 3) for e in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [stage_of_epoch(e, [25, 50]) for e in (0, 24, 25, 74, 75, 99, 100, 150)] == [0, 0, 1, 1, 2, 2, 3, 4]


def test_select_gm_layers_scopes():
    enc = nn.Sequential(nn.Flatten(), nn.Linear(240, 256), nn.ReLU(), nn.Linear(256, 128))
    head = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 10))
    assert [n for n, _ in select_gm_layers(enc, head, "head")] == ["head3", "head2", "head1"]
    # parameters: enc1 61696, enc2 32896, head1 33024, head2 16448, head3 650 (total 144714)
    assert [n for n, _ in select_gm_layers(enc, head, 0.3)] == ["head3", "head2", "head1"]
    assert [n for n, _ in select_gm_layers(enc, head, 0.4)] == ["head3", "head2", "head1", "enc2"]
    assert [n for n, _ in select_gm_layers(enc, head, 0.001)] == ["head3"]
    assert len(select_gm_layers(enc, head, 1.0)) == 5
    conv = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 128))
    assert len(select_gm_layers(conv, head, "head")) == 3
    with pytest.raises(ConfigError, match="Linear layers only"):
        select_gm_layers(conv, head, 1.0)


def test_fusion_rules():
    z = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]],     # modality a: confident, unsure
                      [[0.0, 0.2, 0.0], [0.0, 0.0, 5.0]]])    # modality b: unsure, confident
    avg = average_fusion(z)
    assert torch.allclose(avg.exp(), (z.softmax(-1)).mean(0), atol=1e-6)
    w = entropy_weights(z)
    assert torch.allclose(w.sum(0), torch.ones(2))
    assert w[0, 0] > 0.5 and w[1, 1] > 0.5  # per sample: the confident modality gets more weight
    ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    want = torch.exp(ent.max(0).values - ent) / torch.exp(ent.max(0).values - ent).sum(0)
    assert torch.allclose(w, want, atol=1e-6)
    assert torch.allclose(entropy_fusion(z), (want.unsqueeze(-1) * z).sum(0), atol=1e-6)
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.allclose(average_fusion(z, mask)[1].exp(), z[1, 1].softmax(-1), atol=1e-6)
    assert torch.allclose(entropy_weights(z, mask)[:, 1], torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------------ the method
def test_sam_restores_weights_bitwise_and_uses_gradient_at_perturbed_point():
    rho = 0.05
    tr = make_trainer(rho=rho, gm=False)
    meth, model = tr.method, tr.model
    batch = first_batch(tr)
    m = meth.current_modality()
    names = [n for n, p in model.named_parameters() if n.startswith((f"encoders.{m}.", f"fusion.heads.{m}."))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # manual SAM on a copy: g at theta, eps = rho g / ||g|| (global), gradient at theta + eps
    ref = copy.deepcopy(model)
    rp = dict(ref.named_parameters())
    x, y = batch["inputs"][m], batch["label"]
    g = torch.autograd.grad(unimodal_loss(ref, m, x, y), [rp[n] for n in names])
    gn = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for n, gi in zip(names, g):
            rp[n].add_(rho * gi / gn)
    g_sam = torch.autograd.grad(unimodal_loss(ref, m, x, y), [rp[n] for n in names])

    seen = capture_step(tr)
    meth.training_step(batch)
    for n, p in before.items():  # restored exactly (all parameters, bitwise)
        assert torch.equal(seen["params"][n], p), n
    for n, gs, gp in zip(names, g_sam, g):
        assert torch.allclose(seen["grads"][n], gs, rtol=1e-4, atol=1e-7), n
    assert any(not torch.allclose(gs, gp, rtol=1e-3, atol=1e-6) for gs, gp in zip(g_sam, g))  # SAM matters
    assert all(seen["grads"][n] is None for n in seen["grads"] if n not in names)  # other modality untouched
    diag = meth.epoch_diagnostics()
    assert diag[f"sam_eps_real/{m}"] == pytest.approx(rho, rel=1e-3)
    assert diag[f"sam_grad_norm/{m}"] == pytest.approx(float(gn), rel=1e-4)


def test_paper_rho_is_below_float32_resolution():
    tr = make_trainer()  # rho = 1e-10 (paper)
    seen = capture_step(tr)
    tr.method.training_step(first_batch(tr))
    d = tr.method.epoch_diagnostics()
    assert d["sam_eps/pix"] == pytest.approx(1e-10)
    assert d["sam_eps_real/pix"] < 0.5e-10  # most of the perturbation is rounded away
    assert seen["grads"]


def _gm_pair(stage_T):
    """Gradients at the optimizer step with gm on and off, modality fou after pix's stage."""
    out = []
    for gm in (True, False):
        tr = make_trainer(sam=False, gm=gm)
        tr.method._stage = 1
        tr.method._T["pix"] = stage_T
        seen = capture_step(tr)
        tr.method.training_step(first_batch(tr))
        out.append((tr, seen["grads"]))
    return out


def test_gm_multiplies_weight_gradient_by_partner_T_and_leaves_bias():
    g = torch.Generator().manual_seed(3)
    Ts = []
    for d in (64, 256, 128):  # head3, head2, head1 inputs (deepest first)
        a = torch.randn(d, d, generator=g)
        Ts.append((a + a.T) / (2 * d) + torch.eye(d))
    (tr, g_gm), (_, g_raw) = _gm_pair(Ts)
    for i, (label, mod) in enumerate(tr.method._layers["fou"]):
        idx = {"head1": 0, "head2": 2, "head3": 3}[label]
        w, b = f"fusion.heads.fou.{idx}.weight", f"fusion.heads.fou.{idx}.bias"
        assert torch.allclose(g_gm[w], g_raw[w] @ Ts[i], rtol=1e-5, atol=1e-7), label
        assert not torch.allclose(g_gm[w], g_raw[w])
        assert torch.equal(g_gm[b], g_raw[b])
    for n, v in g_gm.items():
        if n.startswith("encoders."):
            assert (v is None and g_raw[n] is None) or torch.equal(v, g_raw[n])


def test_T_is_identity_before_partner_modality_trained():
    (tr, g_gm), (_, g_raw) = _gm_pair(None)  # stage 1, but pix has no T yet
    assert tr.method.partner_matrices("fou") == [None, None, None]
    assert all((a is None and g_raw[n] is None) or torch.equal(a, g_raw[n]) for n, a in g_gm.items())
    tr0 = make_trainer()
    assert tr0.method.previous_modality() is None
    assert tr0.method.partner_matrices("pix") == [None, None, None]


def test_stages_train_one_modality_and_build_T_from_layer_inputs():
    tr = make_trainer(sam=False)
    meth, model = tr.method, tr.model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    meth.on_epoch_start(0)
    assert meth.current_modality() == "pix"
    loader = tr.loader(tr.data.train, batch_size=64, shuffle=True)
    for i, batch in zip(range(3), loader):
        meth.training_step(batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert changed and all(".pix." in n for n in changed)
    assert any(n.startswith("encoders.pix.") for n in changed)
    meth.on_epoch_end(0)
    assert meth._T["pix"] is not None and meth._T["fou"] is None
    # T^(pix) comes from Ybar over cov_batch_size batches of the head layer inputs (eval mode)
    model.eval()
    with torch.no_grad():
        X = tr.data.train_eval.arrays["pix"]
        h1 = model.encode("pix", X)
        head = model.fusion.heads["pix"]
        h2 = head[1](head[0](h1))
        h3 = head[2](h2)
    for (label, _), T in zip(meth._layers["pix"], meth._T["pix"]):
        inp = {"head1": h1, "head2": h2, "head3": h3}[label]
        want, _ = flat_gm_matrix(batch_mean_outer(inp, 12), 0.4)
        assert torch.allclose(T.double(), want, atol=1e-5), label
    meth.on_epoch_start(1)
    assert meth.current_modality() == "fou" and meth.previous_modality() == "pix"
    assert [t is not None for t in meth.partner_matrices("fou")] == [True, True, True]


def test_inner_steps_schedule():
    tr = make_trainer(sam=False, inner_steps=2, overrides={"model.encoders": {"fou": {"hidden": [64]}}})
    meth = tr.method
    batches = list(zip(range(5), tr.loader(tr.data.train, batch_size=32)))
    mods = []
    for _, b in batches:
        mods.append(meth.current_modality())
        meth.training_step(b)
    assert mods == ["pix", "pix", "fou", "fou", "pix"]
    assert meth._stage == 2 and meth._steps_in_stage == 1
    # fou's encoder is 64 wide: head1 of pix (128 inputs) has no same-shape partner -> identity
    parts = dict(zip([n for n, _ in meth._layers["pix"]], meth.partner_matrices("pix")))
    assert parts["head1"] is None and parts["head2"] is not None and parts["head3"] is not None


@pytest.mark.parametrize("opts,overrides", [
    ({}, {"dataset.modalities": ["pix", "fou", "zer"]}),
    ({"sam": False}, {}),
    ({"gm": False, "fusion": "entropy"}, {}),
    ({"variant": "official", "rho": 0.05, "gm_scope": 1.0}, {}),
])
def test_runs_and_ablations(opts, overrides):
    tr = make_trainer(epochs=len(overrides.get("dataset.modalities", "ab")),
                      overrides={"train.batch_size": 128, "optim.lr": 0.05, **overrides}, **opts)
    res = tr.fit()
    M = len(tr.modalities)
    assert res["test"]["accuracy"] > 1.5 / tr.data.num_classes  # learns (chance is 0.1)
    assert set(res["test"]["per_modality"]) == set(tr.modalities)
    assert M == len(tr.method._T) and all(t is not None for t in tr.method._T.values())  # each had a stage


def test_resume_matches_uninterrupted(tmp_path):
    ov = {"train.batch_size": 128}
    a = make_trainer(run_dir=tmp_path / "a", epochs=3, overrides=ov, rho=0.05).fit()
    assert make_trainer(run_dir=tmp_path / "b", epochs=3, overrides={**ov, "train.stop_after_epochs": 2},
                        rho=0.05).fit() is None
    tr = make_trainer(run_dir=tmp_path / "b", resume=True, epochs=3, overrides=ov, rho=0.05)
    b = tr.fit()
    assert a["test"]["accuracy"] == b["test"]["accuracy"] and a["test"]["map"] == b["test"]["map"]
    import json
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1]
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(la)["diagnostics"] == json.loads(lb)["diagnostics"]
    diag = json.loads(lb)["diagnostics"]  # epoch 3 trains pix (stage 2) after fou's stage
    for key in ("stage", "trained/pix", "loss/pix", "sam_eps_real/pix", "sam_grad_norm/pix", "gm_ratio/pix",
                "sv_min/pix/head1", "sv_max/pix/head3", "sv_top_share/pix"):
        assert key in diag, key
    assert diag["trained/pix"] == 1.0 and diag["trained/fou"] == 0.0 and diag["stage"] == 2
    assert diag["gm_ratio/pix"] < 1.0  # T^(fou) damps pix's head gradients


def test_config_errors():
    with pytest.raises(ConfigError, match="fusion"):
        make_trainer(fusion="max")
    with pytest.raises(ConfigError, match="not both"):
        make_trainer(inner_steps=2, stage_epochs=[2, 3])
    with pytest.raises(ConfigError, match="gm_scope"):
        make_trainer(gm_scope=1.5)
    with pytest.raises(ConfigError, match="--fusion sum"):
        make_trainer(overrides={"model.fusion": "sum"})
