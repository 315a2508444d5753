"""joint and unimodal: the training step against a hand-written reference step (loss
composition, which parameters receive gradient), and unimodal's model and data selection."""
import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.registry import ConfigError
from mmbalance.utils import to_device

from helpers import capture_step_grads, quick_config, tiny_data


def _trainer(method, fusion="concat", missing=0.0, **opts):
    ov = {f"method.{k}": v for k, v in opts.items()}
    cfg = quick_config(method, epochs=1, **{"model.fusion": fusion, "model.encoder_options":
                                            {"hidden": [8, 6], "dropout": 0.0}, **ov})
    return Trainer(cfg, data=tiny_data(n=24, missing=missing, seed=2))


def _batch(tr, n=12):
    return to_device(next(iter(tr.loader(tr.data.train, batch_size=n))), tr.device)


def _reference_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion", ["concat", "sum", "late"])
def test_joint_step_is_fused_cross_entropy(fusion):
    tr = _trainer("joint", fusion)
    b = _batch(tr)
    ref = _reference_grads(tr.model, lambda: F.cross_entropy(tr.model(b["inputs"], b["present"]).logits, b["label"]))
    got = capture_step_grads(tr, b)
    assert set(got) == set(ref) == {n for n, _ in tr.model.named_parameters()}
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-7), n


def test_joint_unimodal_weight_adds_masked_unimodal_terms():
    tr = _trainer("joint", "sum", missing=0.4, unimodal_weight=0.5)
    b = _batch(tr)
    assert not b["present"]["a"].all() or not b["present"]["b"].all()

    def loss():
        out = tr.model(b["inputs"], b["present"])
        uni = sum(F.cross_entropy(out.unimodal_logits[m][b["present"][m]], b["label"][b["present"][m]])
                  for m in ("a", "b"))
        return F.cross_entropy(out.logits, b["label"]) + 0.5 * uni

    ref = _reference_grads(tr.model, loss)
    got = capture_step_grads(tr, b)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-6), n


def test_joint_step_updates_parameters_by_sgd():
    tr = _trainer("joint")
    b = _batch(tr)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    grads = capture_step_grads(tr, b)
    # first SGD step with momentum: p - lr * (g + wd * p)
    lr, wd = tr.cfg.optim.lr, tr.cfg.optim.weight_decay
    for n, p in tr.model.named_parameters():
        assert torch.allclose(p.detach(), before[n] - lr * (grads[n] + wd * before[n]), atol=1e-7), n


def test_unimodal_keeps_only_its_modality():
    tr = _trainer("unimodal", modality="b")
    assert tr.modalities == ["b"] and list(tr.model.encoders) == ["b"]
    b = _batch(tr)
    ref = _reference_grads(tr.model, lambda: F.cross_entropy(tr.model({"b": b["inputs"]["b"]},
                                                                      {"b": b["present"]["b"]}).logits, b["label"]))
    got = capture_step_grads(tr, b)
    assert set(got) == set(ref)
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=1e-7), n
    assert _trainer("unimodal").modalities == ["a"]  # default: the first modality
    with pytest.raises(ConfigError, match="unimodal: unknown modality 'z'; modalities: a, b"):
        _trainer("unimodal", modality="z")


def test_joint_option_is_typed():
    from mmbalance.methods import create_method

    with pytest.raises(ConfigError) as e:
        create_method("joint", unimodal_weight=-0.5)
    assert str(e.value) == "method 'joint' option 'unimodal_weight' takes a number >= 0, got -0.5"
    assert create_method("joint", unimodal_weight="1e-1").unimodal_weight == 0.1


def test_unimodal_modality_by_position_and_its_own_concat_head():
    tr = _trainer("unimodal", fusion="sum", modality="1")
    assert tr.modalities == ["b"] and tr.method.modality == "b"
    assert type(tr.model.fusion).__name__ == "ConcatFusion"  # its own linear head, whatever --fusion says
    with pytest.raises(ConfigError, match="unimodal: unknown modality '2'; modalities: a, b"):
        _trainer("unimodal", modality="2")
    assert "loss" in tr.method.training_step(_batch(tr))


def test_joint_step_reports_its_loss():
    tr = _trainer("joint")
    b = _batch(tr)
    with torch.no_grad():
        want = float(F.cross_entropy(tr.model(b["inputs"], b["present"]).logits, b["label"]))
    assert tr.method.training_step(b)["loss"] == pytest.approx(want, rel=1e-6)


# ---- methods/base.py helpers (found by mutation testing: docs/testing.md)

def test_a_methods_own_fusion_does_not_inherit_the_specs_fusion_options():
    import dataclasses

    from mmbalance.methods.base import build_standard_model

    tr = Trainer(quick_config("joint", epochs=1), data=tiny_data())
    spec = dataclasses.replace(tr.spec, fusion="gated", fusion_options={"condition": "b"})
    assert build_standard_model(spec).fusion.condition == "b"  # the spec's own fusion gets its options
    model = build_standard_model(spec, fusion="gated")  # a method naming its fusion starts from none
    assert model.fusion.condition != "b"
    assert build_standard_model(spec, fusion="gated", condition="b").fusion.condition == "b"


def test_in_window_defaults_to_every_epoch_for_methods_without_a_window():
    from mmbalance.methods.base import Method

    class NoWindow(Method):
        pass

    class Window(Method):
        modulation_start, modulation_end = 2, 4

    m = NoWindow.__new__(NoWindow)
    assert all(m.in_window(e) for e in (0, 1, 50))
    w = Window.__new__(Window)
    assert [w.in_window(e) for e in range(6)] == [False, False, True, True, True, False]


def test_present_ce_normalises_by_the_global_count_times_the_world_size():
    from mmbalance.methods.base import Method

    class FakeTrainer:
        world_size = 2

        def all_reduce_sum(self, t):  # the other rank holds 3 present samples
            return t + 3

    m = Method.__new__(Method)
    m.trainer = FakeTrainer()
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    present = torch.tensor([True, False, True, True])
    ce = F.cross_entropy(logits, y, reduction="none")
    expected = (ce * present).sum() * 2 / (3 + 3)
    assert torch.allclose(m.present_ce(logits, y, present), expected)
