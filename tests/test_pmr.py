"""PMR: prototypes = class means (EMA, missing classes), vectorised distances = a loop, the
prototypical CE reaches only the weaker modality, and short training runs."""
import math

import torch

from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.methods.pmr import (class_sums, pmr_weak_modalities, prototype_logits, prototype_scores,
                                   update_prototypes)

from helpers import capture_step_grads


def test_prototypes_are_class_means_on_a_hand_made_batch():
    h = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [10.0, 10.0], [2.0, 2.0]])
    y = torch.tensor([0, 0, 1, 2, 1])
    s, c = class_sums(h, y, 4)
    assert c.tolist() == [2, 2, 1, 0]
    P = update_prototypes(s, c, old=None, mu=0.0)
    assert torch.allclose(P[:3], torch.tensor([[2.0, 1.0], [1.0, 3.0], [10.0, 10.0]]))
    # class 3 never seen and no old prototype: the pass's mean feature, finite
    assert torch.allclose(P[3], h.mean(0))
    # two half-batches summed give the same means (what the all-reduce / accumulation does)
    s1, c1 = class_sums(h[:2], y[:2], 4)
    s2, c2 = class_sums(h[2:], y[2:], 4)
    assert torch.allclose(update_prototypes(s1 + s2, c1 + c2, None, 0.0), P)


def test_prototype_ema_and_missing_class_keeps_old():
    old = torch.tensor([[0.0, 0.0], [4.0, 4.0], [8.0, 8.0]])
    h = torch.tensor([[2.0, 2.0], [6.0, 2.0]])
    y = torch.tensor([0, 1])
    s, c = class_sums(h, y, 3)
    P = update_prototypes(s, c, old, mu=0.25)
    assert torch.allclose(P[0], 0.75 * torch.tensor([2.0, 2.0]) + 0.25 * old[0])
    assert torch.allclose(P[1], 0.75 * torch.tensor([6.0, 2.0]) + 0.25 * old[1])
    assert torch.equal(P[2], old[2])  # missing from the pass: unchanged, no NaN
    assert torch.isfinite(P).all()


def test_distances_vectorised_equal_a_loop():
    g = torch.Generator().manual_seed(0)
    h, P = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    d = prototype_logits(h, P)
    loop = torch.tensor([[-math.sqrt(float(((h[i] - P[k]) ** 2).sum())) for k in range(4)] for i in range(7)])
    assert torch.allclose(d, loop, atol=1e-5)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    s = prototype_scores(h, P, y)
    assert math.isclose(float(s), float(sum(torch.softmax(loop[i], 0)[y[i]] for i in range(7))), rel_tol=1e-5)


def test_weaker_modality_rule():
    assert pmr_weak_modalities([5.0, 3.0]) == [False, True]   # rho > 1: the second is weaker
    assert pmr_weak_modalities([3.0, 5.0]) == [True, False]   # rho < 1: the first
    assert pmr_weak_modalities([4.0, 4.0]) == [False, False]  # rho = 1: nobody
    assert pmr_weak_modalities([2.0, 6.0, 6.0, 1.0]) == [True, False, False, True]


def _cfg(**over):
    base = {"train.epochs": 1, "method.name": "pmr", "train.progress": "off", "train.probe": False,
            "train.eval_batch_size": 512, "model.encoder_options": {"dropout": 0.0}}
    base.update(over)
    return load_config(None, base)


def test_pce_gradient_reaches_only_the_weaker_modality():
    """One training step: the encoder gradients equal those of CE(z) plus alpha * PCE of the
    weaker modality only (the stronger modality's encoder gets the plain CE(z) gradient)."""
    tr = Trainer(_cfg(**{"method.alpha": 2.0}))
    tr.method.on_epoch_start(0)
    tr.model.train()
    batch = next(iter(tr.loader(tr.data.train, batch_size=128)))
    y = batch["label"]
    model, mods = tr.model, tr.model.modalities
    out = model(batch["inputs"], batch["present"])
    scores = [float(prototype_scores(out.features[m].detach(), tr.method.prototypes[m], y)) for m in mods]
    weak = pmr_weak_modalities(scores)
    assert sum(weak) == 1
    grads = {}
    for name, extra in (("ce", []), *[(m, [m]) for m in mods]):
        model.zero_grad()
        out = model(batch["inputs"], batch["present"])
        loss = torch.nn.functional.cross_entropy(out.logits, y)
        for m in extra:
            loss = loss + 2.0 * torch.nn.functional.cross_entropy(
                prototype_logits(out.features[m], tr.method.prototypes[m]), y)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    weak_m = mods[weak.index(True)]
    # through the method's hook: captured before the optimizer step
    captured = capture_step_grads(tr, batch)
    for n in captured:
        assert torch.allclose(captured[n], grads[weak_m][n], atol=1e-6), n
    strong = [m for m in mods if m != weak_m][0]
    enc_strong = [n for n in captured if n.startswith(f"encoders.{strong}.")]
    assert all(torch.allclose(captured[n], grads["ce"][n], atol=1e-6) for n in enc_strong)
    enc_weak = [n for n in captured if n.startswith(f"encoders.{weak_m}.")]
    assert any(not torch.allclose(captured[n], grads["ce"][n], atol=1e-6) for n in enc_weak)
    diag = tr.method.epoch_diagnostics()
    assert diag[f"weak_{weak_m}"] == 1.0 and diag[f"weak_{strong}"] == 0.0


def test_training_runs_and_resume_state_three_modalities():
    tr = Trainer(_cfg(**{"dataset.options": {"modalities": ["pix", "fou", "zer"]}, "train.epochs": 2}))
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    st = tr.method.state_dict()
    assert set(st["prototypes"]) == {"pix", "fou", "zer"}
    assert st["prototypes"]["pix"].shape == (tr.data.num_classes, tr.model.feature_dim("pix"))
    Trainer(_cfg(**{"model.fusion": "gated"})).fit()

