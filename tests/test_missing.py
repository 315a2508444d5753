"""The missing-modality protocol: masks by rate, never all absent, the same for every method and
training seed; every method trains and evaluates under it; rate 0 equals a normal run."""
import numpy as np
import pytest
import torch

from mmbalance.data import build_dataset
from mmbalance.data.missing import apply_missing, missing_masks
from mmbalance.engine import Trainer
from mmbalance.methods import list_methods
from mmbalance.registry import ConfigError

from helpers import quick_config


def test_masks_rates_and_never_all_absent():
    m = missing_masks(20000, ["a", "b", "c"], {"a": 0.5, "b": 0.2, "c": 0.0}, seed=3)
    stack = np.stack([m["a"], m["b"], m["c"]])
    assert stack.any(0).all() and m["c"].all()
    assert abs((~m["a"]).mean() - 0.5) < 0.02 and abs((~m["b"]).mean() - 0.2) < 0.02
    two = missing_masks(20000, ["a", "b"], {"a": 0.7, "b": 0.7}, seed=1)
    assert (two["a"] | two["b"]).all()
    # a sample that would lose both keeps one drawn uniformly: 0.49 of samples, half to each
    assert abs((two["a"] & ~two["b"]).mean() - (0.3 * 0.7 + 0.49 / 2)) < 0.02
    assert all((missing_masks(50, ["a", "b"], {"a": .5, "b": .5}, 4)[k] ==
                missing_masks(50, ["a", "b"], {"a": .5, "b": .5}, 4)[k]).all() for k in "ab")


def test_apply_missing_zeroes_inputs_in_every_split_by_fixed_masks():
    data = build_dataset("uci_mfeat")
    md = apply_missing(data, 0.4, seed=2)
    for split in ("train", "val", "test"):
        ds = getattr(md, split)
        absent = [i for i in range(40) if not bool(ds[i]["present"]["fou"])]
        assert absent, split
        i = absent[0]
        assert torch.count_nonzero(ds[i]["inputs"]["fou"]) == 0
        assert torch.equal(ds[i]["inputs"]["pix"], getattr(data, split)[i]["inputs"]["pix"]) or \
            not bool(ds[i]["present"]["pix"])
    assert md.train_eval is md.train
    assert [bool(md.val[i]["present"]["fou"]) for i in range(30)] != \
        [bool(md.test[i]["present"]["fou"]) for i in range(30)]  # splits get their own masks
    assert apply_missing(data, 0.0) is data
    with pytest.raises(ConfigError, match="names unknown modality zer"):
        apply_missing(data, {"zer": 0.5})
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        apply_missing(data, {"fou": 1.0})


def test_rate_zero_equals_a_normal_run():
    a = Trainer(quick_config("joint", epochs=2)).fit()
    b = Trainer(quick_config("joint", epochs=2, **{"dataset.missing_rate": 0.0})).fit()
    assert a["test"] == b["test"]


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_and_evaluates_at_half_missing(method):
    ov = {"dataset.missing_rate": 0.5, "model.encoder_options": {"hidden": [32], "dropout": 0.0}}
    if method in ("arl", "sample_valuation", "modality_valuation"):
        ov["method.warmup_epochs"] = 1
    ov.update({"opm": {"method.modulation_start": 0}, "dr": {"method.interval": 1}}.get(method, {}))
    tr = Trainer(quick_config(method, epochs=2, **ov))
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0 and np.isfinite(res["test"]["loss"])
    assert res["test"]["accuracy"] > 0.15  # better than chance (0.1) even with half the inputs gone
    assert tr.data.info["missing_rate"] == {"pix": 0.5, "fou": 0.5}
    assert 0.25 < 1 - float(torch.stack([tr.data.test[i]["present"]["fou"] for i in range(400)]).float().mean()) < 0.5
