"""G-Blending: weights follow the OGR formula; the estimate never reads val/test; held-out split."""
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer, to_device
from mmbalance.methods.gblending import gblending_weights, holdout_split
from mmbalance.registry import ConfigError
from helpers import tiny_data as make_tiny_data


def tiny_data(n=60, seed=0, mods=("a", "b")):
    return make_tiny_data(n, mods, n_eval=15, seed=seed, signal={"a": 1.5, "b": 0.3}, hidden=[8], dropout=0.0)


def trainer(data=None, **method_opts):
    opts = {f"method.{k}": v for k, v in method_opts.items()}
    cfg = load_config(None, {"train.epochs": 1, "method.name": "gblending", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 16, "optim.lr": 0.1, **opts})
    return Trainer(cfg, data=data or tiny_data())


class Poisoned(Dataset):
    def __len__(self):
        raise AssertionError("G-Blending read a forbidden split")

    def __getitem__(self, i):
        raise AssertionError("G-Blending read a forbidden split")


def test_weights_follow_formula_by_hand():
    # outputs: a, b, fused; losses before N and after N + n on T (train part) and V (held out)
    t0, t1 = [2.0, 2.0, 2.0], [1.0, 1.5, 0.8]
    v0, v1 = [2.0, 2.0, 2.0], [1.5, 1.6, 2.1]
    # gains 0.5, 0.4, -0.1; overfitting change (v1 - t1) - (v0 - t0) = 0.5, 0.1, 1.3
    w = gblending_weights(t0, t1, v0, v1, eps=0.0)
    raw = torch.tensor([0.5 / 0.25, 0.4 / 0.01, 0.0], dtype=torch.float64)
    torch.testing.assert_close(w, raw / raw.sum())
    wa = gblending_weights(t0, t1, v0, v1, eps=0.0, negative_gain="abs")
    raw = torch.tensor([2.0, 40.0, 0.1 / 1.69], dtype=torch.float64)
    torch.testing.assert_close(wa, raw / raw.sum())
    assert abs(float(wa.sum()) - 1) < 1e-12


def test_weights_eps_and_degenerate_cases():
    # zero overfitting change: eps keeps the weight finite
    w = gblending_weights([1.0, 1.0], [0.5, 0.5], [1.0, 1.0], [0.5, 0.4], eps=1e-2)
    raw = torch.tensor([0.5 / 1e-2, 0.6 / (0.01 + 1e-2)], dtype=torch.float64)
    torch.testing.assert_close(w, raw / raw.sum())
    # no output generalises: uniform
    w = gblending_weights([1.0, 1.0], [0.5, 0.5], [1.0, 1.0], [1.2, 1.0])
    torch.testing.assert_close(w, torch.full((2,), 0.5, dtype=torch.float64))
    with pytest.raises(ConfigError):
        gblending_weights([1.0], [1.0], [1.0], [1.0], negative_gain="clip")


def test_holdout_split_disjoint_stratified_seeded():
    labels = np.repeat(np.arange(4), 25)
    tr, ho = holdout_split(labels, 0.2, seed=3)
    assert set(tr.tolist()).isdisjoint(ho.tolist())
    assert sorted(tr.tolist() + ho.tolist()) == list(range(100))
    assert np.bincount(labels[ho.numpy()]).tolist() == [5, 5, 5, 5]
    tr2, ho2 = holdout_split(labels, 0.2, seed=3)
    assert torch.equal(ho, ho2)
    assert not torch.equal(ho, holdout_split(labels, 0.2, seed=4)[1])
    with pytest.raises(ConfigError):
        holdout_split(labels, 1.0, seed=0)


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_estimate_never_reads_val_or_test(mode):
    tr = trainer(mode=mode, estimate_epochs=1)
    tr.data.val = Poisoned()
    tr.data.test = Poisoned()
    meth = tr.method
    meth.on_epoch_start(0)  # runs the estimate
    w = meth.weights
    assert set(w) == {"a", "b", "fused"} and abs(sum(w.values()) - 1) < 1e-9
    diag = meth.epoch_diagnostics()
    assert {"gain_a", "overfit_b", "gain_fused"} <= set(diag)
    # the training part and the held-out part are disjoint; online never trains on V
    assert set(meth.train_idx.tolist()).isdisjoint(meth.holdout_idx.tolist())
    ds = meth.train_dataset(0, tr.data.train)
    if mode == "online":
        assert len(ds) == len(meth.train_idx)
        assert {int(ds[i]["index"]) for i in range(len(ds))}.isdisjoint(meth.holdout_idx.tolist())
    else:
        assert len(ds) == len(tr.data.train)
    # the main model was not changed by the estimate (copies only)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    meth.estimate_weights()
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())


def test_training_step_uses_blended_loss_and_logs_weights():
    tr = trainer()
    meth = tr.method
    meth.weights = {"a": 0.2, "b": 0.3, "fused": 0.5}
    batch = to_device(next(iter(tr.loader(tr.data.train, batch_size=16))), tr.device)
    tr.model.eval()  # no dropout anyway; compute the reference loss before the step
    with torch.no_grad():
        out = tr.model(batch["inputs"], batch["present"])
        ce = torch.nn.functional.cross_entropy
        ref = 0.2 * ce(out.unimodal_logits["a"], batch["label"]) + 0.3 * ce(out.unimodal_logits["b"], batch["label"]) \
            + 0.5 * ce(out.logits, batch["label"])
    tr.model.train()
    stats = meth.training_step(batch)
    assert abs(stats["loss"] - float(ref)) < 1e-5
    meth.on_epoch_end(0)
    assert meth.epoch_diagnostics()["w_b"] == pytest.approx(0.3)
    assert meth.state_dict()["weights"]["fused"] == 0.5


def test_fit_end_to_end_offline():
    tr = trainer(estimate_epochs=1)
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    assert res["method_options"]["mode"] == "offline"
