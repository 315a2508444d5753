"""Evaluation: classification metrics against hand-computed values, the linear probe against
scipy's optimiser on the same objective, and its behaviour on separable / uninformative data."""
import numpy as np
import pytest
import torch

from mmbalance.evaluation.metrics import classification_metrics
from mmbalance.evaluation.probe import fit_linear_probe, probe_accuracy


def test_metrics_by_hand():
    # 3 classes, 6 samples; predictions: [0, 1, 1, 2, 2, 0] vs labels [0, 1, 2, 2, 2, 1]
    logits = torch.tensor([[3., 0, 0], [0, 3, 0], [0, 3, 1], [0, 0, 3], [1, 0, 3], [3, 1, 0]])
    y = torch.tensor([0, 1, 2, 2, 2, 1])
    m = classification_metrics(logits, y, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class F1: c0: tp1 fp1 fn0 -> 2/3; c1: tp1 fp1 fn1 -> 1/2; c2: tp2 fp0 fn1 -> 4/5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3, abs=1e-6)
    # average precision per class from the softmax scores, by brute force
    p = logits.softmax(1).numpy()
    aps = []
    for c in range(3):
        order = np.argsort(-p[:, c], kind="stable")
        rel = (y.numpy()[order] == c).astype(float)
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append((prec * rel).sum() / rel.sum())
    assert m["map"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_metrics_perfect_and_worst():
    y = torch.tensor([0, 1, 2, 0])
    perfect = torch.nn.functional.one_hot(y, 3).float() * 5
    m = classification_metrics(perfect, y, 3)
    assert m == {"accuracy": 1.0, "macro_f1": 1.0, "map": 1.0}
    wrong = torch.nn.functional.one_hot((y + 1) % 3, 3).float() * 5
    assert classification_metrics(wrong, y, 3)["accuracy"] == 0.0


def test_probe_matches_scipy_on_the_same_objective():
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    C, l2 = 3, 1e-2
    w, b, mean, std = fit_linear_probe(x, y, C, l2=l2)
    assert torch.allclose(mean, x.mean(0, keepdim=True)) and torch.allclose(std, x.std(0, keepdim=True))
    xs = ((x - mean) / std).numpy()
    Y = np.eye(C)[y.numpy()]

    def f(theta):
        W, B = theta[:4 * C].reshape(4, C), theta[4 * C:]
        z = xs @ W + B
        z = z - z.max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -(Y * lp).sum(1).mean() + l2 * (W * W).sum()

    ref = scipy_opt.minimize(f, np.zeros(5 * C), method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10})
    ours = np.concatenate([w.numpy().ravel(), b.numpy()])
    assert f(ours) == pytest.approx(ref.fun, abs=1e-6)


def test_probe_accuracy_separable_and_noise():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(90) % 3
    x = torch.randn(90, 5, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 3).float().repeat(1, 2)[:, :5] * 3
    assert probe_accuracy(x[:60], y[:60], x[60:], y[60:], 3) == 1.0
    noise = torch.randn(300, 5, generator=g)
    yn = torch.arange(300) % 3
    acc = probe_accuracy(noise[:200], yn[:200], noise[200:], yn[200:], 3)
    assert 0.15 < acc < 0.55  # chance is 1/3
    # evaluation uses the *training* standardisation: shifting eval features changes predictions
    shifted = probe_accuracy(x[:60], y[:60], x[60:] + 100.0, y[60:], 3)
    assert shifted < 1.0


def test_probe_accuracy_passes_its_l2_and_defaults_to_1e_3(monkeypatch):
    from mmbalance.evaluation import probe

    seen = []
    orig = probe.fit_linear_probe
    monkeypatch.setattr(probe, "fit_linear_probe", lambda *a, **k: seen.append(a[3] if len(a) > 3 else k.get("l2"))
                        or orig(*a, **k))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 3, generator=g), torch.arange(30) % 3
    probe.probe_accuracy(x, y, x, y, 3, l2=0.5)
    probe.probe_accuracy(x, y, x, y, 3)
    assert seen == [0.5, 1e-3]
