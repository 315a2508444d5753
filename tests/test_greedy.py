"""Greedy: MMTM shapes and running means, the re-balancing controller by hand, two modalities only."""
import math

import pytest
import torch

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer, to_device
from mmbalance.methods.greedy import MMTM, Greedy, GreedyModel, bdr, greedy_controller, initial_controller_state
from mmbalance.models import create_encoder
from mmbalance.registry import ConfigError
from helpers import tiny_data as make_tiny_data


def tiny_data(n=32, mods=("a", "b")):
    return make_tiny_data(n, mods, n_eval=9, hidden=[8, 6], dropout=0.0)


def make(data=None, **opts):
    o = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 1, "method.name": "greedy", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 8, **o})
    return Trainer(cfg, data=data or tiny_data())


def test_mmtm_shapes_excitation_and_running_means():
    torch.manual_seed(0)
    block = MMTM(8, 6, reduction=4)
    assert block.fc_squeeze.out_features == int(2 * 14 / 4)
    s_a, s_b = torch.randn(4, 8), torch.randn(4, 6)
    e_a, e_b = block(s_a, s_b)
    assert e_a.shape == (4, 8) and e_b.shape == (4, 6)
    assert ((e_a > 0) & (e_a < 2)).all()  # 2 * sigmoid
    # each running mean comes from its own modality (the official code fed modality 0's into both)
    torch.testing.assert_close(block.running_0, e_a.detach().mean(0))
    torch.testing.assert_close(block.running_1, e_b.detach().mean(0))
    e_a2, e_b2 = block(2 * s_a, s_b)
    torch.testing.assert_close(block.running_0, (e_a.mean(0) + e_a2.mean(0)).detach() / 2)
    # caring = 1: modality 1's excitation is its (detached) running mean, modality 0's is live
    e_a3, e_b3 = block(s_a, s_b, caring=1)
    assert torch.equal(e_b3, block.running_1.expand(4, 6)) and not e_b3.requires_grad
    assert e_a3.requires_grad
    block.eval()
    steps = int(block.steps)
    block(s_a, s_b)
    assert int(block.steps) == steps  # evaluation passes leave the running means alone
    plain = MMTM(8, 6, excitation="sigmoid")
    assert (plain(s_a, s_b)[0] < 1).all()


def test_greedy_model_resnet_shapes():
    torch.manual_seed(0)
    shapes = {"audio": (1, 32, 32), "visual": (3, 2, 32, 32)}
    encs = {"audio": create_encoder("resnet18_audio", shapes["audio"], width=4),
            "visual": create_encoder("resnet18_visual", shapes["visual"], width=4)}
    model = GreedyModel(encs, 5, shapes)
    assert list(model.mmtm) == ["layer2", "layer3", "layer4"]
    assert model.mmtm["layer3"].fc_excite[0].out_features == 16 and model.mmtm["layer4"].fc_excite[1].out_features == 32
    x = {m: torch.randn(3, *s) for m, s in shapes.items()}
    out = model(x)
    assert out.logits.shape == (3, 5) and out.features["visual"].shape == (3, 32)
    torch.testing.assert_close(out.logits, (out.unimodal_logits["audio"] + out.unimodal_logits["visual"]) / 2)
    out.logits.sum().backward()
    assert model.mmtm["layer2"].fc_squeeze.weight.grad is not None
    model.eval()
    assert model.encode("visual", x["visual"]).shape == (3, 32)
    with pytest.raises(ConfigError):
        GreedyModel(encs, 5, shapes, mmtm_stages=["layer9"])


def test_controller_by_hand():
    st = initial_controller_state()
    # speeds [bypass_0, bypass_1, main_0, main_1]: BDR_0 = log10(1e-3/1e-2) = -1, BDR_1 = log10(1e-3/1e-1) = -2
    speeds = [1e-3, 1e-3, 1e-2, 1e-1]
    locked = greedy_controller(st, speeds, unlocked=False, epsilon=0.01, window=3)
    assert not locked["curating"] and locked["d"] == pytest.approx(1.0) and locked["acc"] == speeds
    assert st["acc"] == [0.0] * 4  # pure: input untouched
    s = greedy_controller(st, speeds, unlocked=True, epsilon=0.01, window=3)
    assert s["curating"] and s["caring"] == 0 and s["step"] == 0  # d > 0: care for modality 0
    for k in range(3):  # three curated steps: nothing accumulated, then back to normal
        assert s["curating"]
        s = greedy_controller(s, None, unlocked=True, epsilon=0.01, window=3)
    assert not s["curating"] and s["acc"] == speeds
    # d < 0 cares for modality 1; |d| <= epsilon leaves training alone
    s = greedy_controller(initial_controller_state(), [1e-3, 1e-3, 1e-1, 1e-2], True, 0.01, 3)
    assert s["caring"] == 1 and s["d"] == pytest.approx(-1.0)
    s = greedy_controller(initial_controller_state(), [1e-3, 1.01e-3, 1e-2, 1e-2], True, 0.01, 3)
    assert not s["curating"] and abs(s["d"]) == pytest.approx(abs(math.log10(1 / 1.01)))
    assert bdr(1e-3, 1e-2) == pytest.approx(-1.0)


def test_two_modalities_only():
    with pytest.raises(ConfigError, match="two modalities"):
        Greedy().modalities(["a", "b", "c"])
    with pytest.raises(ConfigError, match="two modalities"):
        make(data=tiny_data(mods=("a", "b", "c")))


def test_training_step_mlp_and_curation():
    tr = make(start_epoch=0, epsilon=0.0, window=2)
    m = tr.method
    assert list(tr.model.mmtm) == ["hidden1", "hidden2"]
    loader = tr.loader(tr.data.train, shuffle=True, batch_size=8)
    tr.model.train()
    for batch in loader:
        m.training_step(to_device(batch, tr.device))
    diag = m.epoch_diagnostics()
    # epsilon 0: decide, curate 2 steps, decide, ... -> 2 of the 4 steps curated
    assert diag["rebalance_frac"] == pytest.approx(0.5)
    assert diag["caring_a"] + diag["caring_b"] == pytest.approx(0.5)
    assert {"bdr_a", "bdr_b", "bdr_diff"} <= set(diag)
    assert tr.model.curation is None
    st = m.state_dict()
    m.controller = initial_controller_state()
    m.load_state_dict(st)
    assert m.controller["acc"] == st["controller"]["acc"]
