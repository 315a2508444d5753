"""ARL: coefficients (hand computation, two-modality public-code form, spread for M > 2), the
training step against a hand-written autograd reference (loss composition, (1 + k_m) on each
encoder and not the head, masking of absent samples), warm-up boundaries, clipping, resume,
and the fusions it must support."""
import math

import numpy as np
import pytest
import torch

from mmbalance.config import load_config
from mmbalance.data.base import ArrayDataset, DataSplits
from mmbalance.engine import Trainer
from mmbalance.methods.arl import (arl_batch_statistics, arl_coefficients, arl_coefficients_from_statistics,
                                  arl_scores, default_floor, masked_cross_entropy)
from mmbalance.registry import ConfigError

from helpers import capture_step_grads, quick_config, tiny_data


# ----------------------------------------------------------------------------- pure math
def _softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [x / sum(e) for x in e]


def _entropy(logits):
    p = _softmax(logits)
    return -sum(q * math.log(q) for q in p)


def _hand(za, zv, labels, T, estimator, floor=0.3):
    """Direct transcription of the public code's two-modality rule in plain Python."""
    def absmean(z):
        return sum(sum(abs(v) for v in row) for row in z) / len(z)

    ca, cv = absmean(za), absmean(zv)
    ca, cv = ca / (ca + cv), cv / (ca + cv)
    if estimator == "entropy":
        ea = sum(_entropy(r) for r in za) / len(za)
        ev = sum(_entropy(r) for r in zv) / len(zv)
    else:
        def var(z):
            p = [_softmax(r)[y] for r, y in zip(z, labels)]
            mu = sum(p) / len(p)
            return sum((q - mu) ** 2 for q in p) / len(p)

        ea, ev = var(za), var(zv)
    va, vv = max(ea / (ea + ev), floor), max(ev / (ea + ev), floor)
    wa, wv = (1 / va) / (1 / va + 1 / vv), (1 / vv) / (1 / va + 1 / vv)
    k = _softmax([T * cv * wa, T * ca * wv])
    return k, [ca, cv], [va, vv], [wa, wv]


@pytest.mark.parametrize("estimator", ["entropy", "variance"])
def test_coefficients_equal_hand_computation(estimator):
    za = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [3.0, -2.0, 0.0]]
    zv = [[1.0, 1.0, 1.0], [0.0, 0.0, 0.2], [0.3, 0.1, 0.0]]
    labels = [0, 1, 2]
    k, c, v, w = arl_coefficients([torch.tensor(za), torch.tensor(zv)], torch.tensor(labels), T=8.0,
                                  estimator=estimator)
    hk, hc, hv, hw = _hand(za, zv, labels, 8.0, estimator)
    for got, want in ((k, hk), (c, hc), (v, hv), (w, hw)):
        assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert float(k.sum()) == pytest.approx(1.0)


def test_floor_is_applied_and_default_scales_with_M():
    # modality a is far more confident: its normalised entropy falls below the floor
    za = torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    zv = torch.tensor([[0.1, 0.0], [0.0, 0.1]])
    y = torch.tensor([0, 1])
    _, _, v, w = arl_coefficients([za, zv], y)
    hk, hc, hv, hw = _hand(za.tolist(), zv.tolist(), y.tolist(), 8.0, "entropy")
    assert v[0] == pytest.approx(0.3) and hv[0] == pytest.approx(0.3)
    assert w.tolist() == pytest.approx(hw, abs=1e-6)
    assert default_floor(2) == pytest.approx(0.3)
    assert default_floor(4) == pytest.approx(0.15)
    _, _, v0, _ = arl_coefficients([za, zv], y, floor=0.0)
    assert float(v0[0]) < 0.01  # without the floor the share is tiny


def test_two_modality_product_form_is_the_public_code_form():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        za = torch.randn(16, 5, generator=g) * (0.2 + 3 * torch.rand(1, generator=g))
        zv = torch.randn(16, 5, generator=g) * (0.2 + 3 * torch.rand(1, generator=g))
        y = torch.randint(0, 5, (16,), generator=g)
        T = float(1 + 10 * torch.rand(1, generator=g))
        k, c, v, w = arl_coefficients({"a": za, "v": zv}, y, T=T)
        code = torch.softmax(T * torch.stack([c[1] * w[0], c[0] * w[1]]), 0)
        assert torch.allclose(k, code, atol=1e-6)
        # the literal ratio r = w / c is the same rule with temperature T / (c_1 c_2)
        kr, *_ = arl_coefficients({"a": za, "v": zv}, y, T=T, score="ratio")
        assert torch.allclose(kr, torch.softmax(T * (w / c), 0), atol=1e-6)
        assert torch.allclose(kr, torch.softmax(T / float(c[0] * c[1]) * torch.stack([c[1] * w[0], c[0] * w[1]]), 0),
                              atol=1e-5)


@pytest.mark.parametrize("M", [3, 4])
def test_many_modalities_product_form(M):
    g = torch.Generator().manual_seed(M)
    zs = [torch.randn(10, 4, generator=g) * s for s in (0.5, 1.0, 3.0, 0.2)[:M]]
    y = torch.randint(0, 4, (10,), generator=g)
    k, c, v, w = arl_coefficients(zs, y, T=4.0)
    assert k.shape == (M,) and float(k.sum()) == pytest.approx(1.0)
    r = [(M - 1) ** (M - 1) * float(w[m]) * math.prod(float(c[n]) for n in range(M) if n != m) for m in range(M)]
    assert k.tolist() == pytest.approx(_softmax([4.0 * x for x in r]), abs=1e-6)
    assert float(v.min()) >= default_floor(M) - 1e-7


@pytest.mark.parametrize("M", [3, 4, 6])
def test_coefficients_keep_their_spread_for_many_modalities(M):
    """One under-used modality (dependence share 0.05, the others equal; equal variances): k must
    favour it clearly. The unnormalised product w_m prod_{n != m} c_n <= (M-1)^-(M-1) gave an
    almost uniform k at M = 4 and an exactly uniform one at M = 6."""
    c_raw = [0.05] + [0.95 / (M - 1)] * (M - 1)
    B = 10.0
    stats = torch.tensor([[B * ci, B * 0.7, B * 0.5, B * 0.3, B] for ci in c_raw], dtype=torch.float64)
    k, c, v, w = arl_coefficients_from_statistics(stats, T=8.0)
    assert c.tolist() == pytest.approx(c_raw, abs=1e-6) and w.tolist() == pytest.approx([1 / M] * M, abs=1e-6)
    assert float(k[0]) > 1.5 / M and int(torch.argmax(k)) == 0
    assert torch.allclose(k[1:], k[1:].mean().expand(M - 1))  # the others are treated alike
    # the range of r is the M = 2 one: r_m <= w_m, with equality when c_m = 0 and the others are equal
    r = arl_scores(torch.tensor([0.0] + [1 / (M - 1)] * (M - 1), dtype=torch.float64),
                   torch.full((M,), 1 / M, dtype=torch.float64))
    assert float(r[0]) == pytest.approx(1 / M) and float(r[1:].abs().max()) == 0.0
    g = torch.Generator().manual_seed(M)
    for _ in range(20):
        cc = torch.rand(M, generator=g, dtype=torch.float64)
        ww = torch.rand(M, generator=g, dtype=torch.float64)
        cc, ww = cc / cc.sum(), ww / ww.sum()
        assert bool((arl_scores(cc, ww) <= ww + 1e-12).all())
        # same ordering as the literal ratio w / c
        assert torch.equal(torch.argsort(arl_scores(cc, ww)), torch.argsort(arl_scores(cc, ww, "ratio")))


def test_statistics_reduce_like_the_global_batch():
    """Summing per-half statistics (what all_reduce_sum does for 2 ranks) equals one batch, also when
    the halves hold different numbers of present samples."""
    g = torch.Generator().manual_seed(2)
    zs = [torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g) * 2]
    y = torch.randint(0, 3, (8,), generator=g)
    masks = [torch.tensor([1, 1, 1, 0, 1, 1, 1, 1]).bool(), torch.tensor([1, 0, 0, 0, 1, 1, 1, 1]).bool()]
    full = arl_batch_statistics(zs, y, masks)
    halves = (arl_batch_statistics([z[:4] for z in zs], y[:4], [m[:4] for m in masks])
              + arl_batch_statistics([z[4:] for z in zs], y[4:], [m[4:] for m in masks]))
    assert torch.allclose(full, halves, atol=1e-12)
    assert full[:, 4].tolist() == [7.0, 5.0]
    for est in ("entropy", "variance"):
        a = arl_coefficients_from_statistics(full, estimator=est)
        b = arl_coefficients_from_statistics(halves, estimator=est)
        assert all(torch.allclose(x, z, atol=1e-6) for x, z in zip(a, b))


def test_statistics_skip_absent_samples():
    g = torch.Generator().manual_seed(3)
    za, zv = torch.randn(10, 4, generator=g) * 3, torch.randn(10, 4, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    pv = torch.arange(10) % 3 != 0  # v absent for samples 0, 3, 6, 9
    masked = arl_batch_statistics({"a": za, "v": zv}, y, {"a": torch.ones(10, dtype=torch.bool), "v": pv})
    assert torch.allclose(masked[1], arl_batch_statistics([zv[pv]], y[pv])[0], atol=1e-12)
    assert torch.allclose(masked[0], arl_batch_statistics([za], y)[0], atol=1e-12)
    # the means are over the present samples: c and the hand rule see v's present rows only
    k, c, v, w = arl_coefficients_from_statistics(masked)
    ca, cv = float(za.abs().sum(1).mean()), float(zv[pv].abs().sum(1).mean())
    assert c.tolist() == pytest.approx([ca / (ca + cv), cv / (ca + cv)], abs=1e-6)
    # a modality with no present sample takes no part (k = 0), the rule runs over the others
    stats3 = torch.cat([masked, torch.zeros(1, 5, dtype=torch.float64)])
    stats3 = torch.cat([stats3, arl_batch_statistics([zv * 2], y)])
    k3, c3, v3, w3 = arl_coefficients_from_statistics(stats3)
    k2, c2, v2, w2 = arl_coefficients_from_statistics(stats3[[0, 1, 3]])
    assert float(k3[2]) == 0.0 and float(c3[2]) == 0.0 and float(w3[2]) == 0.0
    assert torch.allclose(k3[[0, 1, 3]], k2) and torch.allclose(w3[[0, 1, 3]], w2)
    # fewer than two present modalities: nothing to balance
    k1, *_ = arl_coefficients_from_statistics(torch.cat([masked[:1], torch.zeros(1, 5, dtype=torch.float64)]))
    assert k1.tolist() == [0.0, 0.0]


def test_masked_cross_entropy_gives_the_global_mean_gradient_over_processes():
    """Two 'ranks' with different numbers of present samples: the average of their gradients (what
    the engine does) equals the gradient of the one-process mean over present samples."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(8, 3, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (8,), generator=g)
    p = torch.tensor([1, 1, 1, 1, 1, 0, 0, 1]).bool()
    (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z[p], y[p]), z)
    n = p.sum()
    got = torch.zeros_like(z)
    for sl in (slice(0, 4), slice(4, 8)):
        (gr,) = torch.autograd.grad(masked_cross_entropy(z[sl], y[sl], p[sl], n, world_size=2), z)
        got += gr / 2
    assert torch.allclose(got, want, atol=1e-7)
    one = masked_cross_entropy(z, y, p, n)
    assert float(one.detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(z[p], y[p]).detach()), abs=1e-6)
    assert float(masked_cross_entropy(z, y, torch.zeros(8, dtype=torch.bool), 0).detach()) == 0.0


def test_bad_options_are_one_line_errors():
    # the pure functions refuse an unknown rule (a direct call; no silent fallback)
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        arl_coefficients([torch.zeros(2, 2)] * 2, torch.zeros(2, dtype=torch.long), estimator="nope")
    with pytest.raises(ValueError, match="unknown score 'nope'"):
        arl_scores(torch.ones(2), torch.ones(2), "nope")
    from mmbalance.methods import create_method

    # the method's options are typed: the config layer refuses them in one line before construction
    for bad, msg in ((dict(score="bad"), "option 'score' takes one of 'product', 'ratio', got 'bad'"),
                     (dict(estimator="bad"), "option 'estimator' takes one of 'entropy', 'variance', got 'bad'"),
                     (dict(floor=1.0), "option 'floor' takes a number in [0, 1) or null, got 1.0"),
                     (dict(floor=-0.1), "option 'floor' takes a number in [0, 1) or null, got -0.1"),
                     (dict(warmup_epochs=-1), "option 'warmup_epochs' takes an integer >= 0, got -1"),
                     (dict(T=-1), "option 'T' takes a number > 0, got -1"),
                     (dict(T=0.0), "option 'T' takes a number > 0, got 0.0"),
                     (dict(gamma=-1.0), "option 'gamma' takes a number >= 0, got -1.0"),
                     (dict(grad_clip=-1.0), "option 'grad_clip' takes a number >= 0 or null, got -1.0")):
        with pytest.raises(ConfigError) as e:
            create_method("arl", **bad)
        assert str(e.value) == f"method 'arl' {msg}"
    assert create_method("arl", grad_clip=0).grad_clip is None
    assert create_method("arl", T="4", warmup_epochs="6", floor="null").T == 4.0


# ----------------------------------------------------------------------------- training step
def _splits(M=2, n=48, C=3, seed=0):
    rng = np.random.default_rng(seed)
    dims = [6, 4, 5][:M]
    y = rng.integers(0, C, n)
    arrays = {f"m{i}": (rng.normal(size=(n, d)) + (1.5 - i * 0.5) * y[:, None]).astype(np.float32)
              for i, d in enumerate(dims)}
    ds = ArrayDataset(arrays, y)
    return DataSplits(train=ds, val=ds, test=ds, modalities=list(arrays), num_classes=C,
                      input_shapes={m: (d,) for m, d in zip(arrays, dims)},
                      default_encoders={m: "mlp" for m in arrays},
                      encoder_options={m: {"hidden": [8, 8], "dropout": 0.1} for m in arrays})


def _trainer(M=2, fusion="concat", optimizer="sgd", **opts):
    over = {"train.epochs": 2, "method.name": "arl", "train.progress": "off", "train.probe": False,
            "train.batch_size": 16, "model.fusion": fusion, "optim.name": optimizer}
    over.update({f"method.{k}": v for k, v in opts.items()})
    return Trainer(load_config(None, over), run_dir=None, data=_splits(M))


def _batch(tr):
    return next(iter(tr.loader(tr.data.train, batch_size=16)))


def _grads(tr, batch, scale, gamma):
    tr.zero_grad()
    torch.manual_seed(123)  # identical dropout masks in both passes
    loss, _, coeffs = tr.method.forward_loss(batch, scale=scale, gamma=gamma)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}, coeffs


@pytest.mark.parametrize("fusion,M", [("concat", 2), ("sum", 2), ("film", 2), ("gated", 2), ("concat", 3),
                                      ("late", 3)])
def test_encoder_gradient_is_exactly_one_plus_k_times_unscaled(fusion, M):
    tr = _trainer(M=M, fusion=fusion, warmup_epochs=0, T=8.0)
    batch = _batch(tr)
    scaled, (k, *_rest) = _grads(tr, batch, scale=True, gamma=4.0)
    plain, (k2, *_rest) = _grads(tr, batch, scale=False, gamma=4.0)
    assert torch.allclose(k, k2)
    assert not torch.allclose(k, torch.full_like(k, 1.0 / M))  # a non-trivial rule is being tested
    mods = tr.model.modalities
    assert set(scaled) == set(plain)
    for name, g in plain.items():
        if name.startswith("encoders."):
            m = name.split(".")[1]
            factor = 1.0 + float(k[mods.index(m)])
            assert torch.allclose(scaled[name], factor * g, rtol=1e-4, atol=1e-8), name
        else:  # the fusion head is not scaled
            assert torch.allclose(scaled[name], g, rtol=1e-6, atol=1e-8), name


def _step_grads(tr, batch):
    """Run the method's own training_step and capture the gradients it hands to the optimizer."""
    captured = {}
    real = tr.optimizer_step

    def capture():
        captured.update({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        real()

    tr.optimizer_step = capture
    torch.manual_seed(123)
    tr.method.training_step(batch)
    tr.optimizer_step = real
    return captured


def test_no_scaling_and_gamma_one_during_warmup_then_scaling():
    tr = _trainer(warmup_epochs=2, gamma=4.0, grad_clip=None)
    batch = _batch(tr)
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.epoch = 1  # still warm-up
    expected, _ = _grads(tr, batch, scale=False, gamma=1.0)
    got = _step_grads(tr, batch)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[n], expected[n], atol=1e-7) for n in got)
    assert tr.method.epoch_diagnostics()["arl_active"] == 0.0

    tr.model.load_state_dict(state)
    tr.epoch = 2  # first epoch after warm-up
    unscaled, (k, *_r) = _grads(tr, batch, scale=False, gamma=4.0)
    got = _step_grads(tr, batch)
    mods = tr.model.modalities
    for n, g in unscaled.items():
        f = 1.0 + float(k[mods.index(n.split(".")[1])]) if n.startswith("encoders.") else 1.0
        assert torch.allclose(got[n], f * g, rtol=1e-5, atol=1e-8), n
    diag = tr.method.epoch_diagnostics()
    assert diag["arl_active"] == 1.0
    for m in mods:
        for q in ("k", "c", "v", "w"):
            assert f"{q}_{m}" in diag


# ----------------------------------------------------------------------------- reference step
def _hand_k(zs, y, masks, T):
    """k in plain Python over each modality's present rows (entropy estimator, product score)."""
    M = len(zs)
    cs, hs = [], []
    for z, p in zip(zs, masks):
        rows = [r for r, keep in zip(z.tolist(), p.tolist()) if keep]
        cs.append(sum(sum(abs(x) for x in r) for r in rows) / len(rows))
        hs.append(sum(_entropy(r) for r in rows) / len(rows))
    c = [x / sum(cs) for x in cs]
    v = [max(h / sum(hs), 0.6 / M) for h in hs]
    w = [(1 / x) / sum(1 / q for q in v) for x in v]
    r = [(M - 1) ** (M - 1) * w[m] * math.prod(c[n] for n in range(M) if n != m) for m in range(M)]
    return _softmax([T * x for x in r])


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None


def _reference_grads(tr, batch, active, gamma, T):
    """ARL's step written out with plain autograd from the same weights and batch: returns the
    gradient of every parameter (None where none reaches it) and the hand k."""
    model, mods = tr.model, tr.model.modalities
    y, pres = batch["label"], batch["present"]
    h = {m: model.encode(m, batch["inputs"][m], pres[m]) for m in mods}
    with torch.no_grad():
        zs = model.fuse(h, pres).unimodal_logits
    k = _hand_k([zs[m] for m in mods], y, [pres[m] for m in mods], T)
    if active:
        h = {m: _ScaleGrad.apply(h[m], 1.0 + k[i]) for i, m in enumerate(mods)}
    out = model.fuse(h, pres)
    F = torch.nn.functional
    loss = F.cross_entropy(out.logits, y) + gamma * sum(
        F.cross_entropy(out.unimodal_logits[m][pres[m]], y[pres[m]]) for m in mods)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}, k


def _tiny_trainer(M=2, fusion="concat", policy="input", optimizer="sgd", seed=0, **opts):
    mods = ["a", "b", "c"][:M]
    data = tiny_data(n=48, mods=mods, signal={"a": 1.5, "b": 0.3, "c": 0.6}, hidden=[8], dropout=0.0)
    over = {"train.batch_size": 16, "model.fusion": fusion, "model.absent_policy": policy, "optim.name": optimizer,
            "train.seed": seed,
            **{f"method.{k}": v for k, v in {"grad_clip": None, **opts}.items()}}
    return Trainer(quick_config("arl", **over), run_dir=None, data=data)


def _batch_with_missing(tr, n_missing=5):
    """A training batch where the last modality is absent (zero input, present False) for
    ``n_missing`` samples."""
    batch = next(iter(tr.loader(tr.data.train, batch_size=16)))
    last = tr.model.modalities[-1]
    batch["present"][last][:n_missing] = False
    batch["inputs"][last][:n_missing] = 0.0
    return batch


@pytest.mark.parametrize("fusion,M,policy", [("concat", 2, "input"), ("late", 3, "feature"), ("sum", 3, "input")])
def test_training_step_equals_hand_written_reference(fusion, M, policy):
    """Loss composition (CE(z) + gamma * sum_m CE over m's present samples), k from the present
    samples, (1 + k_m) on each encoder and not on the head: the gradients the optimizer gets."""
    tr = _tiny_trainer(M, fusion, policy, warmup_epochs=0, gamma=3.0, T=8.0)
    batch = _batch_with_missing(tr)
    want, k = _reference_grads(tr, batch, active=True, gamma=3.0, T=8.0)
    assert max(k) - min(k) > 0.05  # a non-trivial k
    got = capture_step_grads(tr, batch)
    assert set(got) == set(want) == {n for n, _ in tr.model.named_parameters()}  # every encoder and the head
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7), n
    diag = tr.method.epoch_diagnostics()
    assert [diag[f"k_{m}"] for m in tr.model.modalities] == pytest.approx(k, abs=1e-6)


@pytest.mark.parametrize("epoch,active", [(0, False), (1, False), (2, True), (3, True)])
def test_warmup_boundary(epoch, active):
    """warmup_epochs = 2: epochs 0 and 1 (the last warm-up epoch) use gamma = 1 and no scaling;
    epoch 2 (the first active one) and after use gamma and (1 + k_m)."""
    tr = _tiny_trainer(2, warmup_epochs=2, gamma=4.0)
    batch = _batch_with_missing(tr, 3)
    tr.epoch = epoch
    want, _ = _reference_grads(tr, batch, active=active, gamma=4.0 if active else 1.0, T=8.0)
    got = capture_step_grads(tr, batch)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7), n
    assert tr.method.epoch_diagnostics()["arl_active"] == float(active)


def test_step_normalises_by_the_global_count_of_present_samples(monkeypatch):
    """Simulated second process holding an identical batch: the statistics are summed (one
    all_reduce_sum per step, whatever the data) and each unimodal CE is normalised by the global
    count of present samples times the number of processes, so the gradient (before the engine's
    averaging) is the one-process gradient of this batch."""
    tr = _tiny_trainer(3, "sum", warmup_epochs=0, gamma=2.0)
    batch = _batch_with_missing(tr, 6)
    want, _ = _reference_grads(tr, batch, active=True, gamma=2.0, T=8.0)
    calls = []
    monkeypatch.setattr(Trainer, "world_size", property(lambda self: 2))
    monkeypatch.setattr(tr, "all_reduce_sum", lambda t: (calls.append(t.shape), 2 * t)[1])
    monkeypatch.setattr(tr, "all_reduce_mean", lambda t: pytest.fail("statistics must be summed, not averaged"))
    got = capture_step_grads(tr, batch)
    assert calls == [(3, 5)]
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7), n


def test_resume_gives_the_same_next_step():
    """ARL keeps no state between steps: a fresh trainer loaded with the model, optimizer and
    method state takes exactly the next step the original takes."""
    import copy

    tr = _tiny_trainer(2, warmup_epochs=0, optimizer="adam")
    tr.epoch = 1
    batches = list(tr.loader(tr.data.train, batch_size=16))
    for b in batches[:2]:
        tr.method.training_step(b)
    state = copy.deepcopy({"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
                           "method": tr.method.state_dict()})
    other = _tiny_trainer(2, warmup_epochs=0, optimizer="adam", seed=1)  # different initial weights
    assert not torch.equal(other.model.encoders["a"].net[1].weight, tr.model.encoders["a"].net[1].weight)
    other.model.load_state_dict(state["model"])
    other.optimizer.load_state_dict(state["optimizer"])
    other.method.load_state_dict(state["method"])
    other.epoch = 1
    g1, g2 = capture_step_grads(tr, batches[2]), capture_step_grads(other, batches[2])
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    for (n, a), (_, b) in zip(tr.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_grad_clip_option_bounds_the_step_gradient():
    tr = _trainer(warmup_epochs=0, grad_clip=1e-3)
    got = _step_grads(tr, _batch(tr))
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in got.values()]))
    assert float(total) <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_fit_three_modalities_any_optimizer(optimizer):
    tr = _trainer(M=3, fusion="concat", optimizer=optimizer, warmup_epochs=1, estimator="variance")
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    assert res["method_options"]["estimator"] == "variance"
    assert set(res["test"]["per_modality"]) == {"m0", "m1", "m2"}


@pytest.mark.parametrize("opts", [{"T": 2.0}, {"estimator": "variance"}, {"floor": 0.6}, {"score": "ratio"}])
def test_every_coefficient_option_reaches_the_step(opts):
    """The step's k is the rule's k under the run's options (a non-default T, estimator, floor or
    score must change what the step computes, not only what the constructor stores)."""
    tr = _tiny_trainer(2, "concat", "input", warmup_epochs=0, **opts)
    batch = _batch_with_missing(tr)
    tr.model.train()
    with torch.no_grad():
        out = tr.model(batch["inputs"], batch["present"])
    zs = [out.unimodal_logits[m] for m in tr.model.modalities]
    stats = arl_batch_statistics(zs, batch["label"], [batch["present"][m] for m in tr.model.modalities])
    want = arl_coefficients_from_statistics(stats, T=opts.get("T", 8.0), estimator=opts.get("estimator", "entropy"),
                                            floor=opts.get("floor"), score=opts.get("score", "product"))[0]
    default = arl_coefficients_from_statistics(stats)[0]
    assert not torch.allclose(want, default, atol=1e-4)  # the option matters on this batch
    stats_out = tr.method.training_step(batch)
    diag = tr.method.epoch_diagnostics()
    assert [diag[f"k_{m}"] for m in tr.model.modalities] == pytest.approx(want.tolist(), abs=1e-6)
    assert {"loss", "loss_fused", "loss_unimodal"} <= set(stats_out)


def test_defaults_are_the_papers_crema_d_setting():
    from mmbalance.methods import create_method

    hp = create_method("arl").hparams()
    assert (hp["T"], hp["gamma"], hp["warmup_epochs"], hp["grad_clip"], hp["floor"]) == (8.0, 4.0, 5, 40.0, None)
    assert (hp["estimator"], hp["score"]) == ("entropy", "product")
    z = [torch.randn(6, 3, generator=torch.Generator().manual_seed(1)) * s for s in (3.0, 0.5)]
    assert torch.allclose(arl_coefficients(z, torch.arange(6) % 3)[0], arl_coefficients(z, torch.arange(6) % 3, T=8.0)[0])
    assert not torch.allclose(arl_coefficients(z, torch.arange(6) % 3)[0], arl_coefficients(z, torch.arange(6) % 3, T=9.0)[0])


def test_model_uses_the_public_codes_unimodal_logits_unless_told_otherwise():
    tr = _tiny_trainer(2, "concat")
    assert tr.model.fusion.unimodal_bias == "full"
    tr = _tiny_trainer(2, "gated")
    assert tr.model.fusion.unimodal == "self"
    over = {"model.fusion_options": {"unimodal_bias": "share"}}
    data = tiny_data(n=48, hidden=[8], dropout=0.0)
    assert Trainer(quick_config("arl", **over), data=data).model.fusion.unimodal_bias == "share"


def test_degenerate_statistics_fall_back_to_uniform_shares():
    """All-zero unimodal logits (no dependence on any modality): c falls back to 1/M; a modality
    with a single present sample still counts."""
    z = [torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 3)]
    k, c, v, w = arl_coefficients(z, torch.arange(4) % 3)
    assert torch.allclose(c, torch.full((3,), 1 / 3)) and torch.allclose(k, torch.full((3,), 1 / 3), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(4, 3, generator=g) * 4, torch.randn(4, 3, generator=g)]
    masks = [torch.tensor([True, True, True, True]), torch.tensor([True, False, False, False])]
    k, c, v, w = arl_coefficients_from_statistics(arl_batch_statistics(zs, torch.arange(4) % 3, masks))
    assert float(c[1]) > 0 and float(k[1]) > 0  # one present sample is a statistic, not an absence
