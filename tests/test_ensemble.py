"""ensemble (UME): the combination rule by hand (present modalities only), the training step
against a hand-written reference, members trained exactly as each alone, two simulated ranks,
prediction through the engine, members loaded from unimodal runs (fixed, evaluation only)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.api import load_run
from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.methods.ensemble import ensemble_logits
from mmbalance.registry import ConfigError

from helpers import tiny_data
from test_unimodal_pretrain import capture, first_batch, two_ranks, _unimodal_run


def make(epochs=2, data=None, fusion="concat", **opts):
    cfg = load_config(None, {"train.epochs": epochs, "method.name": "ensemble", "train.progress": "off",
                             "train.probe": False, "model.fusion": fusion, "train.batch_size": 16,
                             "optim.name": "sgd", "optim.momentum": 0.9, "optim.weight_decay": 1e-3,
                             "optim.lr": 0.05, **{f"method.{k}": v for k, v in opts.items()}})
    return Trainer(cfg, data=data if data is not None else tiny_data(48, hidden=[8], dropout=0.0))


def _softmax(xs):
    e = [math.exp(x - max(xs)) for x in xs]
    return [v / sum(e) for v in e]


def test_combination_by_hand_over_present_modalities():
    z = {"a": torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]),
         "b": torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]),
         "c": torch.tensor([[-2.0, 0.0, 2.0], [0.5, 0.0, 0.0]])}
    pres = {"a": torch.tensor([True, False]), "b": torch.tensor([True, True]), "c": torch.tensor([False, True])}
    got = ensemble_logits(z, pres).softmax(1)
    want0 = [(x + y) / 2 for x, y in zip(_softmax([1, 0, -1]), _softmax([0, 3, 0]))]
    want1 = [(x + y) / 2 for x, y in zip(_softmax([1, 1, 1]), _softmax([0.5, 0, 0]))]
    assert got.tolist() == [pytest.approx(want0, abs=1e-6), pytest.approx(want1, abs=1e-6)]
    logits = ensemble_logits(z, pres, "logits")
    assert logits.tolist() == [pytest.approx([0.5, 1.5, -0.5]), pytest.approx([0.75, 0.5, 0.5])]
    everyone = ensemble_logits(z).softmax(1)[0].tolist()
    assert everyone == pytest.approx([sum(v) / 3 for v in zip(_softmax([1, 0, -1]), _softmax([0, 3, 0]),
                                                              _softmax([-2, 0, 2]))], abs=1e-6)
    none = {m: torch.tensor([False, True]) for m in z}
    assert ensemble_logits(z, none).softmax(1)[0].tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ConfigError, match="unknown combine"):
        ensemble_logits(z, pres, "median")


def test_one_present_member_alone_and_every_row_a_log_probability():
    """A sample with one modality present is predicted by that member alone; a sample with none
    gets the uniform distribution; every row is a normalised log-probability (its exp sums to 1),
    whatever the batch size and number of members."""
    z = {"a": torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.2, 0.1, 0.0]]),
         "b": torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.5]]),
         "c": torch.tensor([[-2.0, 0.0, 2.0], [0.5, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.3, 0.0]])}
    pres = {"a": torch.tensor([True, False, False, False]), "b": torch.tensor([False, True, False, False]),
            "c": torch.tensor([False, True, False, True])}
    got = ensemble_logits(z, pres)
    assert got[0].softmax(0).tolist() == pytest.approx(_softmax([1, 0, -1]), abs=1e-6)  # a alone
    assert got[3].softmax(0).tolist() == pytest.approx(_softmax([0, 0.3, 0]), abs=1e-6)  # c alone
    want1 = [(x + y) / 2 for x, y in zip(_softmax([1, 1, 1]), _softmax([0.5, 0, 0]))]
    assert got[1].exp().tolist() == pytest.approx(want1, abs=1e-6)
    assert got[2].tolist() == pytest.approx([math.log(1 / 3)] * 3)  # nothing present: uniform
    assert got.exp().sum(1).tolist() == pytest.approx([1.0] * 4)
    two = {m: v[:2] for m, v in z.items()}  # a batch smaller than the number of members
    none_first = {"a": torch.tensor([False, True]), "b": torch.tensor([False, True]), "c": torch.tensor([False, False])}
    got = ensemble_logits(two, none_first)
    assert got[0].tolist() == pytest.approx([math.log(1 / 3)] * 3) and got.exp().sum(1).tolist() == pytest.approx([1, 1])


def test_prediction_stays_on_the_members_device():
    """The weights are made on the logits' device (the meta device stands for a GPU here)."""
    z = {m: torch.empty(4, 3, device="meta") for m in ("a", "b")}
    assert ensemble_logits(z, None, "logits").device.type == "meta"
    pres = {m: torch.ones(4, dtype=torch.bool, device="meta") for m in ("a", "b")}
    assert ensemble_logits(z, pres, "logits").device.type == "meta"


def test_step_is_the_sum_of_member_losses_over_present_samples():
    tr = make(data=tiny_data(48, hidden=[8], dropout=0.0, missing=0.4))
    batch = first_batch(tr)
    model = tr.model
    assert set(dict(model.named_children())) == {"encoders", "fusion"} and set(model.fusion.heads) == {"a", "b"}
    ref = {}
    for m in ("a", "b"):
        model.zero_grad(set_to_none=True)
        p = batch["present"][m]
        z = model.fusion.heads[m](model.encoders[m](batch["inputs"][m] * p.view(-1, 1).float()))
        F.cross_entropy(z[p], batch["label"][p]).backward()
        ref.update({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    model.zero_grad(set_to_none=True)
    model.train()
    got = capture(tr, lambda: tr.method.training_step(batch))
    assert set(got) == {n for n, _ in model.named_parameters()} == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)
    diag = tr.method.epoch_diagnostics()
    assert set(diag) == {"ce_a", "ce_b", "trained_members"} and diag["trained_members"] == 2


def test_each_member_trains_exactly_as_alone():
    """Several steps of the ensemble leave member a where training member a alone (its CE only,
    same batches, same optimizer) leaves it."""
    data = tiny_data(48, hidden=[8], dropout=0.0)
    tr, alone = make(data=data), make(data=data)
    alone.model.load_state_dict(tr.model.state_dict())
    for s in range(3):
        batch = first_batch(tr, seed=s)
        tr.model.train()
        tr.method.training_step(batch)
        alone.model.train()
        z = alone.model.fusion.heads["a"](alone.model.encoders["a"](batch["inputs"]["a"]))
        alone.step(F.cross_entropy(z, batch["label"]))
    for n, p in tr.model.named_parameters():
        if n.startswith(("encoders.a.", "fusion.heads.a.")):
            torch.testing.assert_close(p, dict(alone.model.named_parameters())[n], rtol=1e-6, atol=1e-7)


def test_two_ranks_equal_one_process(monkeypatch):
    data = tiny_data(64, hidden=[8], dropout=0.0, missing={"b": 0.8}, seed=2)
    single = make(data=data)
    batch = first_batch(single, n=32)
    assert batch["present"]["b"][0::2].sum() != batch["present"]["b"][1::2].sum()
    single.model.train()
    expected = capture(single, lambda: single.method.training_step(batch))
    diag = single.method.epoch_diagnostics()

    def run(tr, shard):
        tr.model.train()
        g = capture(tr, lambda: tr.method.training_step(shard))
        return g, tr.method.epoch_diagnostics()

    got = two_ranks(lambda: make(data=data), run, monkeypatch, batch)
    for n in expected:
        torch.testing.assert_close((got[0][0][n] + got[1][0][n]) / 2, expected[n], rtol=1e-5, atol=1e-6)
    assert got[0][1] == got[1][1] == pytest.approx(diag)  # the diagnostics are the global batch's


@pytest.mark.parametrize("combine", ["probabilities", "logits"])
def test_fit_predicts_the_members_average(combine):
    tr = make(data=tiny_data(48, ("a", "b", "c"), hidden=[8], dropout=0.0, missing=0.3), combine=combine)
    res = tr.fit()
    assert res["fusion"] == "late" and set(res["test"]["per_modality"]) == {"a", "b", "c"}
    logits, uni, labels = tr.predict_split(tr.data.test)
    test = tr.data.test
    want = ensemble_logits(uni, {m: test.present[m] for m in "abc"}, combine)
    torch.testing.assert_close(logits, want)
    assert res["test"]["accuracy"] == pytest.approx(float((want.argmax(1) == labels).float().mean()))


def test_other_fusions_are_refused():
    with pytest.raises(ConfigError, match="shares nothing"):
        make(fusion="film")
    assert make(fusion="late").model.fusion.heads


def test_members_from_unimodal_runs(tmp_path):
    run_a, run_b = _unimodal_run(tmp_path, "a"), _unimodal_run(tmp_path, "b")
    data = tiny_data(48, hidden=[8], dropout=0.0)
    cfg = load_config(None, {"train.epochs": 1, "method.name": "ensemble", "train.progress": "off",
                             "train.probe": False, "method.members_from": {"a": str(run_a), "b": str(run_b)}})
    tr = Trainer(cfg, tmp_path / "ens", data=data)
    res = tr.fit()
    for m, run in (("a", run_a), ("b", run_b)):  # loaded, then fixed: nothing was trained
        saved = torch.load(run / "best.pt", weights_only=True)["model"]
        now = tr.model.state_dict()
        assert torch.equal(now[f"encoders.{m}.net.1.weight"], saved[f"encoders.{m}.net.1.weight"])
        assert torch.equal(now[f"fusion.heads.{m}.weight"], saved["fusion.fc.weight"])
    # the ensemble's probabilities are the mean of the two unimodal runs' probabilities
    x = {m: data.test.arrays[m] for m in ("a", "b")}
    pa = load_run(run_a).predict({"a": x["a"]}).probabilities
    pb = load_run(run_b).predict({"b": x["b"]}).probabilities
    ens = load_run(tmp_path / "ens").predict(x)
    torch.testing.assert_close(ens.probabilities, (pa + pb) / 2, rtol=1e-5, atol=1e-6)
    assert res["test"]["accuracy"] == pytest.approx(float((((pa + pb) / 2).argmax(1) == data.test.labels)
                                                          .float().mean()))


def test_members_from_one_member_fixed_the_other_trained(tmp_path):
    run_a = _unimodal_run(tmp_path, "a", dropout=0.3, batchnorm=True)
    data = tiny_data(48, hidden=[8], dropout=0.3, batchnorm=True)
    tr = make(data=data, members_from={"a": str(run_a)})
    tr.method.on_epoch_start(1)  # only a fresh run's first epoch loads (a resumed run has them)
    saved = torch.load(run_a / "best.pt", weights_only=True)["model"]
    assert not torch.equal(tr.model.state_dict()["encoders.a.net.1.weight"], saved["encoders.a.net.1.weight"])
    tr.fit()
    now = tr.model.state_dict()
    for k, v in saved.items():  # weights and BatchNorm statistics of a untouched by training
        if k.startswith("encoders.a."):
            assert torch.equal(now[k], v), k
    b_run = make(data=data)
    assert not torch.equal(now["encoders.b.net.1.weight"], b_run.model.state_dict()["encoders.b.net.1.weight"])


def test_members_from_errors(tmp_path):
    run_a = _unimodal_run(tmp_path, "a")
    joint = _unimodal_run(tmp_path, "a", fusion_method="joint")
    with pytest.raises(ConfigError, match="unknown modalities"):
        make(members_from={"z": str(run_a)})
    with pytest.raises(ConfigError, match="holds no linear head"):
        make(members_from={"a": str(joint)}).method.on_epoch_start(0)
    with pytest.raises(ConfigError, match="does not exist"):
        make(members_from={"a": str(tmp_path / "none")}).method.on_epoch_start(0)
    with pytest.raises(ConfigError, match="holds no 'b' encoder"):
        make(members_from={"b": str(run_a)}).method.on_epoch_start(0)
