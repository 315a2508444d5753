"""OPM: drop probabilities by hand (and against the public code's two-modality form), keep masks,
rescale factors, the training step against a hand-written reference (which samples and features
are dropped, rescaled and removed; which parameters the gradient reaches), the window and p_exe,
replay on resume, missing modalities and two simulated processes."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods import opm as opm_module
from mmbalance.methods.opm import (_step_seed, opm_drop_probabilities, opm_keep_masks, opm_random_draws, opm_rescale,
                                   opm_scores)
from mmbalance.registry import ConfigError

from helpers import assert_score_diagnostics_skip_absent_steps, capture_step_grads, quick_config, tiny_data
from simulated_ranks import run_two_ranks, shard_batch


# ----------------------------------------------------------------------------- pure math
def _public_code_q(p1, p2, q_base, lam):
    """The public code's ``calcu_q`` (two modalities), transcribed in plain Python."""
    r1 = math.tanh(max(p1 / p2 - 1, 0.0))
    r2 = math.tanh(max(p2 / p1 - 1, 0.0))
    q = [q_base * (1 + lam * r1) if r1 > 0 else 0.0, q_base * (1 + lam * r2) if r2 > 0 else 0.0]
    return [min(max(x, 0.0), 1.0) for x in q]


def test_drop_probabilities_by_hand():
    q, rho = opm_drop_probabilities(torch.tensor([3.0, 1.0]), q_base=0.5, lam=0.5)
    assert rho.tolist() == pytest.approx([3.0, 1 / 3])
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(2.0)), 0.0])
    q, _ = opm_drop_probabilities(torch.tensor([1.0, 4.0]), q_base=0.4, lam=1.0)  # the other order
    assert q.tolist() == pytest.approx([0.0, 0.4 * (1 + math.tanh(3.0))])
    q, _ = opm_drop_probabilities(torch.tensor([2.0, 2.0]), q_base=0.5, lam=0.5)  # tie: nobody
    assert q.tolist() == [0.0, 0.0]
    q, _ = opm_drop_probabilities(torch.tensor([9.0, 1.0]), q_base=0.8, lam=1.0)  # clipped at 1
    assert q.tolist() == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
def test_two_modalities_equal_the_public_code(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(2, generator=g) * 30 + 1
    q_base, lam = float(torch.rand(1, generator=g)), float(torch.rand(1, generator=g) * 2)
    q, _ = opm_drop_probabilities(s, q_base, lam)
    assert q.tolist() == pytest.approx(_public_code_q(float(s[0]), float(s[1]), q_base, lam), rel=1e-6)


def test_three_modalities_ratio_to_the_mean_of_the_others():
    q, rho = opm_drop_probabilities(torch.tensor([6.0, 2.0, 4.0]), q_base=0.5, lam=0.5)
    assert rho.tolist() == pytest.approx([6 / 3, 2 / 5, 4 / 4])
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(1.0)), 0.0, 0.0])  # rho = 1: not > 1


def test_counts_compare_mean_scores_and_absent_modalities_take_no_part():
    # equal counts: the plain rule
    q0, _ = opm_drop_probabilities(torch.tensor([3.0, 1.0]), 0.5, 0.5)
    q1, _ = opm_drop_probabilities(torch.tensor([3.0, 1.0]), 0.5, 0.5, counts=torch.tensor([4.0, 4.0]))
    assert torch.equal(q0, q1)
    # a's sum is larger only because a is present twice as often: the means are equal
    q, rho = opm_drop_probabilities(torch.tensor([4.0, 2.0]), 0.5, 0.5, counts=torch.tensor([8.0, 4.0]))
    assert q.tolist() == [0.0, 0.0] and rho.tolist() == pytest.approx([1.0, 1.0])
    # b absent from the whole batch: nothing to compare, nothing dropped
    q, rho = opm_drop_probabilities(torch.tensor([4.0, 0.0]), 0.5, 0.5, counts=torch.tensor([8.0, 0.0]))
    assert q.tolist() == [0.0, 0.0]
    q, rho = opm_drop_probabilities(torch.tensor([6.0, 1.0, 0.0]), 0.5, 0.5, counts=torch.tensor([2.0, 2.0, 0.0]))
    assert rho.tolist() == pytest.approx([6.0, 1 / 6, 0.0]) and q[2] == 0.0
    # a modality present in a single sample takes part: means 0.9 and 0.5
    q, rho = opm_drop_probabilities(torch.tensor([0.9, 1.0]), 0.5, 0.5, counts=torch.tensor([1.0, 2.0]))
    assert rho.tolist() == pytest.approx([1.8, 1 / 1.8]) and q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(0.8)), 0.0])


def test_scores_are_sums_over_present_samples():
    za = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 0.0]])   # p_y: 0.5, 0.75, (absent)
    zv = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0], [0.0, 0.0]])   # p_y: 0.8, 0.5, 0.5
    y = torch.tensor([0, 1, 1])
    s = opm_scores([za, zv], y, [torch.tensor([True, True, False]), None])
    assert s.tolist() == pytest.approx([1.25, 1.8])
    # no masks given: every sample counts
    assert opm_scores([za, zv], y).tolist() == pytest.approx([1.25 + 1 / (1 + math.exp(5.0)), 1.8])


def test_keep_masks_and_draws():
    u = torch.tensor([[0.10, 0.90], [0.49, 0.20], [0.50, 0.00]])
    keep = opm_keep_masks(u, torch.tensor([0.5, 0.0]))
    assert keep.tolist() == [[False, True], [False, True], [True, True]]  # drop iff u < q
    u1, t1 = opm_random_draws(7, 20, 2)
    u2, t2 = opm_random_draws(7, 20, 2)
    u3, t3 = opm_random_draws(8, 20, 2)
    assert u1 == u2 and torch.equal(t1, t2) and not torch.equal(t1, t3)
    # a drop rate of q per sample and modality
    _, big = opm_random_draws(0, 40000, 2)
    frac = (~opm_keep_masks(big, torch.tensor([0.3, 0.0]))).float().mean(0)
    assert abs(float(frac[0]) - 0.3) < 0.01 and float(frac[1]) == 0.0


def test_rescale_factors():
    q = torch.tensor([0.5, 0.0])
    theta = (4 * 0.5) / (4 + 12)
    assert opm_rescale(q, [4, 12], "concat").tolist() == pytest.approx([1 / (1 - theta)] * 2)
    assert opm_rescale(q, [4, 12], "per_modality").tolist() == pytest.approx([2.0, 1.0])
    assert opm_rescale(q, [4, 12], "none").tolist() == [1.0, 1.0]
    assert torch.equal(opm_rescale(q, [4, 12]), opm_rescale(q, [4, 12], "concat"))  # the public code's by default
    with pytest.raises(ConfigError):
        opm_rescale(q, [4, 12], "both")


def test_options_are_validated():
    with pytest.raises(ConfigError, match="q_base"):
        create_method("opm", q_base=1.5)
    with pytest.raises(ConfigError, match="rescale"):
        create_method("opm", rescale="all")
    with pytest.raises(ConfigError, match="at least two modalities"):
        Trainer(quick_config("opm", epochs=1, **{"dataset.options": {"modalities": ["pix"]}}))


# ----------------------------------------------------------------------------- training step
def _trainer(missing=0.0, absent_policy="input", **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("opm", epochs=1, **{"train.batch_size": 32, "train.seed": 3, "optim.momentum": 0.0,
                                            "optim.weight_decay": 0.0, "method.modulation_start": 0,
                                            "model.absent_policy": absent_policy, **over})
    return Trainer(cfg, data=tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0, missing=missing,
                                       signal={"a": 2.0, "v": 0.2}))


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=32, shuffle=True, seed=seed)))


def _reference(tr, batch, q_base, lam, p_exe, rescale="concat", step=None):
    """OPM written out: scores from the full features' unimodal logits, q from the ratio of the
    mean scores, the step's draws looked up by dataset index, features zeroed and rescaled,
    samples without a kept present feature removed, CE over the kept samples."""
    model = copy.deepcopy(tr.model)
    mods = ["a", "v"]
    y, pres = batch["label"], batch["present"]
    if model.absent_policy == "input":  # absent inputs zeroed before the encoder
        feats = {m: model.encoders[m](batch["inputs"][m] * pres[m].view(-1, 1).float()) for m in mods}
    else:  # absent features zeroed before every fusion
        feats = {m: model.encoders[m](batch["inputs"][m]) for m in mods}
    out = model.fuse(feats, pres)
    s = [float((F.softmax(out.unimodal_logits[m].detach(), 1).gather(1, y[:, None]).squeeze(1) * pres[m]).sum())
         / float(pres[m].sum()) for m in mods]
    rho = [s[0] / s[1], s[1] / s[0]]
    q = [min(q_base * (1 + lam * math.tanh(r - 1)), 1.0) if r > 1 else 0.0 for r in rho]
    u, table = opm_random_draws(_step_seed(3, tr.global_step if step is None else step), len(tr.data.train), 2)
    info = {"q": q, "executed": u < p_exe, "removed": 0.0}
    if u < p_exe:
        rows = table[batch["index"]]
        keep = {m: rows[:, i] >= q[i] for i, m in enumerate(mods)}
        if rescale == "concat":
            theta = sum(qi * model.feature_dim(m) for qi, m in zip(q, mods)) / sum(model.feature_dim(m) for m in mods)
            scale = {m: 1 / (1 - theta) for m in mods}
        else:
            scale = {m: 1 / (1 - qi) for qi, m in zip(q, mods)}
        kept = (keep["a"] & pres["a"]) | (keep["v"] & pres["v"])
        dropped = {m: feats[m] * keep[m].view(-1, 1).float() * scale[m] for m in mods}
        out = model.fuse(dropped, pres)
        loss = F.cross_entropy(out.logits[kept], y[kept])
        info.update(keep=keep, kept=kept, removed=1 - float(kept.float().mean()))
    else:
        loss = F.cross_entropy(out.logits, y)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, info


@pytest.mark.parametrize("rescale", ["concat", "per_modality"])
def test_training_step_equals_a_hand_written_reference(rescale):
    tr = _trainer(q_base=0.6, lam=0.5, p_exe=1.0, rescale=rescale)
    batch = _batch(tr)
    tr.global_step = 5
    tr.model.train()
    expected, info = _reference(tr, batch, 0.6, 0.5, 1.0, rescale)
    assert info["executed"] and max(info["q"]) > 0.5 and min(info["q"]) == 0.0
    dom = "a" if info["q"][0] > 0 else "v"
    assert 0 < int((~info["keep"][dom]).sum()) < 32  # some, not all, of the dominant features dropped
    got = capture_step_grads(tr, batch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert [d["q_a"], d["q_v"]] == pytest.approx(info["q"], rel=1e-5)
    assert d["executed"] == 1.0 and d[f"dropped_{dom}"] == pytest.approx(float((~info["keep"][dom]).float().mean()))


@pytest.mark.parametrize("absent_policy", ["input", "feature"])
def test_training_step_with_missing_modalities_compares_mean_scores(absent_policy):
    """v absent from half the samples: the ratio compares the mean true-class probabilities over
    each modality's present samples (a sum would count v's absent samples as zeros). With the
    ``feature`` policy the fusion of the modulated features zeroes the absent features too."""
    tr = _trainer(missing={"v": 0.5}, absent_policy=absent_policy, q_base=0.6, lam=0.5, p_exe=1.0)
    batch = _batch(tr)
    assert not batch["present"]["v"].all() and batch["present"]["a"].all()
    tr.global_step = 2
    tr.model.train()
    expected, info = _reference(tr, batch, 0.6, 0.5, 1.0)
    assert info["executed"] and max(info["q"]) > 0
    got = capture_step_grads(tr, batch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert [d["q_a"], d["q_v"]] == pytest.approx(info["q"], rel=1e-5)
    assert d["removed"] == pytest.approx(info["removed"])


def test_p_exe_zero_and_outside_the_window_is_plain_joint_training():
    for method in ({"p_exe": 0.0}, {"modulation_start": 1, "p_exe": 1.0}):
        tr = _trainer(**method)
        batch = _batch(tr)
        tr.model.train()
        plain = copy.deepcopy(tr.model)
        F.cross_entropy(plain(batch["inputs"]).logits, batch["label"]).backward()
        got = capture_step_grads(tr, batch)
        for n, p in plain.named_parameters():
            assert torch.allclose(got[n], p.grad, atol=1e-6), (method, n)
        assert tr.method.epoch_diagnostics()["executed"] == 0.0


def test_window_boundaries():
    """Window [1, 2] with p_exe = 1: epochs 0 and 3 train CE(z) on the full features, epochs 1
    and 2 drop."""
    tr = _trainer(modulation_start=1, modulation_end=2, p_exe=1.0, q_base=0.6)
    batch = _batch(tr)
    for epoch in range(4):
        tr.epoch = epoch
        tr.model.train()
        expected, info = _reference(tr, batch, 0.6, 0.5, 1.0 if epoch in (1, 2) else 0.0)
        got = capture_step_grads(tr, batch)
        for n in expected:
            assert torch.allclose(got[n], expected[n], atol=1e-6), (epoch, n)
        assert tr.method.epoch_diagnostics()["executed"] == float(epoch in (1, 2))


def test_the_draws_follow_the_global_step_not_the_global_rng():
    """A resumed run replays the same drops (OPM keeps no other state): same weights and global
    step give the same gradients whatever the global RNG; another step draws other masks."""
    a, b = _trainer(p_exe=1.0, q_base=0.6), _trainer(p_exe=1.0, q_base=0.6)
    b.model.load_state_dict(a.model.state_dict())
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    batch = _batch(a)
    for t in (a, b):
        t.global_step = 11
        t.model.train()
    torch.manual_seed(0)
    ga = capture_step_grads(a, batch)
    torch.manual_seed(1)
    gb = capture_step_grads(b, batch)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    b.global_step = 12
    gc = capture_step_grads(b, batch)
    assert not all(torch.allclose(ga[n], gc[n]) for n in ga)


def test_eval_predicts_on_the_full_features():
    tr = _trainer(p_exe=1.0, q_base=0.9)
    batch = _batch(tr)
    tr.model.eval()
    with torch.no_grad():
        assert torch.equal(tr.method.predict(batch).logits, tr.model(batch["inputs"], batch["present"]).logits)


def test_samples_without_a_kept_feature_are_removed(monkeypatch):
    """q = (1, 0): every a feature is dropped, so the samples where v is absent have nothing left
    and are removed from the loss; a batch of only such samples makes no update at all."""
    monkeypatch.setattr(opm_module, "opm_drop_probabilities",
                        lambda s, qb, lam, counts=None: (torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.5])))
    tr = _trainer(missing={"v": 0.5}, p_exe=1.0)
    batch = _batch(tr)
    no_v = ~batch["present"]["v"]
    assert 0 < int(no_v.sum()) < 32
    tr.model.train()
    model = copy.deepcopy(tr.model)
    h_v = model.encoders["v"](batch["inputs"]["v"] * batch["present"]["v"].view(-1, 1))
    out = model.fuse({"a": torch.zeros(32, 8), "v": 2.0 * h_v}, batch["present"])  # concat: 1/(1 - 8/16)
    keep = ~no_v
    F.cross_entropy(out.logits[keep], batch["label"][keep]).backward()
    got = capture_step_grads(tr, batch)
    for n, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(got.get(n, torch.zeros_like(p)), expected, atol=1e-6), n
    assert tr.method.epoch_diagnostics()["removed"] == pytest.approx(float(no_v.float().mean()))
    # only samples without v: nothing is left, the parameters do not move
    only = {k: ({m: t[no_v] for m, t in v.items()} if isinstance(v, dict) else v[no_v]) for k, v in batch.items()}
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    assert tr.method.training_step(only)["loss"] == 0.0
    assert all(torch.equal(before[n], p) for n, p in tr.model.named_parameters())


def test_a_single_kept_sample_still_updates(monkeypatch):
    """q = (0, 1) on a one-sample batch: its v feature is dropped (dropped_v = 1 of 1), a is kept
    and rescaled, and the step is CE on that one sample (one kept sample is enough to update)."""
    monkeypatch.setattr(opm_module, "opm_drop_probabilities",
                        lambda s, qb, lam, counts=None: (torch.tensor([0.0, 1.0]), torch.tensor([0.5, 2.0])))
    tr = _trainer(p_exe=1.0)
    batch = _batch(tr)
    one = {k: ({m: t[:1] for m, t in v.items()} if isinstance(v, dict) else v[:1]) for k, v in batch.items()}
    tr.model.train()
    model = copy.deepcopy(tr.model)
    h_a = model.encoders["a"](one["inputs"]["a"])
    out = model.fuse({"a": 2.0 * h_a, "v": torch.zeros(1, 8)}, one["present"])  # concat: 1/(1 - 8/16)
    F.cross_entropy(out.logits, one["label"]).backward()
    got = capture_step_grads(tr, one)
    for n, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(got.get(n, torch.zeros_like(p)), expected, atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert d["dropped_v"] == 1.0 and d["dropped_a"] == 0.0 and d["removed"] == 0.0


def test_score_diagnostics_are_mean_true_class_probabilities_over_present_samples():
    """score_v averages the steps where v is present: a batch without v leaves it unchanged
    (no 0/0), and a batch with a single v sample counts."""
    tr = _trainer(missing={"v": 0.5}, p_exe=0.0)
    batch = _batch(tr)
    assert_score_diagnostics_skip_absent_steps(tr, batch)


def test_runs_with_three_modalities_missing_data_and_film():
    over = {"method.modulation_start": 0, "train.epochs": 2}
    res = Trainer(quick_config("opm", **over, **{"dataset.options": {"modalities": ["pix", "fou", "zer"]}})).fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    tr = Trainer(quick_config("opm", **over, **{"model.fusion": "film", "dataset.missing_rate": 0.3}))
    tr.fit()


def test_two_processes_with_missing_modalities_equal_one_process(monkeypatch):
    """The ranks hold different numbers of present and of kept samples: scores, counts and the
    kept count are summed over processes and each sample's draw is looked up by its index, so the
    averaged gradient is one process's."""
    def make():
        tr = _trainer(missing=0.5, p_exe=1.0, q_base=0.6)
        tr.global_step = 4
        return tr

    single = make()
    batch = _batch(single)
    assert batch["present"]["a"][0::2].sum() != batch["present"]["a"][1::2].sum()
    single.model.train()
    expected = capture_step_grads(single, batch)
    d1 = single.method.epoch_diagnostics()
    assert d1["executed"] == 1.0 and max(d1["q_a"], d1["q_v"]) > 0

    def body(tr, r):
        tr.model.train()
        grads = capture_step_grads(tr, shard_batch(batch, r))
        return grads, tr.method.epoch_diagnostics()

    (g0, d0), (g1, _) = run_two_ranks(monkeypatch, make, body)
    for n in expected:
        assert torch.allclose(g0[n], expected[n], atol=1e-6), n
        assert torch.equal(g0[n], g1[n]), n
    for k in ("q_a", "q_v", "removed", "dropped_a", "dropped_v"):
        assert d0[k] == pytest.approx(d1[k], rel=1e-6), k


# ---------------------------------------------------------------------------------------------
# the rule on the device: the same numbers as the rule in plain Python, nothing read back
from test_precision import count_synchronisations


def _host_q(scores, q_base, lam, counts=None, eps=1e-12):
    """The rule of :func:`opm_drop_probabilities` in plain Python (float64), as float32 tensors."""
    s = [float(x) for x in scores]
    on, mean = [True] * len(s), s
    if counts is not None:
        n = [float(x) for x in counts]
        on = [c > 0 for c in n]
        mean = [si / ni if o else 0.0 for si, ni, o in zip(s, n, on)]
    q, rho = [0.0] * len(s), [0.0] * len(s)
    k = sum(on)
    if k >= 2:
        total = sum(x for x, o in zip(mean, on) if o)
        for m in range(len(s)):
            if on[m]:
                rho[m] = mean[m] / max((total - mean[m]) / (k - 1), eps)
                if rho[m] > 1.0:
                    q[m] = min(max(q_base * (1.0 + lam * math.tanh(rho[m] - 1.0)), 0.0), 1.0)
    return torch.tensor(q), torch.tensor(rho)


def test_drop_probabilities_on_the_device_equal_the_plain_python_rule():
    g = torch.Generator().manual_seed(3)
    for trial in range(300):
        M = 2 + trial % 3
        scores = (torch.rand(M, generator=g, dtype=torch.float64) * 20).round(decimals=trial % 3)
        counts = torch.randint(0, 3, (M,), generator=g).double() * 10 if trial % 2 else None
        q_base, lam = (1.0, 2.0) if trial % 5 == 0 else (0.5, 0.5)
        (q, rho), n = count_synchronisations(lambda: opm_drop_probabilities(scores, q_base, lam, counts))
        want_q, want_rho = _host_q(scores, q_base, lam, counts)
        assert n == 0 and torch.equal(q, want_q) and torch.equal(rho, want_rho), (scores, counts)


def test_the_rule_stays_on_the_scores_device():
    """Every intermediate tensor lives on the scores' device (the meta device stands for an
    accelerator here: a tensor made on the host would make the rule fail there)."""
    for counts in (None, torch.tensor([2.0, 1.0, 0.0], device="meta")):
        q, rho = opm_drop_probabilities(torch.tensor([3.0, 1.0, 2.0], device="meta"), 0.5, 0.5, counts)
        assert q.device.type == rho.device.type == "meta" and q.shape == rho.shape == (3,)
    for mode in ("concat", "per_modality", "none"):
        assert opm_rescale(torch.tensor([0.5, 0.0], device="meta"), [4, 12], mode).device.type == "meta"


def test_concat_rescale_on_the_device_equals_the_plain_python_factor():
    for q in ([0.5, 0.0], [0.3, 0.9], [1.0, 1.0], [0.25, 0.0, 0.6]):
        dims = [4, 12, 7][:len(q)]
        qt = torch.tensor(q)
        got, n = count_synchronisations(lambda: opm_rescale(qt, dims, "concat"))
        theta = sum(d * float(x) for d, x in zip(dims, qt.double())) / sum(dims)
        assert n == 0 and got.tolist() == [float(torch.tensor(1.0 / max(1.0 - theta, 1e-6)))] * len(q)
