"""MSLR: rate rules by hand; only the targeted modality's updates change."""
import pytest
import torch

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer, to_device
from mmbalance.methods.mslr import mslr_dynamic_ratio, mslr_smooth_multiplier, parse_rates
from mmbalance.registry import ConfigError
from helpers import tiny_data as make_tiny_data


def tiny_data(n=48, mods=("a", "b")):
    return make_tiny_data(n, mods, hidden=[8], dropout=0.0)


def make(method, fusion="sum", **opts):
    o = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 3, "method.name": method, "train.progress": "off", "train.probe": False,
                             "model.fusion": fusion, "optim.name": "sgd", "optim.momentum": 0.9,
                             "optim.weight_decay": 1e-3, **o})
    return Trainer(cfg, data=tiny_data())


def test_dynamic_ratio_by_hand():
    assert mslr_dynamic_ratio([0.5, 0.6, 0.7, 0.8, 0.9], window=5) == 1.0  # no 5 earlier epochs yet
    assert mslr_dynamic_ratio([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], window=5) == pytest.approx(1.0 / 0.7)
    assert mslr_dynamic_ratio([0.1, 0.4, 0.6, 0.9], window=2) == pytest.approx(0.9 / 0.5)
    assert mslr_dynamic_ratio([], window=1) == 1.0


def test_smooth_and_parse_rates():
    assert mslr_smooth_multiplier(0.5, 0, 5) == 0.5
    assert mslr_smooth_multiplier(0.5, 2, 5) == pytest.approx(0.75)
    assert mslr_smooth_multiplier(0.5, 4, 5) == pytest.approx(1.0)
    assert parse_rates(None, ["a", "b"]) == {"a": 1.0, "b": 1.0}
    assert parse_rates({"b": 1.1}, ["a", "b"]) == {"a": 1.0, "b": 1.1}
    assert parse_rates([0.9, 1.1], ["a", "b"]) == {"a": 0.9, "b": 1.1}
    for bad in ({"c": 1.0}, [1.0], [1.0, -1.0], "x"):
        with pytest.raises(ConfigError):
            parse_rates(bad, ["a", "b"])


def _one_step(tr):
    batch = to_device(next(iter(tr.loader(tr.data.train, batch_size=16))), tr.device)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.method.on_epoch_start(0)
    tr.model.train()
    tr.method.training_step(batch)
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters()}
    deltas = {n: p.detach() - before[n] for n, p in tr.model.named_parameters()}
    return grads, deltas


@pytest.mark.parametrize("apply,fusion", [("grad", "sum"), ("update", "sum"), ("grad", "concat")])
def test_only_targeted_modality_changes(apply, fusion):
    g_ref, d_ref = _one_step(make("joint", fusion))
    g, d = _one_step(make("mslr", fusion, rates={"a": 0.5}, apply=apply))
    # sum: modality a owns its encoder and its head; concat: only its encoder (the head is shared)
    owned_a = lambda n: n.startswith("encoders.a.") or n.startswith("fusion.heads.a.")
    assert any(owned_a(n) for n in g) and any(n.startswith("fusion.") and not owned_a(n) for n in g)
    for n in g_ref:
        if owned_a(n):
            if apply == "grad":
                assert torch.equal(g[n], 0.5 * g_ref[n]), n
            else:  # the update is halved exactly (weight decay and momentum included)
                assert torch.equal(g[n], g_ref[n]), n
                torch.testing.assert_close(d[n], 0.5 * d_ref[n], rtol=1e-5, atol=1e-7)
        else:  # the other modality and the shared parts: bit-identical to joint training
            assert torch.equal(g[n], g_ref[n]), n
            assert torch.equal(d[n], d_ref[n]), n


def test_dynamic_strategy_uses_val_history():
    tr = make("mslr", strategy="dynamic", window=1, rates=[2.0, 1.0])
    m = tr.method
    m.on_epoch_start(0)
    assert m.multipliers == {"a": 2.0, "b": 1.0}
    m.val_acc = {"a": [0.5, 0.75], "b": [0.4, 0.2]}
    m.on_epoch_start(2)
    assert m.multipliers["a"] == pytest.approx(2.0 * 1.5) and m.multipliers["b"] == pytest.approx(0.5)
    m.on_epoch_end(2)  # appends this epoch's validation accuracies
    assert len(m.val_acc["a"]) == 3 and 0.0 <= m.val_acc["a"][-1] <= 1.0
    diag = m.epoch_diagnostics()
    assert "val_acc_a" in diag
    st = m.state_dict()
    m.val_acc = {}
    m.load_state_dict(st)
    assert m.val_acc["b"][:2] == [0.4, 0.2]
