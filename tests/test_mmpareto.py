"""MMPareto: the two-task MGDA weight against its closed form and a brute-force minimum, the
integration rule by hand (direction, magnitude, gamma scope, the public code's per-tensor rule),
one training step against a hand-written reference (exact parameter gradients and the
feature-gradient approximation; which parameters each gradient reaches), two simulated
processes, resume and option errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.mmpareto import gram, min_norm_weight, mmpareto_coefficients, rescale_per_tensor
from mmbalance.registry import ConfigError

from helpers import capture_step_grads, tiny_data
from simulated_ranks import run_two_ranks, shard_batch


# ---------------------------------------------------------------------------------------------
# pure math
def _closed_form(g1, g2):
    return float(torch.clamp(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0))


@pytest.mark.parametrize("seed", range(6))
def test_min_norm_weight_is_the_closed_form_and_the_brute_force_minimum(seed):
    g = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    if seed % 2:  # make them conflict
        g2 = g2 - 2.0 * (g2 @ g1).abs() / (g1 @ g1) * g1
    a = float(min_norm_weight(g1 @ g1, g1 @ g2, g2 @ g2))
    assert a == pytest.approx(_closed_form(g1, g2), abs=1e-12)
    grid = torch.linspace(0, 1, 200001, dtype=torch.float64)
    norms = ((grid[:, None] * g1 + (1 - grid[:, None]) * g2) ** 2).sum(1)
    assert a == pytest.approx(float(grid[norms.argmin()]), abs=1e-5)
    d = a * g1 + (1 - a) * g2
    if 0.0 < a < 1.0:  # interior minimum: d is a descent direction of both, d.g_i = ||d||^2
        assert float(d @ g1) == pytest.approx(float(d @ d), rel=1e-9)
        assert float(d @ g2) == pytest.approx(float(d @ d), rel=1e-9)


def test_min_norm_weight_boundaries_and_equal_vectors():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])
    assert float(min_norm_weight(g1 @ g1, g1 @ g2, g2 @ g2)) == 1.0   # g1 is the shortest point
    assert float(min_norm_weight(g2 @ g2, g1 @ g2, g1 @ g1)) == 0.0
    assert float(min_norm_weight(2.0, 2.0, 2.0)) == 0.5                 # g1 = g2
    assert float(min_norm_weight(0.0, 0.0, 0.0)) == 0.5


def test_gram_equals_dot_products_of_the_concatenated_vectors_none_is_zero():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 2, generator=g), None, torch.randn(4, generator=g)]
    b = [torch.randn(3, 2, generator=g), torch.randn(5, generator=g), torch.randn(4, generator=g)]
    va = torch.cat([a[0].flatten(), torch.zeros(5), a[2]]).double()
    vb = torch.cat([t.flatten() for t in b]).double()
    g11, g12, g22 = gram(a, b)
    assert float(g11) == pytest.approx(float(va @ va)) and float(g12) == pytest.approx(float(va @ vb))
    assert float(g22) == pytest.approx(float(vb @ vb))


def test_min_norm_weight_is_float64_and_scale_invariant():
    """The weight is computed in float64 even from Python floats (nearly equal gradients
    g1 = (1, 0), g2 = (1, 1e-5): the shortest point is g1, a = 1; in float32 ||g1 - g2||^2
    rounds to 0 and the weight would fall back to 1/2), and it does not depend on the
    gradients' scale (tiny or huge gradients are not taken for equal ones)."""
    a = min_norm_weight(1.0, 1.0, 1.0 + 1e-10)
    assert a.dtype == torch.float64 and float(a) == 1.0
    for g11, g12, g22 in ((1.0, -1.0, 4.0), (1.0, 0.3, 2.0), (2.0, -0.5, 0.7)):
        want = float(min_norm_weight(g11, g12, g22))
        for k in (1e-40, 1e-20, 1e20):
            assert float(min_norm_weight(k * g11, k * g12, k * g22)) == pytest.approx(want, rel=1e-12), (k, g11)


def test_gram_stays_on_the_gradients_device():
    a, b = [torch.ones(3, device="meta")], [None]
    assert all(t.device.type == "meta" for t in gram(a, b))


def test_combine_treats_none_as_a_zero_gradient():
    from mmbalance.methods.mmpareto import _combine

    a, b = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    assert torch.equal(_combine(a, b, 2.0, 3.0), 2.0 * a + 3.0 * b)
    assert torch.equal(_combine(None, b, 2.0, 3.0), 3.0 * b)
    assert torch.equal(_combine(a, None, 2.0, 3.0), 2.0 * a)
    assert _combine(None, None, 2.0, 3.0) is None


def test_integration_by_hand_conflict():
    # g1 = (1, 0), g2 = (-1, 1): cos = -1/sqrt 2, a = (2 + 1) / (1 + 2 + 2) = 3/5,
    # h = 2 (0.2, 0.4) = (0.4, 0.8), ||g1 + g2|| = 1, final = 1.5 / sqrt(0.8) * (0.4, 0.8)
    r = mmpareto_coefficients(1.0, -1.0, 2.0, gamma=1.5)
    assert r.conflict and r.alpha == pytest.approx(0.6) and r.cos == pytest.approx(-1 / math.sqrt(2))
    final = r.c_mm * torch.tensor([1.0, 0.0]) + r.c_uni * torch.tensor([-1.0, 1.0])
    assert torch.allclose(final, 1.5 / math.sqrt(0.8) * torch.tensor([0.4, 0.8]))
    assert float(final.norm()) == pytest.approx(1.5 * 1.0) and r.scale == pytest.approx(1.5)
    assert float(final @ torch.tensor([1.0, 0.0])) > 0 and float(final @ torch.tensor([-1.0, 1.0])) > 0
    # gamma_scope only matters without conflict
    assert mmpareto_coefficients(1.0, -1.0, 2.0, 1.5, "always").c_mm == pytest.approx(r.c_mm)


def test_integration_without_conflict_is_the_sum_or_gamma_times_it():
    r = mmpareto_coefficients(1.0, 0.5, 2.0, gamma=1.5)
    assert not r.conflict and (r.c_mm, r.c_uni, r.alpha, r.scale) == (1.0, 1.0, 0.5, 1.0)
    r = mmpareto_coefficients(1.0, 0.5, 2.0, gamma=1.5, gamma_scope="always")
    assert (r.c_mm, r.c_uni, r.scale) == (1.5, 1.5, 1.5)
    # orthogonal (cos = 0): not a conflict; a zero unimodal gradient: the multimodal one
    assert not mmpareto_coefficients(1.0, 0.0, 1.0).conflict
    r = mmpareto_coefficients(4.0, 0.0, 0.0)
    assert not r.conflict and r.c_mm == 1.0 and r.cos == 0.0
    # exactly opposite, equal norms: MGDA's point is 0, the final gradient is 0
    r = mmpareto_coefficients(1.0, -1.0, 1.0)
    assert r.conflict and r.c_mm == 0.0 and r.c_uni == 0.0


def test_per_tensor_rescale_is_the_public_code_rule():
    g1 = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), None]
    g2 = [torch.tensor([-1.0, 1.0]), torch.tensor([0.0, -1.0]), None]
    out = rescale_per_tensor(g1, g2, alpha=0.6, gamma=1.5)
    # tensor 0: h = (0.4, 0.8), r = ||(0, 1)|| / sqrt(0.8) > 1 -> 1.5 * r * h
    assert torch.allclose(out[0], 1.5 / math.sqrt(0.8) * torch.tensor([0.4, 0.8]))
    # tensor 1: h = 2 (0, 1.2 - 0.4) = (0, 1.6), r = 1 / 1.6 < 1 -> 1.5 * h
    assert torch.allclose(out[1], 1.5 * torch.tensor([0.0, 1.6]))
    assert out[2] is None
    # without conflict (alpha 1/2): gamma * (g1 + g2) per tensor
    plain = rescale_per_tensor(g1[:2], g2[:2], alpha=0.5, gamma=1.5)
    assert all(torch.allclose(p, 1.5 * (a + b)) for p, a, b in zip(plain, g1, g2))


# ---------------------------------------------------------------------------------------------
# one training step against a hand-written reference
def _trainer(mods=("a", "v"), missing=0.0, fusion="concat", seed=0, **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = load_config(None, {"train.epochs": 1, "method.name": "mmpareto", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "train.seed": seed,
                             "model.fusion": fusion, **over})
    return Trainer(cfg, data=tiny_data(32, mods, seed=seed, missing=missing, hidden=[6], dropout=0.0,
                                       signal={"a": 2.0, "v": 0.3, "t": 0.8}))


def _batch(tr, seed=0, n=16):
    return next(iter(tr.loader(tr.data.train, batch_size=n, shuffle=True, seed=seed)))


def _losses(model, batch):
    out = model(batch["inputs"], batch["present"])
    y = batch["label"]
    l_mm = F.cross_entropy(out.logits, y)
    l_u = 0.0
    for m in model.modalities:
        p = batch["present"][m]
        if p.any():
            l_u = l_u + F.cross_entropy(out.unimodal_logits[m][p], y[p])
        else:
            l_u = l_u + 0.0 * out.unimodal_logits[m].sum()
    return out, l_mm, l_u


def _hand_cos(v1, v2):
    n2 = float(v1 @ v1) * float(v2 @ v2)
    return float(v1 @ v2) / math.sqrt(n2) if n2 > 0 else 0.0


def _hand_coefficients(v1, v2, gamma, scope):
    """(c_mm, c_uni, conflict, alpha) by the closed forms, on flat float64 vectors."""
    cos = float(v1 @ v2) / math.sqrt(float(v1 @ v1) * float(v2 @ v2)) if float(v1 @ v1) * float(v2 @ v2) > 0 else 0.0
    if cos < 0:
        a = _closed_form(v1, v2)
        h = 2 * (a * v1 + (1 - a) * v2)
        s = gamma * float((v1 + v2).norm()) / float(h.norm())
        return 2 * a * s, 2 * (1 - a) * s, True, a
    g = gamma if scope == "always" else 1.0
    return g, g, False, 0.5


def _reference_parameters(tr, batch, gamma=1.5, scope="conflict", rescale="encoder"):
    model = tr.model
    names, params = zip(*model.named_parameters())
    _, l_mm, l_u = _losses(model, batch)
    g_mm = torch.autograd.grad(l_mm, params, retain_graph=True, allow_unused=True)
    g_u = torch.autograd.grad(l_u, params, allow_unused=True)
    z = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    expected, conflicts, diags = {}, {}, {}
    for i, n in enumerate(names):
        if not n.startswith("encoders."):
            if g_mm[i] is not None or g_u[i] is not None:
                expected[n] = z(g_mm[i], params[i]) + z(g_u[i], params[i])
    for m in model.modalities:
        idx = [i for i, n in enumerate(names) if n.startswith(f"encoders.{m}.")]
        v1 = torch.cat([z(g_mm[i], params[i]).flatten() for i in idx]).double()
        v2 = torch.cat([z(g_u[i], params[i]).flatten() for i in idx]).double()
        c1, c2, conflict, a = _hand_coefficients(v1, v2, gamma, scope)
        conflicts[m] = conflict
        diags[m] = {"cos": _hand_cos(v1, v2), "alpha": a}
        for i in idx:
            t1, t2 = z(g_mm[i], params[i]), z(g_u[i], params[i])
            if rescale == "encoder":
                expected[names[i]] = c1 * t1 + c2 * t2
            else:  # the public code: a from the whole encoder, magnitude per tensor
                h = 2 * (a * t1 + (1 - a) * t2)
                r = float((t1 + t2).norm()) / float(h.norm()) if float(h.norm()) > 0 else 1.0
                g = gamma if (conflict or scope == "always") else 1.0
                expected[names[i]] = g * max(1.0, r) * h
        final = torch.cat([expected[names[i]].flatten() for i in idx]).double()
        diags[m]["scale"] = float(final.norm()) / float((v1 + v2).norm())
    return expected, conflicts, diags


def _reference_features(tr, batch, gamma=1.5, scope="conflict"):
    model = tr.model
    mods = model.modalities
    out, l_mm, l_u = _losses(model, batch)
    feats = [out.features[m] for m in mods]
    d_mm = torch.autograd.grad(l_mm, feats, retain_graph=True)
    d_u = torch.autograd.grad(l_u, feats, retain_graph=True)
    expected, conflicts = {}, {}
    for m, f, a, b in zip(mods, feats, d_mm, d_u):
        c1, c2, conflicts[m], _ = _hand_coefficients(a.flatten().double(), b.flatten().double(), gamma, scope)
        enc = dict(model.encoders[m].named_parameters())
        gs = torch.autograd.grad(f, list(enc.values()), grad_outputs=c1 * a + c2 * b, retain_graph=True)
        expected.update({f"encoders.{m}.{k}": g for k, g in zip(enc, gs)})
    heads = [(n, p) for n, p in model.named_parameters() if not n.startswith("encoders.")]
    gs = torch.autograd.grad(l_mm + l_u, [p for _, p in heads], allow_unused=True)
    expected.update({n: g for (n, _), g in zip(heads, gs) if g is not None})
    return expected, conflicts


CASES = [  # (modalities, fusion, missing, method options)
    (("a", "v"), "concat", 0.0, {}),
    (("a", "v"), "concat", 0.4, {"gamma_scope": "always"}),
    (("a", "v", "t"), "concat", 0.3, {"unimodal_heads": "fusion", "gamma": 2.0}),
    (("a", "v"), "late", 0.0, {"rescale": "tensor", "gamma_scope": "always"}),
    (("a", "v"), "film", 0.4, {"unimodal_heads": "fusion", "rescale": "tensor"}),
]


@pytest.mark.parametrize("mods,fusion,missing,opts", CASES)
def test_training_step_equals_the_hand_written_reference(mods, fusion, missing, opts):
    tr = _trainer(mods, missing, fusion, **opts)
    for s in range(3):  # three consecutive steps (the reference recomputed from the moved weights)
        batch = _batch(tr, seed=s)
        tr.model.train()
        expected, conflicts, diags = _reference_parameters(tr, batch, opts.get("gamma", 1.5),
                                                           opts.get("gamma_scope", "conflict"), opts.get("rescale", "encoder"))
        got = capture_step_grads(tr, batch)
        assert set(got) == set(expected)
        for n in expected:
            assert torch.allclose(got[n], expected[n], atol=1e-6, rtol=1e-5), n
        logs = tr.method.epoch_diagnostics()
        for m in mods:  # the diagnostics are those of the reference step (scale: ||final|| / ||g_mm + g_uni||)
            assert logs[f"conflict_{m}"] == float(conflicts[m])
            for k in ("cos", "alpha", "scale"):
                assert logs[f"{k}_{m}"] == pytest.approx(diags[m][k], rel=1e-4, abs=1e-6), (k, m)


def test_both_branches_are_exercised_by_the_reference_cases():
    seen = set()
    for mods, fusion, missing, opts in CASES:
        tr = _trainer(mods, missing, fusion, **opts)
        for s in range(3):
            seen |= set(_reference_parameters(tr, _batch(tr, seed=s))[1].values())
            capture_step_grads(tr, _batch(tr, seed=s))
    assert seen == {True, False}


@pytest.mark.parametrize("space", ["parameters", "features"])
def test_step_reports_the_sum_of_its_losses(space):
    tr = _trainer(gradient_space=space)
    batch = _batch(tr)
    tr.model.train()
    with torch.no_grad():
        _, l_mm, l_u = _losses(tr.model, batch)
    out = tr.method.training_step(batch)
    assert float(out["loss"]) == pytest.approx(float(l_mm + l_u), rel=1e-5)
    logs = tr.method.epoch_diagnostics()
    assert logs["loss_mm"] == pytest.approx(float(l_mm), rel=1e-5)


def test_gradients_reach_each_head_from_its_own_loss_only():
    """Separate unimodal heads: the fused head gets only CE(z)'s gradient, each unimodal head
    only its CE(z_m)'s; every encoder gets the integrated gradient (not the plain sum on a
    conflicting step)."""
    tr = _trainer()
    batch = _batch(tr)
    tr.model.train()
    out, l_mm, l_u = _losses(tr.model, batch)
    named = dict(tr.model.named_parameters())
    fused = {n: p for n, p in named.items() if n.startswith("fusion.inner.")}
    uni = {n: p for n, p in named.items() if n.startswith("fusion.heads.")}
    assert fused and uni
    g_f = dict(zip(fused, torch.autograd.grad(l_mm, list(fused.values()), retain_graph=True)))
    g_u = dict(zip(uni, torch.autograd.grad(l_u, list(uni.values()), retain_graph=True)))
    got = capture_step_grads(tr, batch)
    for n in fused:
        assert torch.allclose(got[n], g_f[n], atol=1e-7), n
    for n in uni:
        assert torch.allclose(got[n], g_u[n], atol=1e-7), n


@pytest.mark.parametrize("missing,seed,opts", [(0.0, 0, {}), (0.4, 0, {"gamma_scope": "always", "gamma": 1.2}),
                                               (0.0, 1, {"gamma": 1.3}), (0.4, 2, {})])
def test_feature_space_step_equals_its_reference(missing, seed, opts):
    """Seeds 1 and 2 give conflicting feature gradients (the MGDA branch), seed 0 none."""
    tr = _trainer(missing=missing, seed=seed, gradient_space="features", **opts)
    seen = set()
    for s in range(2):
        batch = _batch(tr, seed=s)
        tr.model.train()
        expected, conflicts = _reference_features(tr, batch, opts.get("gamma", 1.5), opts.get("gamma_scope", "conflict"))
        got = capture_step_grads(tr, batch)
        assert set(got) == set(expected)
        for n in expected:
            assert torch.allclose(got[n], expected[n], atol=1e-6, rtol=1e-5), n
        logs = tr.method.epoch_diagnostics()
        assert all(logs[f"conflict_{m}"] == float(c) for m, c in conflicts.items())
        seen |= set(conflicts.values())
    assert (True in seen) == (seed > 0)


# ---------------------------------------------------------------------------------------------
# several processes, resume, options
@pytest.mark.parametrize("space", ["parameters", "features"])
@pytest.mark.parametrize("missing", [0.0, 0.5, {"v": 0.9}])
def test_two_processes_equal_one_process_on_the_global_batch(space, missing, monkeypatch):
    def make():
        return _trainer(missing=missing, seed=1, gradient_space=space)

    single = make()
    batch = _batch(single, seed=2)
    single.model.train()
    expected = capture_step_grads(single, batch)
    def body(tr, r):
        tr.model.train()
        return capture_step_grads(tr, shard_batch(batch, r))

    g0, g1 = run_two_ranks(monkeypatch, make, body)
    for n in expected:
        assert torch.equal(g0[n], g1[n]), n
        assert torch.allclose(g0[n], expected[n], atol=1e-6, rtol=1e-5), n


def _fit(tmp_path, name, resume=False, stop=None, method="mmpareto", data=None, **opts):
    cfg = load_config(None, {"train.epochs": 3, "method.name": method, "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "train.stop_after_epochs": stop,
                             **{f"method.{k}": v for k, v in opts.items()}})
    data = data or tiny_data(40, hidden=[6], dropout=0.0)
    return Trainer(cfg, run_dir=tmp_path / name, resume=resume, data=data).fit()


def _metrics(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = _fit(tmp_path, "full", gamma_scope="always")
    assert _fit(tmp_path, "part", stop=2, gamma_scope="always") is None
    assert create_method("mmpareto").state_dict() == {}  # stateless: each step uses its own gradients only
    part = _fit(tmp_path, "part", resume=True, gamma_scope="always")
    a, b = _metrics(tmp_path, "full"), _metrics(tmp_path, "part")
    for key in ("val", "diagnostics", "train"):
        assert [x[key] for x in a] == [x[key] for x in b], key
    assert full["test"] == part["test"] and full["best_epoch"] == part["best_epoch"]


def test_options_are_typed_and_cross_checked():
    with pytest.raises(ConfigError, match="rescale 'tensor' needs gradient_space 'parameters'"):
        create_method("mmpareto", rescale="tensor", gradient_space="features")
    with pytest.raises(ConfigError):
        create_method("mmpareto", gamma=0)
    with pytest.raises(ConfigError):
        create_method("mmpareto", gamma_scope="sometimes")
    m = create_method("mmpareto", gamma="2", rescale="tensor")
    assert m.gamma == 2.0 and m.hparams()["rescale"] == "tensor"


# ---------------------------------------------------------------------------------------------
# the rule on the device: both branches evaluated, the conflict selects (no host branch)
from test_precision import count_synchronisations


def _host_rule(g11, g12, g22, gamma, scope):
    """MMPareto's rule with a host-side branch, in plain Python floats:
    (c_mm, c_uni, cos, alpha, conflict, gamma applied, scale)."""
    denom = math.sqrt(max(g11, 0.0) * max(g22, 0.0))
    cos = g12 / denom if denom > 0 else 0.0
    sum_norm = math.sqrt(max(g11 + 2 * g12 + g22, 0.0))
    if cos < 0:
        d = g11 + g22 - 2 * g12
        a = 0.5 if d <= 1e-30 * max(g11 + g22, 1e-300) else min(max((g22 - g12) / d, 0.0), 1.0)
        h = 2 * math.sqrt(max(a * a * g11 + 2 * a * (1 - a) * g12 + (1 - a) ** 2 * g22, 0.0))
        s = gamma * sum_norm / h if h > 0 else 0.0
        return 2 * a * s, 2 * (1 - a) * s, cos, a, True, gamma, gamma if h > 0 and sum_norm > 0 else 0.0
    g = gamma if scope == "always" else 1.0
    return g, g, cos, 0.5, False, g, g if sum_norm > 0 else 0.0


def test_rule_on_the_device_matches_the_branching_rule_for_many_encoders_at_once():
    """(M,) Gram entries give M encoders' rules in one call, each equal to the host-branching
    rule (to float64 rounding), with no host synchronisation; degenerate cases included."""
    gen = torch.Generator().manual_seed(0)
    vecs = [(torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64))
            for _ in range(40)]
    vecs += [(torch.ones(5, dtype=torch.float64), -torch.ones(5, dtype=torch.float64)),   # opposite, equal norms
             (torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)),    # zero unimodal gradient
             (torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))]     # equal
    G = torch.tensor([[float(a @ a), float(a @ b), float(b @ b)] for a, b in vecs], dtype=torch.float64)
    for scope in ("conflict", "always"):
        r, n = count_synchronisations(lambda: mmpareto_coefficients(G[:, 0], G[:, 1], G[:, 2], 1.5, scope))
        assert n == 0 and r.conflict.dtype == torch.bool and r.c_mm.shape == (len(vecs),)
        for i, row in enumerate(G.tolist()):
            want = _host_rule(*row, 1.5, scope)
            got = [float(r.c_mm[i]), float(r.c_uni[i]), float(r.cos[i]), float(r.alpha[i]), bool(r.conflict[i]),
                   float(r.gamma[i]), float(r.scale[i])]
            assert got[4] == want[4]
            assert got[:4] + got[5:] == pytest.approx(list(want[:4]) + list(want[5:]), rel=1e-14, abs=1e-300), i
    assert bool(torch.any(r.conflict)) and not bool(torch.all(r.conflict))
    # the per-tensor rule with device coefficients: no host synchronisation either
    g1, g2 = [torch.randn(4, 3), None, torch.randn(3)], [torch.randn(4, 3), None, None]
    out, n = count_synchronisations(lambda: rescale_per_tensor(g1, g2, r.alpha[0], r.gamma[0]))
    assert n == 0 and out[1] is None
    ref = rescale_per_tensor(g1, g2, float(r.alpha[0]), float(r.gamma[0]))
    assert all(torch.equal(a, b) for a, b in zip(out[::2], ref[::2]))
