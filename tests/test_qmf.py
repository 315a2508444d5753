"""QMF: confidence fusion formula, ranking loss by hand (zero when the confidence order matches
the loss-history order), history keyed by dataset index (shuffle invariance), training run."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods.qmf import LossHistory, energy_confidence, minmax_normalise, qmf_fuse, qmf_rank_loss
from mmbalance.registry import ConfigError

from helpers import quick_config


def test_fused_logits_follow_the_formula():
    torch.manual_seed(0)
    za, zv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    z, w = qmf_fuse({"a": za, "v": zv}, temperature=10.0)
    wa = torch.log(torch.exp(za).sum(1, keepdim=True)) / 10
    wv = torch.log(torch.exp(zv).sum(1, keepdim=True)) / 10
    assert torch.allclose(w["a"], wa) and torch.allclose(w["v"], wv)
    assert torch.allclose(z, wa * za + wv * zv, atol=1e-6)
    # weights not detached: the gradient includes d(w_a)/d(z_a); detached: it does not
    z.sum().backward()
    g_full = za.grad.clone()
    za.grad = None
    zd, _ = qmf_fuse({"a": za, "v": zv}, temperature=10.0, detach_weights=True)
    zd.sum().backward()
    assert torch.allclose(za.grad, wa.detach().expand(4, 3))
    assert not torch.allclose(g_full, za.grad)
    assert torch.allclose(energy_confidence(torch.tensor([[1.0, 1.0, 1.0]]), 2.0), torch.tensor([[(1 + math.log(3)) / 2]]))


def test_rank_loss_by_hand():
    # pairs (0,1), (1,2), (2,0); hist L = [0.9, 0.1, 0.5]
    hist = torch.tensor([0.9, 0.1, 0.5])
    w = torch.tensor([0.8, 0.2, 0.5])
    # pair (0,1): t=+1, margin 0.8 -> max(0, 0.8 - 0.2 - 0.8) = 0
    # pair (1,2): t=-1, margin 0.4 -> max(0, 0.5 - 0.2 - 0.4) = 0
    # pair (2,0): t=-1, margin 0.4 -> max(0, 0.8 - 0.5 - 0.4) = 0
    assert float(qmf_rank_loss(w, hist)) == 0.0
    w = torch.tensor([1.5, 0.2, 0.5])
    # (0,1): max(0, 1.5-0.2-0.8)=0.5; (1,2): 0; (2,0): max(0, 1.5-0.5-0.4)=0.6 -> mean 1.1/3
    assert math.isclose(float(qmf_rank_loss(w, hist)), 1.1 / 3, rel_tol=1e-6)
    # equals torch's MarginRankingLoss written as in the release
    t = torch.sign(hist - torch.roll(hist, -1))
    ref = F.margin_ranking_loss(w, torch.roll(w, -1) + (hist - torch.roll(hist, -1)).abs() / t, -t)
    assert math.isclose(float(qmf_rank_loss(w, hist)), float(ref), rel_tol=1e-6)


def test_rank_loss_zero_when_confidence_order_matches_history_order():
    """'Matches': the sample with the larger history loss never has the larger confidence
    (confidence is a decreasing function of history loss) -> loss 0 for any margins."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        hist = torch.rand(32, generator=g)
        for w in (1.0 - 2.0 * hist, -hist**3, torch.exp(-5 * hist)):  # decreasing in the history loss
            assert float(qmf_rank_loss(w, hist)) == 0.0
        # inverted order (confidence grows with history loss) beyond the margin slack: positive
        assert float(qmf_rank_loss(3.0 * hist, hist)) > 0.0
    # ties in the history give t = 0: no loss whatever the confidences
    assert float(qmf_rank_loss(torch.tensor([5.0, -5.0]), torch.tensor([0.3, 0.3]))) == 0.0


def test_minmax_normalise_flat_history_is_zero():
    assert minmax_normalise(torch.tensor([2.0]), torch.tensor([2.0, 2.0])).tolist() == [0.0]
    assert torch.allclose(minmax_normalise(torch.tensor([3.0]), torch.tensor([1.0, 5.0])), torch.tensor([0.5]))


def test_history_is_keyed_by_dataset_index_shuffle_invariant():
    n = 10
    losses = torch.arange(n, dtype=torch.float32) * 0.1 + 1.0
    a, b = LossHistory(["x"], n), LossHistory(["x"], n)
    for perm in (torch.arange(n), torch.randperm(n, generator=torch.Generator().manual_seed(3))):
        for chunk in perm.split(3):
            a.update("x", chunk, losses[chunk])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    b.update("x", order, losses[order])
    b.update("x", order.flip(0), losses[order.flip(0)])
    assert torch.allclose(a.values["x"], 2 * losses.double())
    assert torch.allclose(a.values["x"], b.values["x"])
    assert torch.allclose(a.normalised("x", torch.tensor([0, 9])), torch.tensor([0.0, 1.0]))


def _cfg(**over):
    return quick_config("qmf", epochs=2, **over)


def test_training_history_predict_and_resume_state():
    tr = Trainer(_cfg(**{"train.epochs": 1}))
    assert type(tr.model.fusion).__name__ == "LateFusion"  # concat default -> late heads
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    hist = tr.method.history.values
    n = len(tr.data.train)
    for m in ("pix", "fou"):
        assert hist[m].shape == (n,) and bool((hist[m] > 0).all())  # every sample seen once
    # the history equals the per-sample CE summed over the epoch: bounded by a plausible range
    st = tr.method.state_dict()
    tr2 = Trainer(_cfg(**{"train.epochs": 1}))
    tr2.method.load_state_dict(st)
    assert torch.equal(tr2.method.history.values["pix"].cpu(), st["history"]["pix"].double())
    # predict = confidence-weighted sum of the unimodal logits
    batch = next(iter(tr.loader(tr.data.val, batch_size=16)))
    tr.model.eval()
    with torch.no_grad():
        out = tr.method.predict(batch)
        z = sum(energy_confidence(out.unimodal_logits[m], 10.0) * out.unimodal_logits[m] for m in ("pix", "fou"))
    assert torch.allclose(out.logits, z, atol=1e-5)


def test_three_modalities_and_fusion_rules():
    Trainer(_cfg(**{"dataset.options": {"modalities": ["pix", "fou", "zer"]}, "train.epochs": 1,
                    "model.fusion": "sum"})).fit()
    with pytest.raises(ConfigError):
        Trainer(_cfg(**{"model.fusion": "film"}))


def test_training_step_adds_per_sample_unimodal_ce_at_the_batch_indices():
    tr = Trainer(_cfg(**{"model.encoder_options": {"dropout": 0.0}}))
    batch = next(iter(tr.loader(tr.data.train, shuffle=True, batch_size=32, seed=7)))
    idx = batch["index"]
    assert not torch.equal(idx, torch.arange(32))  # shuffled: positions != indices
    tr.model.train()
    with torch.no_grad():
        out = tr.model(batch["inputs"], batch["present"])
        ce = {m: F.cross_entropy(out.unimodal_logits[m], batch["label"], reduction="none") for m in ("pix", "fou")}
    tr.method.training_step(batch)
    for m in ("pix", "fou"):
        h = tr.method.history.values[m]
        assert torch.allclose(h[idx].float(), ce[m], atol=1e-5)
        mask = torch.ones_like(h, dtype=torch.bool)
        mask[idx] = False
        assert float(h[mask].abs().sum()) == 0.0

