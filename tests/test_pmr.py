"""PMR: prototypes = class means (EMA, missing classes), vectorised distances = a loop, the
prototypical CE reaches only the weaker modality, and short training runs."""
import math

import torch

from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.methods.pmr import (class_sums, pmr_weak_modalities, prototype_logits, prototype_scores,
                                   update_prototypes)

from simulated_ranks import two_rank_step_grads
from helpers import capture_step_grads


def test_prototypes_are_class_means_on_a_hand_made_batch():
    h = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [10.0, 10.0], [2.0, 2.0]])
    y = torch.tensor([0, 0, 1, 2, 1])
    s, c = class_sums(h, y, 4)
    assert c.tolist() == [2, 2, 1, 0]
    P = update_prototypes(s, c, old=None, mu=0.0)
    assert torch.allclose(P[:3], torch.tensor([[2.0, 1.0], [1.0, 3.0], [10.0, 10.0]]))
    # class 3 never seen and no old prototype: the pass's mean feature, finite
    assert torch.allclose(P[3], h.mean(0))
    # two half-batches summed give the same means (what the all-reduce / accumulation does)
    s1, c1 = class_sums(h[:2], y[:2], 4)
    s2, c2 = class_sums(h[2:], y[2:], 4)
    assert torch.allclose(update_prototypes(s1 + s2, c1 + c2, None, 0.0), P)


def test_prototype_ema_and_missing_class_keeps_old():
    old = torch.tensor([[0.0, 0.0], [4.0, 4.0], [8.0, 8.0]])
    h = torch.tensor([[2.0, 2.0], [6.0, 2.0]])
    y = torch.tensor([0, 1])
    s, c = class_sums(h, y, 3)
    P = update_prototypes(s, c, old, mu=0.25)
    assert torch.allclose(P[0], 0.75 * torch.tensor([2.0, 2.0]) + 0.25 * old[0])
    assert torch.allclose(P[1], 0.75 * torch.tensor([6.0, 2.0]) + 0.25 * old[1])
    assert torch.equal(P[2], old[2])  # missing from the pass: unchanged, no NaN
    assert torch.isfinite(P).all()


def test_distances_vectorised_equal_a_loop():
    g = torch.Generator().manual_seed(0)
    h, P = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g)
    d = prototype_logits(h, P)
    loop = torch.tensor([[-math.sqrt(float(((h[i] - P[k]) ** 2).sum())) for k in range(4)] for i in range(7)])
    assert torch.allclose(d, loop, atol=1e-5)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    s = prototype_scores(h, P, y)
    assert math.isclose(float(s), float(sum(torch.softmax(loop[i], 0)[y[i]] for i in range(7))), rel_tol=1e-5)


def test_weaker_modality_rule():
    def weak(s):
        return pmr_weak_modalities(s).tolist()

    assert weak([5.0, 3.0]) == [False, True]   # rho > 1: the second is weaker
    assert weak([3.0, 5.0]) == [True, False]   # rho < 1: the first
    assert weak([4.0, 4.0]) == [False, False]  # rho = 1: nobody
    assert weak([2.0, 6.0, 6.0, 1.0]) == [True, False, False, True]
    assert weak([0.0, 0.0]) == [False, False]  # no positive score: nobody
    # a device tensor in, a bool tensor out on the same device (no host round trip); a score one
    # float32 step below the best is weaker (s / best < 1 and s < best agree)
    s = torch.tensor([1.0, float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))])
    w = pmr_weak_modalities(s)
    assert w.dtype == torch.bool and w.device == s.device and w.tolist() == [False, True]


def _cfg(**over):
    base = {"train.epochs": 1, "method.name": "pmr", "train.progress": "off", "train.probe": False,
            "train.eval_batch_size": 512, "model.encoder_options": {"dropout": 0.0}}
    base.update(over)
    return load_config(None, base)


def test_pce_gradient_reaches_only_the_weaker_modality():
    """One training step: the encoder gradients equal those of CE(z) plus alpha * PCE of the
    weaker modality only (the stronger modality's encoder gets the plain CE(z) gradient)."""
    tr = Trainer(_cfg(**{"method.alpha": 2.0}))
    tr.method.on_epoch_start(0)
    tr.model.train()
    batch = next(iter(tr.loader(tr.data.train, batch_size=128)))
    y = batch["label"]
    model, mods = tr.model, tr.model.modalities
    out = model(batch["inputs"], batch["present"])
    scores = [float(prototype_scores(out.features[m].detach(), tr.method.prototypes[m], y)) for m in mods]
    weak = pmr_weak_modalities(scores).tolist()
    assert sum(weak) == 1
    grads = {}
    for name, extra in (("ce", []), *[(m, [m]) for m in mods]):
        model.zero_grad()
        out = model(batch["inputs"], batch["present"])
        loss = torch.nn.functional.cross_entropy(out.logits, y)
        for m in extra:
            loss = loss + 2.0 * torch.nn.functional.cross_entropy(
                prototype_logits(out.features[m], tr.method.prototypes[m]), y)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    weak_m = mods[weak.index(True)]
    # through the method's hook: captured before the optimizer step
    captured = capture_step_grads(tr, batch)
    for n in captured:
        assert torch.allclose(captured[n], grads[weak_m][n], atol=1e-6), n
    strong = [m for m in mods if m != weak_m][0]
    enc_strong = [n for n in captured if n.startswith(f"encoders.{strong}.")]
    assert all(torch.allclose(captured[n], grads["ce"][n], atol=1e-6) for n in enc_strong)
    enc_weak = [n for n in captured if n.startswith(f"encoders.{weak_m}.")]
    assert any(not torch.allclose(captured[n], grads["ce"][n], atol=1e-6) for n in enc_weak)
    diag = tr.method.epoch_diagnostics()
    assert diag[f"weak_{weak_m}"] == 1.0 and diag[f"weak_{strong}"] == 0.0


def test_training_runs_and_resume_state_three_modalities():
    tr = Trainer(_cfg(**{"dataset.options": {"modalities": ["pix", "fou", "zer"]}, "train.epochs": 2}))
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    st = tr.method.state_dict()
    assert set(st["prototypes"]) == {"pix", "fou", "zer"}
    assert st["prototypes"]["pix"].shape == (tr.data.num_classes, tr.model.feature_dim("pix"))
    Trainer(_cfg(**{"model.fusion": "gated"})).fit()



# ---------------------------------------------------------------------------------------------
# the prototype pass (positions, eval mode, EMA), reference step, window boundaries, resume
import copy

import pytest
import torch.nn.functional as F

from mmbalance.engine.seed import epoch_seed
from mmbalance.methods.pmr import prototype_positions
from mmbalance.registry import ConfigError
from helpers import tiny_data


def _trainer(bn=False, n=64, **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = _cfg(**{"train.batch_size": 16, "train.seed": 5, **over})
    return Trainer(cfg, data=tiny_data(n, ("a", "v"), hidden=[8], dropout=0.0, batchnorm=bn,
                                       signal={"a": 2.0, "v": 0.3}))


def test_prototype_positions_are_the_first_batches_of_a_seeded_shuffle():
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(50, generator=g).tolist()
    assert prototype_positions(50, 8, 0.5, 11) == perm[:24]   # floor(0.5 * 7) = 3 batches of 8
    assert prototype_positions(50, 8, 0.1, 11) == perm[:8]    # at least one batch
    assert prototype_positions(50, 8, 1.0, 11) == perm        # all of it (the last batch is short)
    assert prototype_positions(50, 8, 0.5, 12) != perm[:24]


def _class_means(model, data, positions, C=3):
    x = {m: torch.stack([data[i]["inputs"][m] for i in positions]) for m in ("a", "v")}
    y = torch.stack([data[i]["label"] for i in positions])
    with torch.no_grad():
        return {m: torch.stack([model.encode(m, x[m])[y == c].mean(0) for c in range(C)]) for m in ("a", "v")}


@pytest.mark.parametrize("was_training", [True, False])
def test_prototype_pass_eval_mode_class_means_and_ema(was_training):
    """Prototypes = eval-mode class means over the selected positions (BatchNorm statistics used,
    not updated), the model's mode restored; the next pass blends with mu."""
    tr = _trainer(bn=True, proto_fraction=0.5, mu=0.25)
    model = tr.model
    model.train(was_training)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    tr.method.on_epoch_start(0)
    assert all(m.training == was_training for m in model.modules())
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    ref_model = copy.deepcopy(model).eval()
    pos0 = prototype_positions(64, 16, 0.5, epoch_seed(5, 0) + 1)
    P0 = _class_means(ref_model, tr.data.train, pos0)
    for m in ("a", "v"):
        assert torch.allclose(tr.method.prototypes[m], P0[m], atol=1e-5), m
    with torch.no_grad():  # move the encoders, then the second pass blends with mu
        for p in model.encoders.parameters():
            p.add_(0.1)
    tr.method.on_epoch_start(1)
    pos1 = prototype_positions(64, 16, 0.5, epoch_seed(5, 1) + 1)
    assert pos1 != pos0
    P1 = _class_means(copy.deepcopy(model).eval(), tr.data.train, pos1)
    for m in ("a", "v"):
        assert torch.allclose(tr.method.prototypes[m], 0.75 * P1[m] + 0.25 * P0[m], atol=1e-5), m


def _reference(model, batch, protos, alpha, active):
    ref = copy.deepcopy(model)
    out = ref(batch["inputs"])
    y = batch["label"]
    loss = F.cross_entropy(out.logits, y)
    d = {m: -torch.sqrt(((out.features[m][:, None, :] - protos[m][None]) ** 2).sum(-1)) for m in ("a", "v")}
    s = [float(F.softmax(d[m].detach(), 1).gather(1, y[:, None]).sum()) for m in ("a", "v")]
    weak = "v" if s[0] > s[1] else "a" if s[0] < s[1] else None
    if active and weak is not None:
        loss = loss + alpha * F.cross_entropy(d[weak], y)
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters()}, weak


def test_window_boundaries_and_the_reference_step():
    """Window [1, 2]: the prototypical CE of the weaker modality (weight alpha) is added in
    epochs 1 and 2 only; epochs 0 and 3 train CE(z) alone."""
    tr = _trainer(alpha=0.7, modulation_start=1, modulation_end=2)
    tr.method.on_epoch_start(0)
    batch = next(iter(tr.loader(tr.data.train, batch_size=32, shuffle=True, seed=1)))
    for epoch in range(4):
        tr.epoch = epoch
        tr.model.train()
        active = epoch in (1, 2)
        expected, weak = _reference(tr.model, batch, tr.method.prototypes, 0.7, active)
        assert weak is not None
        got = capture_step_grads(tr, batch)
        for n in expected:
            assert torch.allclose(got[n], expected[n], atol=1e-5), (epoch, n)
        d = tr.method.epoch_diagnostics()
        assert d[f"weak_{weak}"] == float(active)


def test_resume_state_round_trip_gives_the_same_next_step():
    a = _trainer(mu=0.5)
    a.method.on_epoch_start(0)
    batch = next(iter(a.loader(a.data.train, batch_size=32, shuffle=True, seed=1)))
    a.model.train()
    a.method.training_step(batch)
    b = _trainer(mu=0.5)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    for t in (a, b):
        t.method.on_epoch_start(1)  # EMA with the restored prototypes
        t.model.train()
    for m in ("a", "v"):
        assert torch.equal(a.method.prototypes[m], b.method.prototypes[m])
    ga, gb = capture_step_grads(a, batch), capture_step_grads(b, batch)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def test_invalid_options():
    from mmbalance.methods import create_method

    for bad, msg in (({"mu": 1.5}, "'mu' takes a number in [0, 1], got 1.5"),
                     ({"proto_fraction": 0.0}, "'proto_fraction' takes a number in (0, 1], got 0.0"),
                     ({"alpha": -1}, "'alpha' takes a number >= 0, got -1"),
                     ({"modulation_start": -2}, "'modulation_start' takes an integer >= 0, got -2"),
                     ({"modulation_end": 2.5}, "'modulation_end' takes an integer >= 0, got 2.5")):
        with pytest.raises(ConfigError) as e:
            _trainer(**bad)
        assert str(e.value) == f"method 'pmr' option {msg}"
        with pytest.raises(ConfigError):
            create_method("pmr", **bad)
    assert create_method("pmr", mu="0.2", proto_fraction=1).proto_fraction == 1.0


# ---------------------------------------------------------------------------------------------
# two processes simulated in one: threads with a summing barrier stand in for all_reduce



def two_rank_grads(make_trainer, batch, monkeypatch):
    """One step's gradients with ``batch`` dealt to two simulated ranks (tests/simulated_ranks.py)."""
    return two_rank_step_grads(monkeypatch, make_trainer, batch)


def test_two_processes_with_missing_modalities_equal_one_process(monkeypatch):
    """With missing modalities the ranks hold different numbers of present samples: the
    prototypical CE must still be the mean over the global batch's present samples."""
    def make():
        tr = Trainer(_cfg(**{"train.batch_size": 32, "train.seed": 5}),
                     data=tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0, missing=0.5,
                                    signal={"a": 2.0, "v": 0.3}))
        tr.method.on_epoch_start(0)
        return tr

    single = make()
    batch = next(iter(single.loader(single.data.train, batch_size=32, shuffle=True, seed=1)))
    assert batch["present"]["a"][0::2].sum() != batch["present"]["a"][1::2].sum()
    single.model.train()
    expected = capture_step_grads(single, batch)
    assert single.method.epoch_diagnostics()["weak_v"] == 1.0  # the PCE term is active
    got = two_rank_grads(make, batch, monkeypatch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


# ---------------------------------------------------------------------------------------------
# missing modalities: masked on the device, equal to the step on each modality's present rows
def test_absent_samples_take_no_part_in_the_prototype_terms():
    """The step (every row scored, absent rows weighted 0 on the device) equals a reference that
    keeps only each modality's present rows: the weaker modality's PCE is the mean over its
    present samples, scores and diagnostics count present samples only. A modality absent from
    the whole batch has no PCE or nearest-prototype diagnostic that epoch, and nothing is NaN."""
    tr = Trainer(_cfg(**{"train.batch_size": 32, "train.seed": 5, "method.alpha": 0.8}),
                 data=tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0, missing=0.4, signal={"a": 2.0, "v": 0.3}))
    tr.method.on_epoch_start(0)
    batch = next(iter(tr.loader(tr.data.train, batch_size=32, shuffle=True, seed=1)))
    pres, y = batch["present"], batch["label"]
    assert not pres["a"].all() and not pres["v"].all()
    tr.model.train()
    ref = copy.deepcopy(tr.model)
    out = ref(batch["inputs"], pres)
    d = {m: prototype_logits(out.features[m][pres[m]], tr.method.prototypes[m]) for m in ("a", "v")}
    ym = {m: y[pres[m]] for m in d}
    s = [float(F.softmax(d[m].detach(), 1).gather(1, ym[m][:, None]).sum()) for m in ("a", "v")]
    weak = "v" if s[0] > s[1] else "a"
    (F.cross_entropy(out.logits, y) + 0.8 * F.cross_entropy(d[weak], ym[weak])).backward()
    got = capture_step_grads(tr, batch)
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    diag = tr.method.epoch_diagnostics()
    assert diag[f"weak_{weak}"] == 1.0 and diag["rho"] == pytest.approx(s[0] / s[1], rel=1e-5)
    for m in ("a", "v"):
        assert diag[f"pce_{m}"] == pytest.approx(float(F.cross_entropy(d[m].detach(), ym[m])), rel=1e-5)
        assert diag[f"proto_acc_{m}"] == pytest.approx(float((d[m].argmax(1) == ym[m]).float().mean()))
    # v absent from the whole batch: no PCE for it, its diagnostics left out of the epoch
    alone = {**batch, "present": {"a": torch.ones_like(pres["a"]), "v": torch.zeros_like(pres["v"])}}
    stats = tr.method.training_step(alone)
    diag = tr.method.epoch_diagnostics()
    assert math.isfinite(float(stats["loss"])) and all(math.isfinite(v) for v in diag.values())
    assert "pce_v" not in diag and "proto_acc_v" not in diag and "pce_a" in diag
    assert diag["weak_v"] == 0.0 and "rho" not in diag  # v got no PCE; s_v = 0: no ratio


def test_a_weaker_modality_with_a_single_present_sample_gets_its_pce():
    """v present in one sample only: its score (one softmax probability, below 1) is the lower,
    so its PCE is that one sample's CE (weight alpha), and rho = s_a / s_v is still logged."""
    tr = Trainer(_cfg(**{"train.batch_size": 32, "train.seed": 5, "method.alpha": 0.8}),
                 data=tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0, signal={"a": 2.0, "v": 0.3}))
    tr.method.on_epoch_start(0)
    batch = next(iter(tr.loader(tr.data.train, batch_size=32, shuffle=True, seed=1)))
    one = torch.zeros_like(batch["present"]["v"])
    one[3] = True
    pres = {"a": torch.ones_like(one), "v": one}
    batch = {**batch, "present": pres}
    y = batch["label"]
    tr.model.train()
    ref = copy.deepcopy(tr.model)
    out = ref(batch["inputs"], pres)
    d = {m: prototype_logits(out.features[m][pres[m]], tr.method.prototypes[m]) for m in ("a", "v")}
    s = [float(F.softmax(d[m].detach(), 1).gather(1, y[pres[m]][:, None]).sum()) for m in ("a", "v")]
    assert s[1] < 1.0 < s[0]
    (F.cross_entropy(out.logits, y) + 0.8 * F.cross_entropy(d["v"], y[pres["v"]])).backward()
    got = capture_step_grads(tr, batch)
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    diag = tr.method.epoch_diagnostics()
    assert diag["weak_v"] == 1.0 and diag["rho"] == pytest.approx(s[0] / s[1], rel=1e-5)


def test_defaults_are_the_crema_d_bash_setting():
    from mmbalance.methods import create_method

    hp = create_method("pmr").hparams()
    assert (hp["alpha"], hp["mu"], hp["proto_fraction"]) == (2.0, 0.0, 0.1)
    assert (hp["modulation_start"], hp["modulation_end"]) == (0, 70)


def test_loaded_prototypes_go_to_the_trainers_device():
    """Resume on an accelerator: the restored prototypes are put on the trainer's device (here
    the meta device stands in for it); without a trainer they stay on the CPU; a state without
    prototypes restores none."""
    from types import SimpleNamespace

    from mmbalance.methods import create_method

    state = {"prototypes": {"a": torch.randn(3, 4), "v": torch.randn(3, 5)}}
    m = create_method("pmr")
    m.load_state_dict(state)
    assert all(p.device.type == "cpu" for p in m.prototypes.values())
    m.trainer = SimpleNamespace(device=torch.device("meta"))
    m.load_state_dict(state)
    assert set(m.prototypes) == {"a", "v"} and all(p.device.type == "meta" for p in m.prototypes.values())
    m.load_state_dict({})
    assert m.prototypes == {}
