"""LFM: the integration schedules and their boundaries, the released polynomial, the cross-modal
InfoNCE against a loop and the released prediction divergence by hand, training steps against
hand-written references (both alignments, several epochs), the model (late fusion), option
checks, missing modalities and two simulated processes (the InfoNCE over the gathered global
batch)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.lfm import (alignment_weight, cross_modal_infonce, fitted_supervised_weight, modality_gap,
                                   prediction_js)
from mmbalance.models.fusions import LateFusion, SumFusion
from mmbalance.registry import ConfigError

from helpers import capture_step_grads, quick_config, tiny_data
from simulated_ranks import two_ranks_vs_one


# ----------------------------------------------------------------------------- schedules
def test_heuristic_schedule_and_its_bounds():
    assert alignment_weight(0) == 0.95  # exp(0) = 1, clipped to alpha_max
    assert alignment_weight(1) == pytest.approx(math.exp(-0.3))
    assert alignment_weight(9) == pytest.approx(math.exp(-2.7))
    assert alignment_weight(10) == 0.05 and alignment_weight(99) == 0.05  # exp(-3) < 0.05: the floor
    assert alignment_weight(2, decay=0.1, alpha_min=0.0, alpha_max=1.0) == pytest.approx(math.exp(-0.2))
    assert alignment_weight(0, decay=0.0, alpha_max=0.6) == 0.6
    assert alignment_weight(7, "constant", alpha=0.3) == 0.3


def test_fitted_schedule_is_the_released_polynomial_clamped():
    c = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]
    for t in (0, 1, 37, 100, 199):
        raw = sum(ci * t ** i for i, ci in enumerate(c))
        assert fitted_supervised_weight(t) == pytest.approx(raw, rel=1e-12)
        assert alignment_weight(t, "fitted") == pytest.approx(1 - raw, rel=1e-9)
    assert fitted_supervised_weight(0) == pytest.approx(0.204623704)
    assert 0.0 <= fitted_supervised_weight(260) <= 1.0  # the polynomial itself is negative there
    with pytest.raises(ConfigError):
        alignment_weight(0, "learned")


# ----------------------------------------------------------------------------- alignment terms
def _infonce_loop(a, b, tau):
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        sa = [float(a[i] @ b[j]) / tau for j in range(n)]
        sb = [float(b[i] @ a[j]) / tau for j in range(n)]
        total += -sa[i] + math.log(sum(math.exp(s) for s in sa))
        total += -sb[i] + math.log(sum(math.exp(s) for s in sb))
    return total / (2 * n)


def test_infonce_equals_a_loop_and_masks_absent_pairs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert float(cross_modal_infonce(a, b, 0.5)) == pytest.approx(_infonce_loop(a, b, 0.5), rel=1e-5)
    valid = torch.tensor([True, False, True, True, False, True])
    assert float(cross_modal_infonce(a, b, 0.2, valid)) == pytest.approx(_infonce_loop(a[valid], b[valid], 0.2), rel=1e-5)
    # aligned pairs, far from the others: ~0; invariant to the feature norms
    e = torch.eye(4) * 3
    assert float(cross_modal_infonce(e, e * 10, 0.01)) < 1e-6
    x = torch.randn(2, 3, requires_grad=True)
    zero = cross_modal_infonce(x, x, 0.1, torch.tensor([False, False]))
    assert float(zero.detach()) == 0.0
    zero.backward()  # still a graph
    assert float(cross_modal_infonce(x[:1], x[:1], 0.1).detach()) == 0.0  # one pair: nothing to contrast
    # computed on the features' device ('meta' stands in for an accelerator): the targets too
    on = torch.randn(3, 4, device="meta")
    assert cross_modal_infonce(on, on.clone(), 0.1).device.type == "meta"


def test_prediction_js_is_the_released_formula():
    zp, zq = torch.tensor([[0.0, 0.0], [2.0, -1.0]]), torch.tensor([[math.log(3.0), 0.0], [2.0, -1.0]])
    p = torch.tensor([0.5, 0.5]); q = torch.tensor([0.75, 0.25]); m = (p + q) / 2
    kl_m_p = float((m * (m / p).log()).sum()); kl_m_q = float((m * (m / q).log()).sum())
    got = prediction_js(zp, zq)
    assert float(got[0]) == pytest.approx(0.5 * (kl_m_p + kl_m_q), rel=1e-6)
    assert float(got[1]) == pytest.approx(0.0, abs=1e-7)
    # the released code: 0.5 * (kl_div(p.log(), m, 'batchmean') + kl_div(q.log(), m, 'batchmean'))
    P, Q = F.softmax(zp, 1), F.softmax(zq, 1)
    M = 0.5 * P + 0.5 * Q
    code = 0.5 * (F.kl_div(P.log(), M, reduction="batchmean") + F.kl_div(Q.log(), M, reduction="batchmean"))
    assert float(got.mean()) == pytest.approx(float(code), rel=1e-6)
    assert torch.allclose(prediction_js(zq, zp), got)  # symmetric


def test_modality_gap_by_hand():
    a = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    # centroids (0.5, 0.5) and (0, 1)
    assert modality_gap(a, b) == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert modality_gap(a, b, torch.tensor([False, True])) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- the method
def _trainer(missing=0.0, mods=("a", "b"), fusion="concat", hidden=(8,), **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("lfm", epochs=1, **{"train.batch_size": 24, "model.fusion": fusion, **over})
    return Trainer(cfg, data=tiny_data(48, mods, hidden=list(hidden), dropout=0.0, missing=missing))


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=24, shuffle=True, seed=seed)))


def test_model_is_late_fusion_by_default_and_the_given_fusion_otherwise():
    assert isinstance(_trainer().model.fusion, LateFusion)
    assert isinstance(_trainer(fusion="sum").model.fusion, SumFusion)


@pytest.mark.parametrize("alignment,epoch,scale", [("contrastive", 0, 1.0), ("contrastive", 3, 1.0),
                                                    ("js", 1, 2.0), ("js", 12, 1.0)])
def test_training_step_equals_a_hand_written_reference(alignment, epoch, scale):
    tr = _trainer(alignment=alignment, temperature=0.3, loss_scale=scale)
    tr.epoch = epoch
    batch = _batch(tr)
    y = batch["label"]
    ref = copy.deepcopy(tr.model)
    h = {m: ref.encoders[m](batch["inputs"][m]) for m in ("a", "b")}
    za, zb = (ref.fusion.heads[m](h[m]) for m in ("a", "b"))
    sup = F.cross_entropy(0.5 * za + 0.5 * zb, y)
    if alignment == "contrastive":
        an, bn = F.normalize(h["a"], dim=1), F.normalize(h["b"], dim=1)
        s = an @ bn.T / 0.3
        t = torch.arange(len(y))
        align = 0.5 * (F.cross_entropy(s, t) + F.cross_entropy(s.T, t))
    else:
        pa, pb = F.softmax(za, 1), F.softmax(zb, 1)
        mm = 0.5 * (pa + pb)
        align = 0.5 * (F.kl_div(pa.log(), mm, reduction="batchmean") + F.kl_div(pb.log(), mm, reduction="batchmean"))
    a = min(max(math.exp(-0.3 * epoch), 0.05), 0.95)
    (scale * ((1 - a) * sup + a * align)).backward()
    tr.model.train()
    got = capture_step_grads(tr, batch)
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert d["alpha"] == pytest.approx(a)
    assert d["loss_sup"] == pytest.approx(float(sup), rel=1e-5)
    assert d["loss_align"] == pytest.approx(float(align), rel=1e-5)
    assert ("gap" in d) == (alignment == "contrastive")


def test_the_alignment_weight_follows_the_epoch_across_a_run():
    tr = Trainer(quick_config("lfm", epochs=3, **{"method.schedule": "heuristic", "method.decay": 1.0}))
    alphas = []
    orig = tr.method.epoch_diagnostics

    def grab():
        d = orig()
        alphas.append(d["alpha"])
        return d

    tr.method.epoch_diagnostics = grab
    tr.fit()
    assert alphas == pytest.approx([0.95, math.exp(-1.0), math.exp(-2.0)])


@pytest.mark.parametrize("opts,epoch,want", [
    ({"schedule": "constant", "alpha": 0.3}, 5, 0.3),
    ({"schedule": "heuristic", "decay": 0.5}, 1, math.exp(-0.5)),
    ({"schedule": "heuristic", "decay": 0.1, "alpha_max": 0.8}, 0, 0.8),
    ({"schedule": "heuristic", "alpha_min": 0.2}, 30, 0.2),
    ({"schedule": "fitted"}, 100, 1.0 - fitted_supervised_weight(100)),
])
def test_every_schedule_option_reaches_the_step(opts, epoch, want):
    tr = _trainer(alignment="js", **opts)
    tr.epoch = epoch
    assert tr.method.weight(epoch) == pytest.approx(want)
    tr.model.train()
    tr.method.training_step(_batch(tr))
    d = tr.method.epoch_diagnostics()
    assert d["alpha"] == pytest.approx(want)


def test_feature_absent_policy_zeroes_absent_features_in_the_fused_loss():
    """With ``model.absent_policy: feature`` the supervised term is the CE of the model's fused
    output with the absent samples' features zeroed (the presence mask reaches the fusion)."""
    cfg = quick_config("lfm", epochs=1, **{"train.batch_size": 24, "method.alignment": "js",
                                           "model.absent_policy": "feature"})
    tr = Trainer(cfg, data=tiny_data(48, ("a", "b"), hidden=[8], dropout=0.0, missing=0.4))
    batch = _batch(tr)
    assert not batch["present"]["a"].all()
    with torch.no_grad():
        want = F.cross_entropy(tr.model(batch["inputs"], batch["present"]).logits, batch["label"])
        plain = F.cross_entropy(tr.model(batch["inputs"]).logits, batch["label"])
    assert abs(float(want) - float(plain)) > 1e-4
    tr.model.train()
    tr.method.training_step(batch)
    assert tr.method.epoch_diagnostics()["loss_sup"] == pytest.approx(float(want), rel=1e-5)


def test_option_checks():
    with pytest.raises(ConfigError, match="alpha_min"):
        create_method("lfm", alpha_min=0.9, alpha_max=0.2)
    with pytest.raises(ConfigError, match="schedule"):
        create_method("lfm", schedule="learned")
    with pytest.raises(ConfigError, match="needs at least two"):
        Trainer(quick_config("lfm", epochs=1, **{"dataset.options": {"modalities": ["pix"]}}))
    with pytest.raises(ConfigError, match="equal widths"):
        Trainer(quick_config("lfm", epochs=1, **{"model.encoders": {"pix": {"hidden": [16]}}}))
    # the divergence compares predictions: any widths
    tr = Trainer(quick_config("lfm", epochs=1, **{"model.encoders": {"pix": {"hidden": [16]}}, "method.alignment": "js"}))
    assert tr.method.state_dict() == {}


def test_three_modalities_average_the_pairs():
    tr = _trainer(mods=("a", "b", "c"), temperature=0.5)
    batch = _batch(tr)
    h = {m: tr.model.encoders[m](batch["inputs"][m]).detach() for m in ("a", "b", "c")}
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    want = sum(_infonce_loop(h[i], h[j], 0.5) for i, j in pairs) / 3
    tr.model.train()
    tr.method.training_step(batch)
    assert tr.method.epoch_diagnostics()["loss_align"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("alignment", ["contrastive", "js"])
def test_missing_modalities_use_only_pairs_present_together(alignment):
    tr = _trainer(missing=0.4, alignment=alignment)
    batch = _batch(tr)
    pres = batch["present"]
    both = pres["a"] & pres["b"]
    assert not both.all() and both.any()
    feats = tr.model.encode_all(batch["inputs"], pres)
    out = tr.model.fuse(feats, pres)
    if alignment == "contrastive":
        want = cross_modal_infonce(feats["a"][both], feats["b"][both], 0.07)
    else:
        want = prediction_js(out.unimodal_logits["a"][both], out.unimodal_logits["b"][both]).mean()
    tr.model.train()
    tr.method.training_step(batch)
    d = tr.method.epoch_diagnostics()
    assert d["loss_align"] == pytest.approx(float(want), rel=1e-5)
    if alignment == "contrastive":  # the modality gap over the pairs present together, by hand
        ca = F.normalize(feats["a"][both].detach(), dim=1).mean(0)
        cb = F.normalize(feats["b"][both].detach(), dim=1).mean(0)
        assert d["gap"] == pytest.approx(float((ca - cb).norm()), rel=1e-5)


def test_divergence_of_a_single_pair_present_together_is_its_own():
    """A global batch where one sample has both modalities: the divergence term is that sample's
    (a mean over one pair, not a smaller number)."""
    tr = _trainer(alignment="js")
    batch = _batch(tr)
    batch["present"]["b"] = torch.zeros_like(batch["present"]["b"])
    batch["present"]["b"][3] = True
    out = tr.model(batch["inputs"], batch["present"])
    want = prediction_js(out.unimodal_logits["a"][3:4], out.unimodal_logits["b"][3:4])
    assert float(want) > 1e-4
    tr.model.train()
    tr.method.training_step(batch)
    assert tr.method.epoch_diagnostics()["loss_align"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("alignment", ["contrastive", "js"])
def test_two_processes_with_missing_modalities_equal_one_process(monkeypatch, alignment):
    """The InfoNCE runs on the features gathered from both ranks (negatives from the other rank
    too) and each rank's gradient is scaled for the engine's averaging; the divergence's counts
    are summed."""
    def make():
        tr = _trainer(missing=0.3, alignment=alignment, temperature=0.2)
        tr.epoch = 2
        return tr

    batch = _batch(make())
    assert batch["present"]["a"][0::2].sum() != batch["present"]["a"][1::2].sum()
    d1, d0 = two_ranks_vs_one(monkeypatch, make, batch)
    if alignment == "contrastive":  # computed on the gathered global batch on every rank
        assert d0["loss_align"] == pytest.approx(d1["loss_align"], rel=1e-5)
        assert d0["gap"] == pytest.approx(d1["gap"], rel=1e-5)
