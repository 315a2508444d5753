"""DGL: frozen-head unimodal logits (same values, gradient to the features only), a training step
against the public code's two-backward procedure written out (encoders get alpha * the unimodal
gradients only, the fusion head the fused gradient only), fusion-specific unimodal rules,
missing modalities (masked unimodal terms, feature policy) and two simulated processes."""
import copy

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.dgl import absent_masked, frozen_unimodal_logits
from mmbalance.registry import ConfigError

from helpers import capture_step_grads, quick_config, tiny_data
from simulated_ranks import two_ranks_vs_one


def _trainer(fusion="concat", missing=0.0, mods=("a", "b"), policy="input", **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("dgl", epochs=1, **{"train.batch_size": 24, "model.fusion": fusion,
                                           "model.absent_policy": policy, **over})
    return Trainer(cfg, data=tiny_data(48, mods, hidden=[8], dropout=0.0, missing=missing))


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=24, shuffle=True, seed=seed)))


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated"])
def test_frozen_unimodal_logits_equal_the_fusion_and_train_only_the_features(fusion):
    tr = _trainer(fusion)
    batch = _batch(tr)
    model = tr.model
    feats = model.encode_all(batch["inputs"])
    zm = frozen_unimodal_logits(model, feats)
    ref = model.fuse(feats).unimodal_logits
    for m in ("a", "b"):
        assert torch.allclose(zm[m], ref[m], atol=1e-6)
    sum(z.sum() for z in zm.values()).backward()
    assert all(p.grad is None for p in model.fusion.parameters())
    assert all(p.grad is not None for p in model.encoders.parameters())


def test_unimodal_rules_follow_the_public_code():
    """concat: zero-the-others keeps the full bias (W_m h_m + b); gated: self-gating."""
    tr = _trainer("concat")
    assert tr.model.fusion.unimodal_bias == "full"
    h = {"a": torch.randn(4, 8), "b": torch.randn(4, 8)}
    zero_others = tr.model.fusion.fc(torch.cat([h["a"], torch.zeros(4, 8)], 1))
    assert torch.allclose(tr.model.fuse(h).unimodal_logits["a"], zero_others, atol=1e-6)
    assert _trainer("gated").model.fusion.unimodal == "self"
    over = quick_config("dgl", epochs=1, **{"model.fusion_options": {"unimodal_bias": "share"}})
    assert Trainer(over).model.fusion.unimodal_bias == "share"  # an explicit choice is kept


def _official_reference(model, batch, alpha):
    """The public code's step: (1) ``alpha * (CE_a + CE_b)`` backward, (2) every fusion-module
    gradient discarded, (3) the fused loss on detached features backward."""
    ref = copy.deepcopy(model)
    y = batch["label"]
    h = {m: ref.encoders[m](batch["inputs"][m]) for m in ("a", "b")}
    _, zm = ref.fusion(h)
    (alpha * sum(F.cross_entropy(zm[m], y) for m in ("a", "b"))).backward(retain_graph=True)
    for p in ref.fusion.parameters():
        p.grad = None
    z, _ = ref.fusion({m: f.detach() for m, f in h.items()})
    F.cross_entropy(z, y).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("fusion,alpha", [("concat", 4.0), ("sum", 1.5), ("gated", 2.0), ("film", 3.0)])
def test_training_step_equals_the_public_two_backward_procedure(fusion, alpha):
    tr = _trainer(fusion, alpha=alpha)
    batch = _batch(tr)
    expected = _official_reference(tr.model, batch, alpha)
    tr.model.train()
    got = capture_step_grads(tr, batch)
    for n, g in expected.items():
        assert g is not None, n
        assert torch.allclose(got[n], g, atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert {"loss_fused", "loss_a", "loss_b"} <= set(d)


def test_encoders_learn_only_from_unimodal_losses_and_the_head_only_from_the_fused_loss():
    tr = _trainer(alpha=2.0)
    batch = _batch(tr)
    model = tr.model
    loss, loss_fused, uni, _ = tr.method.losses(batch)
    enc = list(model.encoders.parameters())
    head = list(model.fusion.parameters())
    g_fused = torch.autograd.grad(loss_fused, enc + head, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in g_fused[:len(enc)])
    g_uni = torch.autograd.grad(sum(uni.values()), enc + head, retain_graph=True, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in g_uni[len(enc):])
    assert any(g is not None and g.abs().max() > 0 for g in g_uni[:len(enc)])
    # alpha scales what the encoders get and nothing else
    g_all = torch.autograd.grad(loss, enc + head)
    for g, gu in zip(g_all[:len(enc)], g_uni[:len(enc)]):
        assert torch.allclose(g, 2.0 * gu, atol=1e-6)
    for g, gf in zip(g_all[len(enc):], g_fused[len(enc):]):
        assert torch.allclose(g, gf, atol=1e-6)
    total = float(loss_fused.detach()) + 2.0 * float(sum(u.detach() for u in uni.values()))
    assert float(loss.detach()) == pytest.approx(total, rel=1e-6)


def test_defaults_are_the_public_codes_and_an_explicit_unimodal_rule_is_kept():
    assert create_method("dgl").alpha == 4.0  # main_dgl.py's CREMA-D value
    over = quick_config("dgl", epochs=1, **{"model.fusion": "gated",
                                             "model.fusion_options": {"unimodal": "zero_others"}})
    assert Trainer(over).model.fusion.unimodal == "zero_others"  # the user's choice, not the "self" default


def test_step_reports_its_losses_and_logs_the_means_over_present_samples():
    """The step returns L and L_fused; the diagnostics are CE_m over the samples where m is
    present — also when a single sample has m (logged, not skipped) — and the fused CE."""
    tr = _trainer(alpha=2.0)
    batch = _batch(tr)
    y, pres = batch["label"], {m: p.clone() for m, p in batch["present"].items()}
    pres["b"][:] = False
    pres["b"][5] = True  # one sample has b; the others a zero input (the data contract)
    batch = {**batch, "present": pres,
             "inputs": {**batch["inputs"], "b": batch["inputs"]["b"] * pres["b"].view(-1, 1).float()}}
    ref = copy.deepcopy(tr.model)
    with torch.no_grad():
        out = ref(batch["inputs"], pres)
        ce_fused = float(F.cross_entropy(out.logits, y))
        ce_a = float(F.cross_entropy(out.unimodal_logits["a"], y))
        ce_b = float(F.cross_entropy(out.unimodal_logits["b"][5:6], y[5:6]))
    tr.model.train()
    got = tr.method.training_step(batch)
    assert float(got["loss_fused"]) == pytest.approx(ce_fused, rel=1e-5)
    assert float(got["loss"]) == pytest.approx(ce_fused + 2.0 * (ce_a + ce_b), rel=1e-5)
    d = tr.method.epoch_diagnostics()
    assert d["loss_fused"] == pytest.approx(ce_fused, rel=1e-5)
    assert d["loss_a"] == pytest.approx(ce_a, rel=1e-5)
    assert d["loss_b"] == pytest.approx(ce_b, rel=1e-5)


def test_alpha_zero_leaves_the_encoders_untrained():
    tr = _trainer(alpha=0.0)
    batch = _batch(tr)
    tr.model.train()
    got = capture_step_grads(tr, batch)
    for n, p in tr.model.encoders.named_parameters():
        g = got.get(f"encoders.{n}")
        assert g is None or g.abs().max() == 0, n
    with pytest.raises(ConfigError, match="alpha"):
        create_method("dgl", alpha=-1)


@pytest.mark.parametrize("policy", ["input", "feature"])
def test_unimodal_terms_leave_out_absent_samples(policy):
    """Under either absent policy: CE_m over the samples where m is present, and the fused loss on
    the fusion's view of the batch (with ``feature``, absent samples' features zeroed)."""
    tr = _trainer(missing=0.4, alpha=1.0, policy=policy)
    batch = _batch(tr)
    y, pres = batch["label"], batch["present"]
    assert not pres["a"].all() and not pres["b"].all()
    ref = copy.deepcopy(tr.model)
    feats = ref.encode_all(batch["inputs"], pres)
    zm = frozen_unimodal_logits(ref, feats, pres)
    uni = sum(F.cross_entropy(zm[m][pres[m]], y[pres[m]]) for m in ("a", "b"))
    z = ref.fuse({m: f.detach() for m, f in feats.items()}, pres).logits
    (F.cross_entropy(z, y) + uni).backward()
    tr.model.train()
    got = capture_step_grads(tr, batch)
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_feature_policy_masks_the_unimodal_path_too():
    tr = _trainer(missing=0.5, policy="feature")
    batch = _batch(tr)
    pres = batch["present"]
    feats = tr.model.encode_all(batch["inputs"], pres)
    masked = absent_masked(tr.model, feats, pres)
    assert masked["b"][~pres["b"]].abs().max() == 0 and torch.equal(masked["a"][pres["a"]], feats["a"][pres["a"]])
    zm = frozen_unimodal_logits(tr.model, feats, pres)
    ref = tr.model.fuse(feats, pres).unimodal_logits
    for m in ("a", "b"):
        assert torch.allclose(zm[m], ref[m], atol=1e-6)


def test_three_modalities_and_a_full_run():
    tr = _trainer(mods=("a", "b", "c"))
    batch = _batch(tr)
    tr.model.train()
    tr.method.training_step(batch)
    assert {"loss_a", "loss_b", "loss_c"} <= set(tr.method.epoch_diagnostics())
    res = Trainer(quick_config("dgl", epochs=2)).fit()
    assert res["test"]["accuracy"] > 0.5 and tr.method.state_dict() == {}


def test_two_processes_with_missing_modalities_equal_one_process(monkeypatch):
    make = lambda: _trainer(missing=0.5, alpha=3.0)  # noqa: E731
    batch = _batch(make())
    assert batch["present"]["a"][0::2].sum() != batch["present"]["a"][1::2].sum()
    d1, d0 = two_ranks_vs_one(monkeypatch, make, batch)
    for k in d1:  # the diagnostics are the global batch's
        assert d0[k] == pytest.approx(d1[k], rel=1e-5), k
