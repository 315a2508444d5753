"""AGM: responses (official M = 2 form, sum to the fused logits, M = 3 weights), head-only subset
logits = full re-encoding with absent inputs in eval mode, k / ratio formulas by hand, the
official sign, gradient scaling through the responses, running mean, training runs."""
import math

import pytest
import torch

from mmbalance.engine import Trainer
from mmbalance.methods.agm import (agm_coefficients, agm_output, agm_ratios, agm_responses, agm_scores,
                                   agm_subset_logits, running_mean_update)
from mmbalance.methods.base import ModelSpec, build_standard_model
from helpers import capture_step_grads, quick_config
from mmbalance.methods import create_method
from mmbalance.registry import ConfigError


def _model(fusion="concat", mods=("a", "v"), policy="input"):
    spec = ModelSpec(modalities=list(mods), num_classes=4, input_shapes={m: (6,) for m in mods},
                     encoders={m: ("mlp", {"hidden": [16, 8], "dropout": 0.1, "batchnorm": True}) for m in mods},
                     fusion=fusion, fusion_options={}, absent_policy=policy)
    torch.manual_seed(0)
    model = build_standard_model(spec)
    # give the BatchNorm layers non-trivial running statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model({m: torch.randn(32, 6) * 2 + 1 for m in mods})
    return model


def test_official_two_modality_form_and_sum_to_fused_logits():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 5, 3, generator=g)  # f(0,0), f(a,0), f(0,v), f(a,v) (bit 0 = a, bit 1 = v)
    m = agm_responses(f)
    assert torch.allclose(m[0], 0.5 * (f[3] - f[2] + f[1]), atol=1e-6)
    assert torch.allclose(m[1], 0.5 * (f[3] - f[1] + f[2]), atol=1e-6)
    assert torch.allclose(m.sum(0), f[3], atol=1e-6)  # responses sum to the fused logits
    me = agm_responses(f, include_empty=True)
    assert torch.allclose(me[0], 0.5 * (f[3] - f[2]) + 0.5 * (f[1] - f[0]), atol=1e-6)
    assert torch.allclose(me.sum(0), f[3] - f[0], atol=1e-6)


def test_three_modality_responses_mosei_weights_and_sum():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(8, 2, 3, generator=g)
    m = agm_responses(f)
    # modality 0: 1/3 f(0) + 1/6 [f(0,1) - f(1)] + 1/6 [f(0,2) - f(2)] + 1/3 [f(0,1,2) - f(1,2)]
    ref0 = f[1] / 3 + (f[3] - f[2]) / 6 + (f[5] - f[4]) / 6 + (f[7] - f[6]) / 3
    assert torch.allclose(m[0], ref0, atol=1e-6)
    assert torch.allclose(m.sum(0), f[7], atol=1e-6)


@pytest.mark.parametrize("fusion", ["concat", "film", "gated", "late"])
@pytest.mark.parametrize("policy", ["input", "feature"])
def test_head_only_subsets_equal_full_passes_with_absent_modalities(fusion, policy):
    mods = ("a", "v", "w") if fusion == "concat" else ("a", "v")
    model = _model(fusion, mods, policy)
    model.eval()
    x = {m: torch.randn(5, 6) for m in mods}
    with torch.no_grad():
        feats = model.encode_all(x)
        sub = agm_subset_logits(model, feats)
        for S in range(2 ** len(mods)):
            present = {m: torch.full((5,), bool(S >> i & 1)) for i, m in enumerate(mods)}
            ref = model(x, present).logits  # full model pass, absent modalities per the policy
            assert torch.allclose(sub[S], ref, atol=1e-5), (S, fusion, policy)
            if policy == "input":  # literally re-encode zeroed inputs
                xz = {m: (x[m] if S >> i & 1 else torch.zeros_like(x[m])) for i, m in enumerate(mods)}
                assert torch.allclose(sub[S], model(xz).logits, atol=1e-5)


def test_scores_ratios_and_coefficients_by_hand():
    resp = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # p_y(y=0): 0.5 and 0.75
    s = agm_scores(resp, torch.tensor([0]))
    assert torch.allclose(s, torch.tensor([math.log(2.0), -math.log(0.75)]), atol=1e-6)
    # floor at 1e-8
    assert math.isclose(float(agm_scores(torch.tensor([[[0.0, 100.0]]]), torch.tensor([0]))[0]),
                        -math.log(1e-8), rel_tol=1e-6)
    s = torch.tensor([0.5, 1.5])
    r = agm_ratios(s)
    assert torch.allclose(r, torch.tensor([math.exp(1.0), math.exp(-1.0)]))  # M=2: r_a = exp(s_v - s_a)
    s3 = torch.tensor([0.3, 0.6, 1.2])
    assert torch.allclose(agm_ratios(s3), torch.exp(1.5 * (s3.mean() - s3)))
    k = agm_coefficients(torch.tensor([1.2, 0.8]), torch.tensor([1.0, 1.0]), alpha=0.5)
    assert torch.allclose(k, torch.tensor([math.exp(0.5 * -0.2), math.exp(0.5 * 0.2)]))
    # the cap at 10 only limits boosting
    k = agm_coefficients(torch.tensor([0.0]), torch.tensor([50.0]), alpha=0.1)
    assert math.isclose(float(k[0]), math.exp(1.0), rel_tol=1e-6)


def test_official_sign_the_stronger_modality_is_damped():
    """With equal running scores (rbar = 1 for both), the modality with the lower loss score s
    (the one learning faster) has r > 1 and gets k < 1; the weaker one is boosted (k > 1).
    BalanceBenchmark's inverted ratio would do the opposite."""
    s = torch.tensor([0.4, 1.1])  # modality 0 is stronger
    k = agm_coefficients(agm_ratios(s), agm_ratios(torch.tensor([0.8, 0.8])), alpha=1.0)
    assert k[0] < 1.0 < k[1]
    # a modality whose instant ratio fell below its running reference gets boosted
    k = agm_coefficients(agm_ratios(torch.tensor([0.9, 0.9])), agm_ratios(torch.tensor([0.4, 1.1])), 1.0)
    assert k[0] > 1.0 > k[1]


def test_running_mean_over_all_iterations():
    S = torch.zeros(2)
    vals = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([2.0, 4.0])]
    for t, v in enumerate(vals, start=1):
        S = running_mean_update(S, v, t)
    assert torch.allclose(S, torch.stack(vals).mean(0))


def test_output_scales_the_gradient_through_each_response():
    g = torch.Generator().manual_seed(2)
    resp = torch.randn(2, 3, 4, generator=g).requires_grad_(True)
    y = torch.tensor([0, 3, 1])
    z = agm_output(resp, [0.25, 3.0])
    assert torch.allclose(z, resp.sum(0))
    torch.nn.functional.cross_entropy(z, y).backward()
    zz = resp.detach().sum(0).requires_grad_(True)
    torch.nn.functional.cross_entropy(zz, y).backward()
    assert torch.allclose(resp.grad[0], 0.25 * zz.grad) and torch.allclose(resp.grad[1], 3.0 * zz.grad)


def _cfg(**over):
    return quick_config("agm", epochs=1, **over)


def test_training_step_gradient_equals_manual_and_state():
    tr = Trainer(_cfg(**{"model.encoder_options": {"dropout": 0.0}, "method.fusion_grad_clip": None}))
    tr.model.train()
    batch = next(iter(tr.loader(tr.data.train, batch_size=64)))
    y = batch["label"]
    # manual: responses from full padded passes, first step: S = 0 -> rbar = 1
    model = tr.model
    out = model(batch["inputs"], batch["present"])
    sub = agm_subset_logits(model, out.features)
    resp = agm_responses(sub)
    k = agm_coefficients(agm_ratios(agm_scores(resp, y)), torch.ones(2), 1.0)
    model.zero_grad()
    torch.nn.functional.cross_entropy(agm_output(resp, k), y).backward()
    manual = {n: p.grad.clone() for n, p in model.named_parameters()}
    captured = capture_step_grads(tr, batch)
    for n in manual:
        assert torch.allclose(captured[n], manual[n], atol=1e-6), n
    diag = tr.method.epoch_diagnostics()
    assert math.isclose(diag["k_pix"], float(k[0]), rel_tol=1e-5)
    st = tr.method.state_dict()
    assert st["iteration"] == 1 and torch.allclose(st["score_mean"], agm_scores(resp, y))


def test_training_runs_three_modalities_and_fusions():
    res = Trainer(_cfg(**{"dataset.options": {"modalities": ["pix", "fou", "zer"]}})).fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    Trainer(_cfg(**{"model.fusion": "gated", "method.include_empty": True})).fit()



# ---------------------------------------------------------------------------------------------
# reference step at a non-trivial state, window boundaries, held coefficients, modes, resume
import copy

import torch.nn.functional as F

from helpers import tiny_data


def _trainer(data=None, **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("agm", epochs=1, **{"train.batch_size": 32, "optim.lr": 0.05, **over})
    return Trainer(cfg, data=data or tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0))


def _batch(tr, n=32, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=n, shuffle=True, seed=seed)))


def _plain_grads(model, batch):
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(batch["inputs"]).logits, batch["label"]).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _reference_step(model, batch, S, alpha, include_empty=False):
    """AGM's step written out for two modalities without the module's helpers (no BatchNorm, no
    dropout, so the padded passes need no eval mode): returns expected grads, k and s."""
    ref = copy.deepcopy(model)
    x, y = batch["inputs"], batch["label"]
    f_av = ref(x).logits
    f_a0 = ref({"a": x["a"], "v": torch.zeros_like(x["v"])}).logits
    f_0v = ref({"a": torch.zeros_like(x["a"]), "v": x["v"]}).logits
    f_00 = ref({"a": torch.zeros_like(x["a"]), "v": torch.zeros_like(x["v"])}).logits if include_empty else 0
    m_a = 0.5 * (f_av - f_0v + f_a0 - f_00)
    m_v = 0.5 * (f_av - f_a0 + f_0v - f_00)
    s = torch.stack([-torch.log(F.softmax(m, 1).gather(1, y[:, None]).clamp_min(1e-8)).mean() for m in (m_a, m_v)])
    s = s.detach()
    r = torch.stack([torch.exp(s[1] - s[0]), torch.exp(s[0] - s[1])])
    rbar = torch.stack([torch.exp(S[1] - S[0]), torch.exp(S[0] - S[1])])
    k = torch.exp(alpha * torch.clamp(rbar - r, max=10.0))
    z = (k[0] * m_a + (1 - k[0]) * m_a.detach()) + (k[1] * m_v + (1 - k[1]) * m_v.detach()) + f_00
    F.cross_entropy(z, y).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}, k, s


@pytest.mark.parametrize("include_empty", [False, True])
def test_second_step_gradients_equal_a_hand_written_reference(include_empty):
    tr = _trainer(alpha=0.7, fusion_grad_clip=None, include_empty=include_empty)
    tr.model.train()
    b1, b2 = _batch(tr, seed=1), _batch(tr, seed=2)
    _, _, s1 = _reference_step(tr.model, b1, torch.zeros(2), 0.7, include_empty)
    tr.method.training_step(b1)
    assert torch.allclose(tr.method.score_mean.cpu(), s1, atol=1e-5)  # S after one step = s_1
    expected, k, s2 = _reference_step(tr.model, b2, s1, 0.7, include_empty)
    assert (k - 1).abs().min() > 1e-3  # a real modulation in this step
    tr.method.epoch_diagnostics()
    got = capture_step_grads(tr, b2)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    diag = tr.method.epoch_diagnostics()
    assert diag["k_a"] == pytest.approx(float(k[0]), rel=1e-5) and diag["k_v"] == pytest.approx(float(k[1]), rel=1e-5)
    assert torch.allclose(tr.method.score_mean.cpu(), (s1 + s2) / 2, atol=1e-5) and tr.method.iteration == 2


@pytest.mark.parametrize("origin,active", [(0, {2, 3}), (1, {1, 2})])
def test_window_boundaries_and_epoch_origin(origin, active):
    """Window [2, 3]: with 0-based epochs 2 and 3 are modulated (1 and 4 not); counted from 1
    (official) the same numbers mean 0-based epochs 1 and 2."""
    tr = _trainer(modulation_start=2, modulation_end=3, epoch_origin=origin, fusion_grad_clip=None)
    batch = _batch(tr)
    for epoch in range(5):
        tr.method.score_mean.zero_()
        tr.method.iteration = 0
        tr.epoch = epoch
        tr.model.train()
        plain = _plain_grads(tr.model, batch)
        got = capture_step_grads(tr, batch)
        k = tr.method.epoch_diagnostics()
        same = all(torch.allclose(got[n], plain[n], atol=1e-6) for n in plain)
        if epoch in active:
            assert k["k_a"] != 1.0 and k["k_v"] != 1.0 and not same, epoch
        else:
            assert k["k_a"] == 1.0 and k["k_v"] == 1.0 and same, epoch
    with pytest.raises(ConfigError, match=r"^method 'agm' option 'epoch_origin' takes one of 0, 1, got 2$"):
        _trainer(epoch_origin=2)
    for bad, msg in ((dict(alpha=-0.5), "'alpha' takes a number >= 0, got -0.5"),
                     (dict(modulation_start=-1), "'modulation_start' takes an integer >= 0, got -1"),
                     (dict(modulation_end=1.5), "'modulation_end' takes an integer >= 0 or null, got 1.5"),
                     (dict(fusion_grad_clip=0), "'fusion_grad_clip' takes a number > 0 or null, got 0")):
        with pytest.raises(ConfigError) as e:
            create_method("agm", **bad)
        assert str(e.value) == f"method 'agm' option {msg}"
    assert create_method("agm", epoch_origin="1", modulation_end="null").epoch_origin == 1


def test_hold_after_window_keeps_the_last_coefficients():
    for hold in (False, True):
        tr = _trainer(modulation_end=0, hold_after_window=hold, fusion_grad_clip=None)
        b1, b2 = _batch(tr, seed=1), _batch(tr, seed=2)
        tr.model.train()
        tr.method.training_step(b1)
        d = tr.method.epoch_diagnostics()
        k0 = [d["k_a"], d["k_v"]]
        tr.epoch = 1  # after the window
        plain = _plain_grads(tr.model, b2)
        got = capture_step_grads(tr, b2)
        d = tr.method.epoch_diagnostics()
        k1 = [d["k_a"], d["k_v"]]
        same = all(torch.allclose(got[n], plain[n], atol=1e-6) for n in plain)
        if hold:
            assert k1 == pytest.approx(k0) and k0 != [1.0, 1.0] and not same
        else:
            assert k1 == [1.0, 1.0] and same


def test_held_coefficient_is_applied_to_the_gradient():
    tr = _trainer(modulation_end=0, hold_after_window=True, fusion_grad_clip=None)
    b1, b2 = _batch(tr, seed=1), _batch(tr, seed=2)
    tr.model.train()
    tr.method.training_step(b1)
    k0 = tr.method.last_k.clone()
    tr.epoch = 1
    ref = copy.deepcopy(tr.model)
    x, y = b2["inputs"], b2["label"]
    f_av = ref(x).logits
    f_a0 = ref({"a": x["a"], "v": torch.zeros_like(x["v"])}).logits
    f_0v = ref({"a": torch.zeros_like(x["a"]), "v": x["v"]}).logits
    m_a, m_v = 0.5 * (f_av - f_0v + f_a0), 0.5 * (f_av - f_a0 + f_0v)
    z = (k0[0] * m_a + (1 - k0[0]) * m_a.detach()) + (k0[1] * m_v + (1 - k0[1]) * m_v.detach())
    F.cross_entropy(z, y).backward()
    got = capture_step_grads(tr, b2)
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n


def test_conditional_clip_of_large_fusion_gradients():
    for clip in (None, 1.0, 0.5):
        tr = _trainer(fusion_grad_clip=clip)
        params = list(tr.model.parameters())
        for big in (False, True):
            for p in params:
                p.grad = torch.full_like(p, 0.01)
            tr.model.fusion.fc.weight.grad[0, 0] = -2.0 if big else 0.9
            before = [p.grad.clone() for p in params]
            tr.method._clip_if_large_fusion_grad()
            norm = float(torch.sqrt(sum((p.grad ** 2).sum() for p in params)))
            if big and clip is not None:
                assert norm == pytest.approx(clip, rel=1e-4)
            else:
                assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_absent_modality_passes_leave_train_mode_and_batchnorm_statistics():
    """The absent modality's feature comes from an eval-mode pass: after a step every module is
    in train mode again and the BatchNorm statistics moved exactly as one train-mode forward of
    the batch moves them."""
    data = tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0, batchnorm=True)
    tr = _trainer(data=data)
    batch = _batch(tr)
    tr.model.train()
    ref = copy.deepcopy(tr.model)
    with torch.no_grad():
        ref(batch["inputs"], batch["present"])
    tr.method.training_step(batch)
    assert all(m.training for m in tr.model.modules())
    got = tr.model.state_dict()
    for k, v in ref.state_dict().items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(got[k], v), k


def test_resume_state_round_trip_gives_the_same_next_step():
    kw = dict(modulation_end=0, hold_after_window=True, alpha=0.6)
    a = _trainer(**kw)
    b1, b2 = _batch(a, seed=1), _batch(a, seed=2)
    a.model.train()
    a.method.training_step(b1)
    b = _trainer(**kw)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    st = a.method.state_dict()
    assert st["iteration"] == 1 and st["last_k"] is not None
    b.method.load_state_dict(copy.deepcopy(st))
    for t in (a, b):
        t.epoch = 1
        t.model.train()
    ga, gb = capture_step_grads(a, b2), capture_step_grads(b, b2)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
    assert torch.equal(a.method.score_mean, b.method.score_mean) and b.method.iteration == 2


# ---------------------------------------------------------------------------------------------
# the conditional clip without a host-side branch
from mmbalance.methods.agm import clip_grad_norm_where_
from test_precision import count_synchronisations


@pytest.mark.parametrize("torch_api", ["get_total_norm", "fallback"])
def test_conditional_clip_on_the_device_is_clip_grad_norm_or_nothing(torch_api, monkeypatch):
    """Condition True: exactly ``clip_grad_norm_`` (bit-identical with the torch pieces it is
    made of; the fallback for older torch within rounding); False: the gradients untouched. The
    condition is never read on the host; parameters without a gradient are skipped."""
    if torch_api == "fallback":
        monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (4,), (3, 6), (2,)]
    grads = [torch.randn(s, generator=g) * 2.0 for s in shapes]
    for cond in (True, False):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes] + [torch.nn.Parameter(torch.zeros(3))]
        ref = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, q, t in zip(params, ref, grads):
            p.grad, q.grad = t.clone(), t.clone()
        _, n = count_synchronisations(lambda: clip_grad_norm_where_(params, 0.5, torch.tensor(cond)))
        assert n == 0 and params[-1].grad is None
        if cond:
            torch.nn.utils.clip_grad_norm_(ref, 0.5)
            total = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params[:-1])))
            assert total == pytest.approx(0.5, rel=1e-5)
        for p, q in zip(params, ref):
            if torch_api == "get_total_norm" or not cond:
                assert torch.equal(p.grad, q.grad)
            else:
                assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=0)
    clip_grad_norm_where_([torch.nn.Parameter(torch.zeros(2))], 1.0, torch.tensor(True))  # no gradient: no-op


# ---------------------------------------------------------------------------------------------
# corners found by mutation testing
def test_subset_logits_use_the_absent_features_they_are_given():
    """An explicit ``absent`` mapping stands for every absent modality in f(S) (not the model's
    own absent features); f(all) is the fusion of the features as they are."""
    model = _model("concat")
    model.eval()
    x = {m: torch.randn(5, 6) for m in ("a", "v")}
    with torch.no_grad():
        feats = model.encode_all(x)
        absent = {m: torch.full((1, f.shape[1]), 0.3 * (i + 1)) for i, (m, f) in enumerate(feats.items())}
        sub = agm_subset_logits(model, feats, absent)
        default = agm_subset_logits(model, feats)
        for S in range(4):
            fed = {m: (feats[m] if S >> i & 1 else absent[m].expand_as(feats[m])) for i, m in enumerate(("a", "v"))}
            assert torch.allclose(sub[S], model.fusion(fed)[0], atol=1e-6), S
        assert not torch.allclose(sub[1], default[1])  # the given absent features made a difference


def test_step_logs_scores_ratios_references_and_the_clip():
    """Diagnostics per step: s_m (the scores), r_m (instant ratios), rbar_m (ratios of the running
    mean *before* the step: 1 at the first step), k_m, and ``clipped`` (1 when the clip fired)."""
    tr = _trainer(alpha=0.7)
    b1, b2 = _batch(tr, seed=1), _batch(tr, seed=2)
    tr.model.train()
    _, _, s1 = _reference_step(tr.model, b1, torch.zeros(2), 0.7)
    tr.method.training_step(b1)
    d = tr.method.epoch_diagnostics()
    assert d["s_a"] == pytest.approx(float(s1[0]), rel=1e-5) and d["s_v"] == pytest.approx(float(s1[1]), rel=1e-5)
    assert d["rbar_a"] == pytest.approx(1.0) and d["rbar_v"] == pytest.approx(1.0)
    assert d["r_a"] == pytest.approx(math.exp(float(s1[1] - s1[0])), rel=1e-5)
    assert d["clipped"] in (0.0, 1.0)
    tr.method.training_step(b2)
    d = tr.method.epoch_diagnostics()
    assert d["rbar_a"] == pytest.approx(math.exp(float(s1[1] - s1[0])), rel=1e-5)
    assert d["rbar_v"] == pytest.approx(math.exp(float(s1[0] - s1[1])), rel=1e-5)


def test_clip_without_fusion_weight_gradients_is_a_no_op():
    """No fusion weight has a gradient (a frozen head): nothing is clipped, ``clipped`` is 0;
    a large fusion gradient logs ``clipped`` = 1."""
    tr = _trainer(fusion_grad_clip=0.5)
    params = list(tr.model.parameters())
    fusion = set(map(id, tr.model.fusion.parameters()))
    for p in params:
        p.grad = None if id(p) in fusion else torch.full_like(p, 3.0)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    tr.method._clip_if_large_fusion_grad()
    assert all((b is None and p.grad is None) or torch.equal(p.grad, b) for p, b in zip(params, before))
    assert tr.method.epoch_diagnostics()["clipped"] == 0.0
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    tr.model.fusion.fc.weight.grad[0, 0] = 2.0
    tr.method._clip_if_large_fusion_grad()
    assert tr.method.epoch_diagnostics()["clipped"] == 1.0


def test_loaded_state_lands_on_the_trainers_device_and_keeps_what_it_lacks():
    """Before setup (no trainer) the state loads on the CPU; after, on the trainer's device (a
    stand-in trainer on the ``meta`` device); entries missing from a state keep their values."""
    import types

    st = {"score_mean": torch.tensor([0.5, 1.0]), "last_k": torch.tensor([1.1, 0.9]), "iteration": 3}
    m = create_method("agm")
    m.load_state_dict(st)
    assert m.score_mean.device.type == "cpu" and torch.equal(m.last_k, st["last_k"]) and m.iteration == 3
    m.load_state_dict({})
    assert m.iteration == 3 and torch.equal(m.score_mean, st["score_mean"])
    m.trainer = types.SimpleNamespace(device=torch.device("meta"))
    m.load_state_dict(st)
    assert m.score_mean.device.type == "meta" and m.last_k.device.type == "meta"
