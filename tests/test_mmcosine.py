"""MMCosine: cosine logits by hand (scale, normalisation of features and class rows, invariance to
their norms), the head (sum of per-modality cosine logits, no bias), a training step against a
hand-written reference, diagnostics, fusions, missing modalities and two simulated processes."""
import copy
import dataclasses
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.mmcosine import CosineHeads, cosine_logits
from mmbalance.registry import ConfigError

from helpers import capture_step_grads, quick_config, tiny_data
from simulated_ranks import two_ranks_vs_one


def test_cosine_logits_by_hand():
    h = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    z = cosine_logits(h, w, 10.0)
    s = 1 / math.sqrt(2)
    expected = [[6.0, 8.0, 10 * (0.6 + 0.8) * s], [0.0, -10.0, -10 * s]]
    assert torch.allclose(z, torch.tensor(expected), atol=1e-5)
    # invariant to the norm of each feature and of each class row; linear in the scale
    assert torch.allclose(cosine_logits(h * torch.tensor([[7.0], [0.1]]), w * torch.tensor([[3.0], [0.2], [9.0]]), 10.0),
                          z, atol=1e-5)
    assert torch.allclose(cosine_logits(h, w, 2.5), z / 4, atol=1e-6)
    # a zero feature gives zero logits; every logit lies in [-s, s]
    assert cosine_logits(torch.zeros(1, 2), w, 10.0).abs().max() == 0
    g = torch.Generator().manual_seed(0)
    big = cosine_logits(torch.randn(50, 6, generator=g) * 100, torch.randn(4, 6, generator=g), 3.0)
    assert float(big.abs().max()) <= 3.0 + 1e-5


def test_head_sums_per_modality_cosine_logits_without_bias():
    torch.manual_seed(0)
    head = CosineHeads({"a": 3, "v": 5}, num_classes=4, scale=8.0)
    assert all("bias" not in n for n, _ in head.named_parameters())
    assert head.modalities == ["a", "v"] and head.num_classes == 4  # the Fusion interface
    assert [tuple(p.shape) for p in head.parameters()] == [(4, 3), (4, 5)]
    fa, fv = torch.randn(6, 3), torch.randn(6, 5)
    z, zm = head({"a": fa, "v": fv})
    za = 8.0 * F.normalize(fa, dim=1) @ F.normalize(head.heads["a"].weight, dim=1).T
    zv = 8.0 * F.normalize(fv, dim=1) @ F.normalize(head.heads["v"].weight, dim=1).T
    assert torch.allclose(zm["a"], za, atol=1e-6) and torch.allclose(zm["v"], zv, atol=1e-6)
    assert torch.allclose(z, za + zv, atol=1e-6)
    # scaling one modality's weights (its norm) changes nothing: no modality dominates by norm
    with torch.no_grad():
        head.heads["v"].weight.mul_(25.0)
    assert torch.allclose(head({"a": fa, "v": fv})[0], z, atol=1e-5)


def _trainer(mods=("a", "b"), missing=0.0, **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("mmcosine", epochs=1, **{"train.batch_size": 24, **over})
    return Trainer(cfg, data=tiny_data(48, mods, hidden=[8], dropout=0.0, missing=missing))


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=24, shuffle=True, seed=seed)))


def test_training_step_equals_a_hand_written_reference():
    tr = _trainer(scale=5.0)
    batch = _batch(tr)
    ref = copy.deepcopy(tr.model)
    h = {m: ref.encoders[m](batch["inputs"][m]) for m in ("a", "b")}
    z = sum(5.0 * F.normalize(h[m], dim=1) @ F.normalize(ref.fusion.heads[m].weight, dim=1).T for m in ("a", "b"))
    F.cross_entropy(z, batch["label"]).backward()
    tr.model.train()
    got = capture_step_grads(tr, batch)
    assert set(got) == {n for n, p in ref.named_parameters() if p.grad is not None}
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    # the weight gradient is orthogonal to each class row (normalised weights): it never grows a norm
    for m in ("a", "b"):
        w, g = ref.fusion.heads[m].weight, got[f"fusion.heads.{m}.weight"]
        assert torch.allclose((w * g).sum(1), torch.zeros(3), atol=1e-6)


def test_step_reports_its_loss_and_diagnostics_by_hand():
    tr = _trainer()
    batch = _batch(tr)
    tr.model.train()
    w0 = {m: tr.model.fusion.heads[m].weight.detach().clone() for m in ("a", "b")}
    h = {m: tr.model.encoders[m](batch["inputs"][m]).detach() for m in ("a", "b")}
    y = batch["label"]
    z = sum(10.0 * F.normalize(h[m], dim=1) @ F.normalize(w0[m], dim=1).T for m in ("a", "b"))
    reported = tr.method.training_step(batch)
    assert float(reported["loss"]) == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-5)  # the step's CE
    d = tr.method.epoch_diagnostics()
    for m in ("a", "b"):
        cos_y = (F.normalize(h[m], dim=1) * F.normalize(w0[m], dim=1)[y]).sum(1).mean()
        assert d[f"cos_y_{m}"] == pytest.approx(float(cos_y), abs=1e-5)
        assert d[f"feature_norm_{m}"] == pytest.approx(float(h[m].norm(dim=1).mean()), rel=1e-5)
        assert d[f"weight_norm_{m}"] == pytest.approx(float(w0[m].norm(dim=1).mean()), rel=1e-5)  # before the step


def test_option_and_model_checks(caplog):
    with pytest.raises(ConfigError, match="scale"):
        create_method("mmcosine", scale=0)
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        tr = Trainer(quick_config("mmcosine", epochs=1, **{"model.fusion": "film"}))
    assert "fusion 'film' is ignored" in caplog.text
    assert isinstance(tr.model.fusion, CosineHeads)
    res = Trainer(quick_config("mmcosine", epochs=1, **{"dataset.options": {"modalities": ["pix", "fou", "zer"]}})).fit()
    assert set(res["test"]["per_modality"]) == {"pix", "fou", "zer"} and res["fusion"] == "cosine"
    assert tr.method.state_dict() == {}


def test_default_scale_and_the_fusions_that_give_the_head_silently(caplog):
    method = create_method("mmcosine")
    assert method.scale == 10.0  # main_CD.py's default
    spec = _trainer().spec
    for fusion in ("concat", "sum", "late"):
        with caplog.at_level(logging.WARNING, logger="mmbalance"):
            head = method.build_model(dataclasses.replace(spec, fusion=fusion)).fusion
        assert isinstance(head, CosineHeads) and head.scale == 10.0
        assert "ignored" not in caplog.text, fusion


def test_feature_policy_absent_modality_adds_nothing():
    tr = Trainer(quick_config("mmcosine", epochs=1, **{"model.absent_policy": "feature"}),
                 data=tiny_data(24, ("a", "b"), hidden=[8], dropout=0.0, missing=0.5))
    batch = _batch(tr)
    tr.model.eval()
    out = tr.method.predict(batch)
    absent = ~batch["present"]["b"]
    assert absent.any()
    assert out.unimodal_logits["b"][absent].abs().max() == 0
    assert torch.allclose(out.logits[absent], out.unimodal_logits["a"][absent])


def test_two_processes_with_missing_modalities_equal_one_process(monkeypatch):
    make = lambda: _trainer(missing=0.5)  # noqa: E731
    batch = _batch(make())
    assert batch["present"]["a"][0::2].sum() != batch["present"]["a"][1::2].sum()
    d1, d0 = two_ranks_vs_one(monkeypatch, make, batch)
    for k in d1:  # the diagnostics are the global batch's
        assert d0[k] == pytest.approx(d1[k], rel=1e-5), k
