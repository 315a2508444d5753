"""ARL: coefficients (hand computation, two-modality public-code form), exact (1 + k_m)
gradient scaling on each encoder, warm-up, clipping, M > 2 and the fusions it must support."""
import math

import numpy as np
import pytest
import torch

from mmbalance.config import load_config
from mmbalance.data.base import ArrayDataset, DataSplits
from mmbalance.engine import Trainer
from mmbalance.methods.arl import arl_coefficients, arl_coefficients_from_statistics, default_floor
from mmbalance.registry import ConfigError


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


def test_three_modalities_product_form():
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(10, 4, generator=g) * s for s in (0.5, 1.0, 3.0)]
    y = torch.randint(0, 4, (10,), generator=g)
    k, c, v, w = arl_coefficients(zs, y, T=4.0)
    assert k.shape == (3,) and float(k.sum()) == pytest.approx(1.0)
    r = c.prod() * w / c
    assert torch.allclose(k, torch.softmax(4.0 * r, 0), atol=1e-6)
    assert float(v.min()) >= default_floor(3) - 1e-7


def test_statistics_reduce_like_the_global_batch():
    """Averaging per-half statistics (what all_reduce_mean does for 2 ranks) equals one batch."""
    from mmbalance.methods.arl import arl_batch_statistics

    g = torch.Generator().manual_seed(2)
    zs = [torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g) * 2]
    y = torch.randint(0, 3, (8,), generator=g)
    full = arl_batch_statistics(zs, y)
    halves = (arl_batch_statistics([z[:4] for z in zs], y[:4]) + arl_batch_statistics([z[4:] for z in zs], y[4:])) / 2
    assert torch.allclose(full, halves, atol=1e-6)
    for est in ("entropy", "variance"):
        a = arl_coefficients_from_statistics(full, estimator=est)
        b = arl_coefficients_from_statistics(halves, estimator=est)
        assert all(torch.allclose(x, z, atol=1e-6) for x, z in zip(a, b))


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError):
        arl_coefficients([torch.zeros(2, 2)] * 2, torch.zeros(2, dtype=torch.long), estimator="nope")
    from mmbalance.methods import create_method

    with pytest.raises(ConfigError):
        create_method("arl", score="bad")


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
            assert torch.allclose(scaled[name], factor * g, rtol=1e-5, atol=1e-8), name
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
