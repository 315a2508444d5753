"""DOMFN: penalties, the fusion gate and the selection by hand, the heads, a training step against
the public code's per-instance steps written out (fused instances: every network; the others:
each modality's own network from its amended loss), pre-training epochs, the sigmoid outputs and
the mean reference, prediction, missing modalities and two simulated processes."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.domfn import DOMFNHeads, domfn_fuse_mask, domfn_penalties, domfn_predictions, domfn_select
from mmbalance.registry import ConfigError

from helpers import capture_step_grads, quick_config, tiny_data
from simulated_ranks import run_two_ranks, shard_batch


# ----------------------------------------------------------------------------- pure math
def test_penalties_gate_and_selection_by_hand():
    pm = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.3, 0.7]]])  # (M=2, B=2, C=2)
    ref = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    pen = domfn_penalties(pm, ref)
    assert torch.allclose(pen, torch.tensor([[0.09, 0.0], [0.01, 0.01]]), atol=1e-7)
    # tau 0.2, gamma 0.4: scaled penalties [[0.45, 0], [0.05, 0.05]] -> sample 0 not fused, 1 fused
    fuse = domfn_fuse_mask(pen, 0.2, 0.4)
    assert fuse.tolist() == [False, True]
    # an absent modality takes no part in the gate
    assert domfn_fuse_mask(pen, 0.2, 0.4, torch.tensor([[False, True], [True, True]])).tolist() == [True, True]
    # the strict inequality: a scaled penalty equal to gamma does not fuse
    assert domfn_fuse_mask(torch.tensor([[0.25]]), 0.5, 0.5).tolist() == [False]
    assert domfn_fuse_mask(torch.tensor([[0.2499]]), 0.5, 0.5).tolist() == [True]
    z = torch.tensor([[10.0, 11.0], [12.0, 13.0]])
    zm = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    conf = pm.amax(-1)  # [[0.9, 0.8], [0.5, 0.7]]
    assert domfn_select(z, zm, conf, fuse).tolist() == [[1.0, 2.0], [12.0, 13.0]]
    # modality 0 absent in sample 0: the other one is chosen
    pres = torch.tensor([[False, True], [True, True]])
    assert domfn_select(z, zm, conf, torch.tensor([False, False]), pres).tolist() == [[5.0, 6.0], [3.0, 4.0]]
    # ties: the first modality
    assert domfn_select(z, zm, torch.ones(2, 2), torch.tensor([False, False])).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_predictions_softmax_or_sigmoid():
    z = torch.tensor([[0.0, 2.0]])
    assert torch.allclose(domfn_predictions(z), F.softmax(z, 1))
    assert torch.allclose(domfn_predictions(z, sigmoid_outputs=True), torch.sigmoid(z))


def test_heads():
    torch.manual_seed(0)
    head = DOMFNHeads({"a": 3, "v": 5}, 4, hidden=7)
    fa, fv = torch.randn(2, 3), torch.randn(2, 5)
    z, zm = head({"a": fa, "v": fv})
    assert torch.allclose(zm["a"], head.heads["a"](fa)) and torch.allclose(zm["v"], head.heads["v"](fv))
    assert torch.allclose(z, head.fusion_net(torch.cat([fa, fv], 1)))
    assert head.fusion_net[0].out_features == 7
    assert isinstance(DOMFNHeads({"a": 3, "v": 5}, 4, hidden=0).fusion_net, torch.nn.Linear)


# ----------------------------------------------------------------------------- the method
def _trainer(missing=0.0, mods=("a", "b"), **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("domfn", epochs=1, **{"train.batch_size": 24, **over})
    return Trainer(cfg, data=tiny_data(48, mods, hidden=[8], dropout=0.0, missing=missing))


def _losses(tr, batch):
    """``method.losses`` with its diagnostics read back as numbers: a per-modality entry is a
    device pair (value, weight), weight 0 when the modality is absent from the global batch."""
    loss, diag = tr.method.losses(batch)
    out = {}
    for k, v in diag.items():
        if isinstance(v, tuple):
            if bool(v[1]):
                out[k] = float(v[0])
        else:
            out[k] = float(v)
    return loss, out


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=24, shuffle=True, seed=seed)))


def _half_fused(tr, batch):
    """Set tau so that half of the batch is fused (worst penalty below a threshold halfway
    between the two middle values)."""
    with torch.no_grad():
        out = tr.model(batch["inputs"])
        pm = torch.stack([domfn_predictions(out.unimodal_logits[m], tr.method.sigmoid_outputs) for m in ("a", "b")])
        if tr.method.reference == "fused":
            ref = domfn_predictions(out.logits, tr.method.sigmoid_outputs)
        else:
            ref = pm.mean(0)
        worst = domfn_penalties(pm, ref).amax(0)
    v = worst.sort().values
    k = len(v) // 2
    thr = float(v[k - 1] + v[k]) / 2
    tr.method.tau = thr / tr.method.gamma
    return worst < thr


def _per_instance_reference(model, batch, method, fused):
    """The public code's instance-specific training written out, one sample at a time, the
    gradients averaged over the batch: a fused instance steps every network on
    ``sum_m (0.5 CE_m^2 - eta pi_m) + sum_m CE_m + CE_f``; another steps modality m's network
    on ``0.5 CE_m^2 - eta pi_m`` (the reference prediction a constant)."""
    ref_model = copy.deepcopy(model)
    B = len(batch["label"])
    act = (lambda z: torch.sigmoid(z)) if method.sigmoid_outputs else (lambda z: z)
    for b in range(B):
        x = {m: batch["inputs"][m][b:b + 1] for m in ("a", "b")}
        y = batch["label"][b:b + 1]
        out = ref_model(x)
        pm = {m: domfn_predictions(out.unimodal_logits[m], method.sigmoid_outputs) for m in ("a", "b")}
        if method.reference == "fused":
            r = domfn_predictions(out.logits, method.sigmoid_outputs)
        else:
            r = 0.5 * (pm["a"] + pm["b"])
        if not bool(fused[b]):
            r = r.detach()
        loss = 0
        for m in ("a", "b"):
            ce = F.cross_entropy(act(out.unimodal_logits[m]), y)
            pen = ((pm[m] - r) ** 2).max()
            loss = loss + 0.5 * ce * ce - method.eta * pen
            if bool(fused[b]):
                loss = loss + ce
        if bool(fused[b]):
            loss = loss + F.cross_entropy(act(out.logits), y)
        (loss / B).backward()
    return {n: p.grad for n, p in ref_model.named_parameters()}


@pytest.mark.parametrize("reference,sigmoid", [("fused", False), ("mean", False), ("fused", True)])
def test_training_step_equals_the_per_instance_steps(reference, sigmoid):
    tr = _trainer(eta=0.7, reference=reference, sigmoid_outputs=sigmoid)
    batch = _batch(tr)
    fused = _half_fused(tr, batch)
    assert 0 < int(fused.sum()) < len(fused)
    expected = _per_instance_reference(tr.model, batch, tr.method, fused)
    tr.model.train()
    got = capture_step_grads(tr, batch)
    for n, g in expected.items():
        assert torch.allclose(got[n], g, atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert d["fused_fraction"] == pytest.approx(float(fused.float().mean()))


def test_instances_that_are_not_fused_train_only_their_own_networks():
    tr = _trainer(tau=1e-9)  # nothing is fused
    batch = _batch(tr)
    loss, d = _losses(tr, batch)
    assert d["fused_fraction"] == 0.0
    model = tr.model
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.fusion.fusion_net.parameters())
    # modality a's terms reach only encoder a and head a
    tr2 = _trainer(tau=1e-9)
    tr2.model.load_state_dict(model.state_dict())
    out = tr2.model(batch["inputs"])
    with torch.no_grad():
        r = domfn_predictions(out.logits)
    ce = F.cross_entropy(out.unimodal_logits["a"], batch["label"], reduction="none")
    pen = ((domfn_predictions(out.unimodal_logits["a"]) - r) ** 2).amax(1)
    (0.5 * ce * ce - 0.5 * pen).mean().backward()
    for n, p in tr2.model.named_parameters():
        if n.startswith(("encoders.a.", "fusion.heads.a.")):
            assert torch.allclose(model.get_parameter(n).grad, p.grad, atol=1e-6), n


def test_pretraining_epochs_train_the_unimodal_networks_only():
    tr = _trainer(pretrain_epochs=2)
    batch = _batch(tr)
    y = batch["label"]
    for epoch, pre in ((0, True), (1, True), (2, False)):
        tr.epoch = epoch
        ref = copy.deepcopy(tr.model)
        out = ref(batch["inputs"])
        if pre:
            (F.cross_entropy(out.unimodal_logits["a"], y) + F.cross_entropy(out.unimodal_logits["b"], y)).backward()
        tr.model.train()
        got = capture_step_grads(tr, batch)
        d = tr.method.epoch_diagnostics()
        assert d["pretraining"] == float(pre)
        if pre:
            assert d["fused_fraction"] == 0.0
            for n, p in ref.named_parameters():
                if n.startswith("fusion.fusion_net"):
                    assert n not in got or got[n].abs().max() == 0, n
                else:
                    assert torch.allclose(got[n], p.grad, atol=1e-6), n
        else:
            assert any(n.startswith("fusion.fusion_net") and g.abs().max() > 0 for n, g in got.items())


def test_sigmoid_outputs_enter_the_cross_entropy_as_logits():
    tr = _trainer(sigmoid_outputs=True, tau=1e-9, eta=0.0)  # nothing fused: L = sum_m 0.5 CE(sigmoid(z_m))^2
    batch = _batch(tr)
    out = tr.model(batch["inputs"])
    want = sum((0.5 * F.cross_entropy(torch.sigmoid(out.unimodal_logits[m]), batch["label"], reduction="none") ** 2).mean()
               for m in ("a", "b"))
    loss, _ = tr.method.losses(batch)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def test_predict_fuses_or_trusts_the_most_confident_modality():
    tr = _trainer()
    batch = _batch(tr)
    fused = _half_fused(tr, batch)
    tr.model.eval()
    with torch.no_grad():
        out = tr.model(batch["inputs"])
        pred = tr.method.predict(batch)
    conf = torch.stack([F.softmax(out.unimodal_logits[m], 1).amax(1) for m in ("a", "b")])
    best = conf.argmax(0)
    for b in range(len(fused)):
        want = out.logits[b] if fused[b] else out.unimodal_logits["ab"[int(best[b])]][b]
        assert torch.allclose(pred.logits[b], want), b
    assert torch.equal(pred.unimodal_logits["a"], out.unimodal_logits["a"])


def test_option_and_model_checks(caplog):
    with pytest.raises(ConfigError, match="tau"):
        create_method("domfn", tau=0)
    with pytest.raises(ConfigError, match="reference"):
        create_method("domfn", reference="median")
    with pytest.raises(ConfigError, match="needs at least two"):
        Trainer(quick_config("domfn", epochs=1, **{"dataset.options": {"modalities": ["pix"]}}))
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        tr = Trainer(quick_config("domfn", epochs=1, **{"model.fusion": "sum"}))
    assert "fusion 'sum' is ignored" in caplog.text and isinstance(tr.model.fusion, DOMFNHeads)
    res = Trainer(quick_config("domfn", epochs=1, **{"dataset.options": {"modalities": ["pix", "fou", "zer"]}})).fit()
    assert res["fusion"] == "domfn" and tr.method.state_dict() == {}


def test_missing_modalities_leave_their_terms_gate_and_selection():
    tr = _trainer(missing=0.5)
    batch = _batch(tr)
    pres = batch["present"]
    assert not pres["a"].all()
    loss, d = _losses(tr, batch)
    out = tr.model(batch["inputs"], pres)
    y = batch["label"]
    ce = {m: F.cross_entropy(out.unimodal_logits[m], y, reduction="none") for m in ("a", "b")}
    assert d["loss_a"] == pytest.approx(float(ce["a"][pres["a"]].mean().detach()), rel=1e-5)
    # a label change on a sample without modality a leaves a's statistics unchanged
    i = int(torch.nonzero(~pres["a"])[0])
    batch2 = {**batch, "label": batch["label"].clone()}
    batch2["label"][i] = (batch2["label"][i] + 1) % 3
    _, d2 = _losses(tr, batch2)
    assert d2["loss_a"] == pytest.approx(d["loss_a"], rel=1e-6) and d2["penalty_a"] == pytest.approx(d["penalty_a"])
    tr.model.eval()
    with torch.no_grad():
        pred = tr.method.predict(batch)
    alone = pres["b"] & ~pres["a"]  # only b: fused or b's own logits, never a's
    for b in torch.nonzero(alone).flatten().tolist():
        assert torch.equal(pred.logits[b], out.logits[b].detach()) or torch.equal(pred.logits[b], out.unimodal_logits["b"][b].detach())


def test_two_processes_with_missing_modalities_equal_one_process(monkeypatch):
    def make():
        tr = _trainer(missing=0.4, eta=0.6)
        tr.method.tau = 0.05
        return tr

    single = make()
    batch = _batch(single)
    assert batch["present"]["a"][0::2].sum() != batch["present"]["a"][1::2].sum()
    single.model.train()
    expected = capture_step_grads(single, batch)
    d1 = single.method.epoch_diagnostics()
    assert 0 < d1["fused_fraction"] < 1

    def body(tr, r):
        tr.model.train()
        return capture_step_grads(tr, shard_batch(batch, r)), tr.method.epoch_diagnostics()

    (g0, d0), (g1, _) = run_two_ranks(monkeypatch, make, body)
    for n in expected:
        assert torch.allclose(g0[n], expected[n], atol=1e-6), n
        assert torch.equal(g0[n], g1[n]), n
    for k in d1:
        assert d0[k] == pytest.approx(d1[k], rel=1e-5), k


def test_a_modality_absent_from_the_whole_batch_leaves_its_diagnostics_out():
    """Per-modality diagnostics are logged on the device with weight 0 when the modality has no
    sample in the global batch: the epoch mean is over the steps where it had some."""
    import math

    tr = _trainer(missing=0.3)
    batch = _batch(tr)
    tr.model.train()
    only_a = {**batch, "present": {"a": torch.ones_like(batch["present"]["a"]),
                                   "b": torch.zeros_like(batch["present"]["b"])}}
    tr.method.training_step(only_a)
    d = tr.method.epoch_diagnostics()
    assert "loss_b" not in d and "penalty_b" not in d and math.isfinite(d["loss_a"])
    _, want = _losses(tr, batch)  # the same model state as the step below sees
    tr.method.training_step(batch)
    tr.method.training_step(only_a)
    d = tr.method.epoch_diagnostics()
    assert d["loss_b"] == pytest.approx(want["loss_b"], rel=1e-6)  # the one step that had b


# ----------------------------------------------------------------------------- corners (mutation testing)
def _head(batch, n):
    return {k: ({m: t[:n] for m, t in v.items()} if isinstance(v, dict) else v[:n]) for k, v in batch.items()}


def test_diagnostics_by_hand_on_small_batches():
    """All samples fused (a huge tau): ``fused_fraction`` 1, ``loss_fused`` the mean CE of z,
    ``penalty_b`` / ``loss_b`` over the one sample where b is present (counted: weight > 0); a
    batch of one sample still has ``fused_fraction`` 1."""
    tr = _trainer(tau=1e6)
    batch = _head(_batch(tr), 3)
    batch["present"] = {"a": torch.ones(3, dtype=torch.bool), "b": torch.tensor([False, True, False])}
    tr.model.train()
    with torch.no_grad():
        out = tr.model(batch["inputs"], batch["present"])
    y = batch["label"]
    ce_f = F.cross_entropy(out.logits, y, reduction="none")
    pb = F.softmax(out.unimodal_logits["b"][1], -1)
    pf = F.softmax(out.logits[1], -1)
    _, d = _losses(tr, batch)
    assert d["fused_fraction"] == 1.0
    assert d["loss_fused"] == pytest.approx(float(ce_f.mean()), rel=1e-5)
    assert d["penalty_b"] == pytest.approx(float((pb - pf).pow(2).max()), rel=1e-5)
    assert d["loss_b"] == pytest.approx(float(F.cross_entropy(out.unimodal_logits["b"][1:2], y[1:2])), rel=1e-5)
    _, d1 = _losses(tr, _head(batch, 1))
    assert d1["fused_fraction"] == 1.0


def test_losses_stay_on_the_batchs_device():
    """Every count and sum of the step is made on the batch's device (here ``meta``, as a CUDA
    batch would be), so no CPU tensor is mixed in."""
    tr = _trainer()
    batch = _batch(tr)
    tr.model.to("meta")

    def mv(v):
        return {k: mv(x) for k, x in v.items()} if isinstance(v, dict) else v.to("meta")

    loss, diag = tr.method.losses(mv(batch))
    assert loss.device.type == "meta" and diag["loss_fused"].device.type == "meta"


def test_no_fusion_warning_with_the_default_concat(caplog):
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        Trainer(quick_config("domfn", epochs=1))
    assert "is ignored" not in caplog.text
