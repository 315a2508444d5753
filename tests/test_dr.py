"""D&R: min-max scaling, purity, k-means against brute force, the purity gap and the strength by
hand, the schedule's boundaries, the diagnosis pass (eval mode, mode and BatchNorm statistics
restored, the same features as a direct encode), the soft re-initialisation (encoders only),
training steps as plain joint training, resume, and two simulated processes."""
import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.dr import (cluster_purity, kmeans, minmax_scale, purity_gap, reinit_strength, separability,
                                  soft_reinit_)
from mmbalance.registry import ConfigError
from mmbalance.utils import epoch_seed

from helpers import capture_step_grads, quick_config, tiny_data
from simulated_ranks import run_two_ranks


# ----------------------------------------------------------------------------- pure math
def test_minmax_scale_by_hand():
    x = torch.tensor([[1.0, -2.0, 7.0], [3.0, 0.0, 7.0], [2.0, 2.0, 7.0]])
    assert minmax_scale(x).tolist() == [[-1.0, -1.0, -1.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]]
    assert minmax_scale(x, 0.0, 1.0)[:, 0].tolist() == [0.0, 1.0, 0.5]


def test_purity_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    c = torch.tensor([5, 5, 1, 1, 1, 1, 9, 9])
    # cluster 5: {0, 0} -> 2; cluster 1: {0, 1, 1, 2} -> 2; cluster 9: {2, 2} -> 2
    assert cluster_purity(y, c) == pytest.approx(6 / 8)
    assert cluster_purity(y, y + 10) == 1.0                   # a relabelled perfect clustering
    assert cluster_purity(y, torch.zeros(8)) == pytest.approx(3 / 8)   # one cluster: the majority share
    assert math.isnan(cluster_purity(torch.tensor([]), torch.tensor([])))


def test_kmeans_reaches_the_brute_force_optimum():
    """On 8 points in 2-D the lowest inertia over every 2-partition is what k-means (with a few
    restarts) finds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64) + torch.tensor([[3.0, 0.0]] * 4 + [[0.0, 0.0]] * 4,
                                                                           dtype=torch.float64)
    best = math.inf
    for bits in itertools.product([0, 1], repeat=8):
        a = torch.tensor(bits)
        if a.sum() in (0, 8):
            continue
        inertia = sum(float(((x[a == k] - x[a == k].mean(0)) ** 2).sum()) for k in (0, 1))
        best = min(best, inertia)
    assign, centers, inertia = kmeans(x, 2, seed=1, n_init=5)
    assert inertia == pytest.approx(best, rel=1e-9)
    assert torch.allclose(centers[assign], torch.stack([x[assign == assign[i]].mean(0) for i in range(8)]))


def test_kmeans_stopping_rule_is_relative_to_the_feature_variance():
    """scikit-learn's rule (stop when the squared center shift is at most tol times the mean
    feature variance) makes k-means invariant to the units of the features: the same clustering
    for x, x / 1000 and x * 1000, which Lloyd needs several iterations to reach."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(60, 2, generator=g, dtype=torch.float64)
    several = []
    for seed in range(3):
        a = kmeans(x, 4, seed=seed)[0]
        several.append(not torch.equal(kmeans(x, 4, seed=seed, max_iter=1)[0], a))
        for c in (1e-3, 1e3):
            assert torch.equal(kmeans(x * c, 4, seed=seed)[0], a), (seed, c)
    assert any(several)  # one Lloyd iteration is not enough here: the stopping rule matters


def test_kmeans_handles_more_dimensions_than_points():
    """Encoder features are often wider than a small split (512-d features, a few hundred
    validation samples): every point can seed the first center, and the clustering is the optimum."""
    x = torch.zeros(6, 40, dtype=torch.float64)
    x[:3, 0], x[3:, 1] = 1.0, 1.0
    x += 0.01 * torch.randn(6, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for seed in range(10):
        assign, _, _ = kmeans(x, 2, seed=seed, n_init=3)
        assert cluster_purity(torch.tensor([0, 0, 0, 1, 1, 1]), assign) == 1.0, seed


def test_kmeans_moves_an_emptied_cluster_onto_the_data():
    """Two distinct points for three clusters: two centers coincide and one cluster empties; it is
    moved onto a data point (never left at the origin), and nothing is NaN."""
    x = torch.tensor([[5.0, 5.0]] * 4 + [[9.0, 9.0]] * 4)
    assign, centers, inertia = kmeans(x, 3, seed=0)
    assert inertia == 0.0 and torch.isfinite(centers).all()
    assert all(any(torch.equal(c, p) for p in x.double()) for c in centers)
    assert cluster_purity(torch.tensor([0] * 4 + [1] * 4), assign) == 1.0


def test_kmeans_is_seeded_and_separability_finds_separated_classes():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(90) % 3
    blobs = torch.randn(90, 4, generator=g) * 0.1 + F.one_hot(y, 3).float().repeat(1, 2)[:, :4] * 5
    a1, _, _ = kmeans(blobs, 3, seed=4)
    a2, _, _ = kmeans(blobs, 3, seed=4)
    assert torch.equal(a1, a2)
    assert separability(blobs, y, 3, seed=0) == 1.0
    noise = torch.randn(90, 4, generator=g)
    assert separability(noise, y, 3, seed=0) < 0.7
    assert math.isnan(separability(blobs[:2], y[:2], 3))     # fewer samples than clusters
    assert separability(blobs[:3], y[:3], 3) == 1.0           # as many: one sample per cluster


def test_separability_scales_every_feature_to_the_same_range():
    """A class-carrying feature in [0, 1] next to a pure-noise feature in [0, 100]: unscaled, the
    noise dominates the distances and k-means splits along it; min-max scaled, the classes separate."""
    g = torch.Generator().manual_seed(5)
    y = torch.arange(200) % 2
    x = torch.stack([y.float() + 0.01 * torch.randn(200, generator=g), 100 * torch.rand(200, generator=g)], 1)
    assert separability(x, y, 2, seed=0) == 1.0
    assert cluster_purity(y, kmeans(x, 2, seed=0)[0]) < 0.7


def test_gap_and_strength_by_hand():
    assert purity_gap(0.9, 0.6) == pytest.approx(0.3)
    assert purity_gap(0.4, 0.7) == pytest.approx(0.3)        # absolute value
    assert purity_gap(float("nan"), 0.7) == 0.0
    assert reinit_strength(0.3, 3.0) == pytest.approx(math.tanh(0.9))
    assert reinit_strength(0.0, 3.0) == 0.0


def test_soft_reinit_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    soft_reinit_([p], [torch.tensor([-1.0, 0.0])], 0.25)
    assert p.detach().tolist() == pytest.approx([0.75 * 1.0 + 0.25 * -1.0, 0.75 * 3.0])


def test_defaults_are_the_public_scripts():
    m = create_method("dr")
    assert (m.lam, m.interval, m.max_reinits) == (3.0, 20, 3)  # script/ours.sh
    assert (m.kmeans_init, m.kmeans_iter) == (1, 300)           # scikit-learn's k-means++ defaults


def test_options_are_validated():
    with pytest.raises(ConfigError, match="interval"):
        create_method("dr", interval=0)
    with pytest.raises(ConfigError, match="lam"):
        create_method("dr", lam="big")


# ----------------------------------------------------------------------------- the method
def _trainer(bn=False, missing=0.0, **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("dr", epochs=1, **{"train.batch_size": 16, "train.seed": 3, "train.eval_batch_size": 16,
                                           **over})
    return Trainer(cfg, data=tiny_data(60, ("a", "v"), n_eval=30, hidden=[8], dropout=0.0, batchnorm=bn,
                                       missing=missing, signal={"a": 3.0, "v": 0.3}))


def test_schedule_boundaries():
    """interval 2, at most 2: diagnoses at the start of epochs 3 and 5 (after epochs 2 and 4, as
    the public code's ``epoch % reinit_epoch == 0 and epoch > 0``), none after the limit."""
    tr = _trainer(interval=2, max_reinits=2)
    due = []
    for epoch in range(9):
        if tr.method.due(epoch):
            due.append(epoch)
            tr.method.relearn({"a": 0.0, "v": 0.0})
    assert due == [3, 5]
    assert tr.method.initial is None  # no re-initialisation left: the copy is freed
    unlimited = _trainer(interval=3, max_reinits=None)
    assert [e for e in range(12) if unlimited.method.due(e)] == [4, 7, 10]
    assert not any(_trainer(max_reinits=0).method.due(e) for e in range(50))


@pytest.mark.parametrize("was_training", [True, False])
def test_diagnosis_uses_eval_mode_features_and_restores_the_model(was_training):
    tr = _trainer(bn=True, lam=3.0)
    model = tr.model
    model.train(was_training)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    feats, present, labels = tr.method.split_features(tr.data.train_eval)
    assert all(m.training == was_training for m in model.modules())
    assert all(torch.equal(buffers[k], v) for k, v in model.state_dict().items())
    ref = copy.deepcopy(model).eval()
    x = {m: torch.stack([tr.data.train_eval[i]["inputs"][m] for i in range(60)]) for m in ("a", "v")}
    with torch.no_grad():
        for m in ("a", "v"):
            assert torch.allclose(feats[m], ref.encode(m, x[m]), atol=1e-6), m
    assert labels.tolist() == [int(tr.data.train_eval[i]["label"]) for i in range(60)]
    assert present.all()
    alphas = tr.method.diagnose(epoch=3)
    d = tr.method.epoch_diagnostics()
    vf, _, vy = tr.method.split_features(tr.data.val)
    seed = epoch_seed(3, 3)
    for i, m in enumerate(("a", "v")):
        p_tr = separability(feats[m], labels, 3, seed=seed + i)
        p_va = separability(vf[m], vy, 3, seed=seed + i)
        assert d[f"purity_train_{m}"] == pytest.approx(p_tr) and d[f"purity_val_{m}"] == pytest.approx(p_va)
        assert alphas[m] == pytest.approx(math.tanh(3.0 * abs(p_tr - p_va)))
        assert d[f"alpha_{m}"] == pytest.approx(alphas[m])


def test_kmeans_options_reach_every_clustering(monkeypatch):
    import mmbalance.methods.dr as dr

    calls = []

    def spy(features, labels, num_clusters, **kw):
        calls.append((num_clusters, kw["n_init"], kw["max_iter"]))
        return separability(features, labels, num_clusters, **kw)

    monkeypatch.setattr(dr, "separability", spy)
    tr = _trainer(kmeans_init=4, kmeans_iter=7)
    tr.method.diagnose(epoch=1)
    assert calls == [(3, 4, 7)] * 4  # two modalities x (train, val)


def test_missing_samples_are_left_out_of_the_clustering():
    tr = _trainer(missing=0.4)
    feats, present, labels = tr.method.split_features(tr.data.train_eval)
    expected = torch.stack([torch.stack([tr.data.train_eval[i]["present"][m] for m in ("a", "v")]) for i in range(60)])
    assert torch.equal(present, expected) and not present.all()
    tr.method.diagnose(epoch=1)
    d = tr.method.epoch_diagnostics()
    keep = present[:, 0]
    assert d["purity_train_a"] == pytest.approx(separability(feats["a"][keep], labels[keep], 3, seed=epoch_seed(3, 1)))


def test_relearn_moves_encoders_toward_their_initial_weights_only():
    tr = _trainer(bn=True)
    init = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(1.0)
        tr.model.encoders["a"].net[2].running_mean.fill_(0.5)
    now = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    buffers = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" in k}
    tr.method.relearn({"a": 0.6, "v": 0.1})
    for n, p in tr.model.named_parameters():
        if n.startswith("encoders."):
            alpha = 0.6 if n.startswith("encoders.a.") else 0.1
            assert torch.allclose(p, (1 - alpha) * now[n] + alpha * init[n], atol=1e-6), n
        else:
            assert torch.equal(p, now[n]), n  # the fusion head keeps its weights
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in buffers.items())  # BN statistics kept
    assert tr.method.count == 1


def test_training_step_is_plain_joint_training():
    tr = _trainer()
    batch = next(iter(tr.loader(tr.data.train, batch_size=16, shuffle=True, seed=1)))
    tr.model.train()
    plain = copy.deepcopy(tr.model)
    loss = F.cross_entropy(plain(batch["inputs"]).logits, batch["label"])
    loss.backward()
    out = {}
    got = capture_step_grads(tr, batch, out)
    for n, p in plain.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-5)  # the loss the engine logs


def test_fit_diagnoses_after_validation_and_logs(tmp_path):
    """interval 1, at most 2: epochs 2 and 3 start with a diagnosis (after epochs 1 and 2 were
    validated and saved); the re-initialised weights are what epoch 2 trains from."""
    cfg = quick_config("dr", epochs=4, **{"method.interval": 1, "method.max_reinits": 2, "train.seed": 3})
    tr = Trainer(cfg, run_dir=tmp_path / "run")
    tr.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    diag = [x["diagnostics"] for x in lines]
    assert [d["reinits"] for d in diag] == [0.0, 0.0, 1.0, 2.0]
    assert ["alpha_pix" in d for d in diag] == [False, False, True, True]
    for d in diag[2:]:
        for m in ("pix", "fou"):
            assert 0.0 <= d[f"purity_train_{m}"] <= 1.0 and 0.0 <= d[f"alpha_{m}"] < 1.0
            assert d[f"alpha_{m}"] == pytest.approx(math.tanh(3.0 * abs(d[f"purity_train_{m}"] - d[f"purity_val_{m}"])))
    assert "initial" not in tr.method.state_dict()  # both re-initialisations done


def test_resume_replays_the_re_initialisation():
    a = _trainer(interval=1, max_reinits=3)
    with torch.no_grad():
        for p in a.model.parameters():
            p.mul_(1.5)  # trained weights, far from the initial ones
    b = _trainer(interval=1, max_reinits=3)
    with torch.no_grad():
        for p in b.model.parameters():
            p.normal_()  # a fresh process: other weights until the checkpoint is loaded
        b.method.initial = {m: {n: torch.randn_like(t) for n, t in d.items()} for m, d in b.method.initial.items()}
    st = copy.deepcopy(a.method.state_dict())
    assert set(st["initial"]) == {"a", "v"}
    b.model.load_state_dict(a.model.state_dict())
    b.method.load_state_dict(st)
    for t in (a, b):
        t.epoch = 2
        t.method.on_epoch_start(2)
    assert a.method.count == b.method.count == 1
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert a.method.epoch_diagnostics() == b.method.epoch_diagnostics()


def test_resume_keeps_the_count_of_re_initialisations():
    """A run resumed after two of three re-initialisations makes one more; one resumed after the
    last makes none and carries no copy of the initial weights. A checkpoint without method state
    (the engine passes {}) leaves the method as set up."""
    a = _trainer(interval=1, max_reinits=3)
    for _ in range(2):
        a.method.relearn({"a": 0.1, "v": 0.1})
    b = _trainer(interval=1, max_reinits=3)
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    assert b.method.count == 2
    due = []
    for e in range(2, 9):
        if b.method.due(e):
            due.append(e)
            b.method.relearn({"a": 0.1, "v": 0.1})
    assert due == [2] and b.method.initial is None
    a.method.relearn({"a": 0.1, "v": 0.1})
    done = a.method.state_dict()
    assert done == {"count": 3}
    c = _trainer(interval=1, max_reinits=3)
    c.method.load_state_dict(done)
    assert c.method.initial is None and c.method.state_dict() == {"count": 3}
    assert not any(c.method.due(e) for e in range(2, 9))
    fresh = _trainer(interval=1, max_reinits=3)
    fresh.method.load_state_dict({})
    assert fresh.method.count == 0 and fresh.method.initial is not None and fresh.method.due(2)


def test_state_loads_without_a_trainer_onto_the_cpu():
    """Inspecting a checkpoint outside a run: ``create_method("dr").load_state_dict(state)``."""
    st = copy.deepcopy(_trainer(interval=1).method.state_dict())
    m = create_method("dr")
    m.load_state_dict(st)
    assert m.count == 0 and set(m.initial) == {"a", "v"}
    assert all(t.device.type == "cpu" and torch.equal(t, st["initial"][k][n])
               for k, d in m.initial.items() for n, t in d.items())


def test_any_fusion_and_three_modalities(tmp_path):
    over = {"method.interval": 1, "method.max_reinits": 1}
    tr = Trainer(quick_config("dr", epochs=3, **over, **{"dataset.options": {"modalities": ["pix", "fou", "zer"]},
                                                         "model.fusion": "gated"}), run_dir=tmp_path / "r")
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    last = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["diagnostics"]
    assert last["reinits"] == 1.0 and {"alpha_pix", "alpha_fou", "alpha_zer"} <= set(last)


def test_two_processes_share_the_diagnosis(monkeypatch):
    """Each rank encodes its share of the splits; the shares are summed into the whole split, rank
    0 clusters, and both ranks apply rank 0's strengths: the replicas stay identical and equal one
    process."""
    def make():
        return _trainer(missing=0.3, interval=1)

    single = make()
    with torch.no_grad():
        for p in single.model.parameters():
            p.mul_(1.3)
    state = copy.deepcopy(single.model.state_dict())
    single.method.on_epoch_start(2)
    d1 = single.method.epoch_diagnostics()
    assert single.method.count == 1

    def body(tr, r):
        tr.model.load_state_dict(state)
        tr.method.on_epoch_start(2)
        return {n: p.detach().clone() for n, p in tr.model.named_parameters()}, tr.method.epoch_diagnostics()

    (w0, d0), (w1, dd1) = run_two_ranks(monkeypatch, make, body)
    assert d0 == dd1
    for k in d1:
        assert d0[k] == pytest.approx(d1[k], rel=1e-6), k
    for n, p in single.model.named_parameters():
        assert torch.equal(w0[n], w1[n]), n
        assert torch.allclose(w0[n], p, atol=1e-6), n
