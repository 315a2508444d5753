"""OGM-GE: coefficients by hand, modulation scope (encoder of the dominant modality only, head
untouched), GE noise statistics, three modalities, and a short training run."""
import math

import pytest
import torch

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.base import ModelSpec, build_standard_model
from mmbalance.methods.ogm_ge import ogm_coefficients, ogm_modulate_, ogm_scores, select_parameters
from mmbalance.registry import ConfigError

from helpers import quick_config


def test_scores_are_batch_sums_of_true_class_probability():
    za = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])      # p_y: 0.5 (y=0), 0.75 (y=1)
    zv = torch.tensor([[math.log(4.0), 0.0], [0.0, 0.0]])      # p_y: 0.8, 0.5
    s = ogm_scores([za, zv], torch.tensor([0, 1]))
    assert torch.allclose(s, torch.tensor([1.25, 1.3]), atol=1e-6)


def test_coefficients_official_branch_both_orders():
    alpha = 0.8
    # visual dominant: rho_v = 3/2 > 1 -> k_v = 1 - tanh(0.8 * 1.5), k_a = 1
    k, rho = ogm_coefficients(torch.tensor([2.0, 3.0]), alpha)
    assert torch.allclose(rho, torch.tensor([2 / 3, 1.5]))
    assert k[0] == 1.0
    assert math.isclose(float(k[1]), 1 - math.tanh(0.8 * 1.5), rel_tol=1e-6)
    # audio dominant: rho_a = 4 -> k_a = 1 - tanh(3.2)
    k, rho = ogm_coefficients(torch.tensor([4.0, 1.0]), alpha)
    assert math.isclose(float(k[0]), 1 - math.tanh(3.2), rel_tol=1e-6) and k[1] == 1.0
    # official form: just above 1 the coefficient already drops to ~1 - tanh(alpha)
    k, _ = ogm_coefficients(torch.tensor([1.001, 1.0]), alpha)
    assert math.isclose(float(k[0]), 1 - math.tanh(0.8 * 1.001), rel_tol=1e-6)
    # tie: nobody modulated
    k, _ = ogm_coefficients(torch.tensor([1.0, 1.0]), alpha)
    assert k.tolist() == [1.0, 1.0]


def test_coefficients_ratio_offset():
    k, rho = ogm_coefficients(torch.tensor([2.0, 3.0]), 0.8, ratio_offset=True)
    assert k[0] == 1.0
    assert math.isclose(float(k[1]), 1 - math.tanh(0.8 * 0.5), rel_tol=1e-6)
    k, _ = ogm_coefficients(torch.tensor([1.001, 1.0]), 0.8, ratio_offset=True)
    assert float(k[0]) > 0.999  # smooth at rho = 1


def test_coefficients_three_modalities_ratio_to_mean_of_others():
    s = torch.tensor([6.0, 2.0, 4.0])
    k, rho = ogm_coefficients(s, 0.5)
    assert torch.allclose(rho, torch.tensor([6 / 3, 2 / 5, 4 / 4]))
    assert math.isclose(float(k[0]), 1 - math.tanh(0.5 * 2.0), rel_tol=1e-6)
    assert k[1] == 1.0 and k[2] == 1.0  # rho = 1 exactly: not > 1


def _tiny_model(fusion="concat", mods=("a", "v")):
    spec = ModelSpec(modalities=list(mods), num_classes=3, input_shapes={m: (5,) for m in mods},
                     encoders={m: ("mlp", {"hidden": [8, 6], "dropout": 0.0}) for m in mods},
                     fusion=fusion, fusion_options={}, absent_policy="input")
    return build_standard_model(spec)


def test_only_dominant_encoder_weights_scaled_head_untouched():
    torch.manual_seed(0)
    model = _tiny_model()
    x = {"a": torch.randn(16, 5), "v": torch.randn(16, 5)}
    y = torch.randint(0, 3, (16,))
    torch.nn.functional.cross_entropy(model(x).logits, y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    k = 0.25
    ogm_modulate_(select_parameters(model.encoders["a"], "conv_linear_weights"), k, ge=False)
    ogm_modulate_(select_parameters(model.encoders["v"], "conv_linear_weights"), 1.0, ge=False)
    for n, p in model.named_parameters():
        if n.startswith("encoders.a.") and p.dim() >= 2:
            assert torch.allclose(p.grad, k * before[n]), n
        else:  # biases of a, all of v, and the fusion head: unchanged
            assert torch.equal(p.grad, before[n]), n
    # scope "all" also scales the biases
    ogm_modulate_(select_parameters(model.encoders["v"], "all"), 0.5, ge=False)
    for n, p in model.named_parameters():
        if n.startswith("encoders.v."):
            assert torch.allclose(p.grad, 0.5 * before[n]), n


def test_ge_noise_has_the_gradient_std():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.zeros(400, 500))
    p.grad = torch.randn(400, 500, generator=g) * 3.0 + 1.0
    orig = p.grad.clone()
    std = float(orig.std())
    k = 0.3
    ogm_modulate_([p], k, ge=True, generator=g)
    noise = p.grad - k * orig
    assert abs(float(noise.mean())) < 0.02 * std
    assert abs(float(noise.std()) / std - 1.0) < 0.01
    # the noise is independent of the gradient
    corr = torch.corrcoef(torch.stack([noise.flatten(), orig.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.01


def _cfg(**over):
    return quick_config("ogm_ge", epochs=2, **over)


def test_training_step_scales_dominant_encoder_only():
    """One real step through the hook: with GE off the weight update of the damped encoder equals
    k times the plain step's (plain SGD, no momentum / weight decay), everything else equal."""
    over = {"optim.momentum": 0.0, "optim.weight_decay": 0.0, "method.ge": False, "train.batch_size": 256,
            "model.encoder_options": {"dropout": 0.0}}
    tr = Trainer(_cfg(**over))
    ref = Trainer(_cfg(**{**over, "method.modulation_start": 1}))  # epoch 0 outside the window: plain joint step
    ref.model.load_state_dict(tr.model.state_dict())
    batch = next(iter(tr.loader(tr.data.train, batch_size=256)))
    w0 = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    for t in (tr, ref):
        t.model.train()
        t.method.training_step(batch)
    k = {m: v[0] for m, v in tr.method._logs.items() if m.startswith("k_")}
    assert min(k.values()) < 1.0 and max(k.values()) == 1.0
    for (n, p), (_, q) in zip(tr.model.named_parameters(), ref.model.named_parameters()):
        d, dref = p.detach() - w0[n], q.detach() - w0[n]
        owner = n.split(".")[1] if n.startswith("encoders.") else None
        scale = k[f"k_{owner}"] if owner is not None and p.dim() >= 2 else 1.0
        assert torch.allclose(d, scale * dref, atol=1e-7, rtol=1e-4), n


def test_runs_with_three_modalities_and_film():
    tr = Trainer(_cfg(**{"dataset.options": {"modalities": ["pix", "fou", "zer"]}, "train.epochs": 1}))
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    tr2 = Trainer(_cfg(**{"model.fusion": "film", "train.epochs": 1}))
    tr2.fit()


def test_bad_options_are_one_line_config_errors():
    for bad, msg in (({"scope": "everything"}, "'scope' takes one of 'conv_linear_weights', 'all', got 'everything'"),
                     ({"alpha": -0.1}, "'alpha' takes a number >= 0, got -0.1"),
                     ({"modulation_start": -1}, "'modulation_start' takes an integer >= 0, got -1"),
                     ({"modulation_end": "x"}, "'modulation_end' takes an integer >= 0, got 'x'"),
                     ({"ge": "sometimes"}, "'ge' takes true/false, got 'sometimes'")):
        with pytest.raises(ConfigError) as e:
            create_method("ogm_ge", **bad)
        assert str(e.value) == f"method 'ogm_ge' option {msg}"
    with pytest.raises(ValueError, match="unknown scope"):
        select_parameters(torch.nn.Linear(2, 2), "everything")
    with pytest.raises(ValueError, match="two modalities"):
        ogm_coefficients(torch.ones(1), alpha=0.8)



# ---------------------------------------------------------------------------------------------
# reference step (coefficient options, GE noise from the seeded generator), window, replay
import copy

import torch.nn.functional as F

from helpers import capture_step_grads, tiny_data


def _trainer(**method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("ogm_ge", epochs=1, **{"train.batch_size": 32, "train.seed": 3, **over})
    return Trainer(cfg, data=tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0, signal={"a": 2.0, "v": 0.2}))


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=32, shuffle=True, seed=seed)))


def _reference(model, batch, alpha, ratio_offset, scope, seed, step, ge=True):
    """OGM-GE written out for two modalities: the fused-loss gradient, the dominant encoder's
    selected gradients times k, then N(0, std(g)^2) per selected tensor of every encoder, drawn
    from a generator seeded by (seed, global step) in modality and parameter order."""
    ref = copy.deepcopy(model)
    out = ref(batch["inputs"])
    y = batch["label"]
    F.cross_entropy(out.logits, y).backward()
    s = [float(F.softmax(out.unimodal_logits[m].detach(), 1).gather(1, y[:, None]).sum()) for m in ("a", "v")]
    rho = [s[0] / s[1], s[1] / s[0]]
    k = [1.0 - math.tanh(alpha * ((r - 1.0) if ratio_offset else r)) if r > 1 else 1.0 for r in rho]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for i, m in enumerate(("a", "v")):
        for n, p in ref.encoders[m].named_parameters():
            if scope == "all" or p.dim() >= 2:
                full = f"encoders.{m}.{n}"
                g = grads[full]
                std = float(g.std()) + 1e-8
                grads[full] = k[i] * g + (std * torch.randn(g.shape, generator=gen) if ge else 0)
    return grads, k, rho


@pytest.mark.parametrize("ratio_offset,scope", [(False, "conv_linear_weights"), (True, "all")])
def test_training_step_equals_a_hand_written_reference(ratio_offset, scope):
    tr = _trainer(alpha=0.5, ratio_offset=ratio_offset, scope=scope)
    batch = _batch(tr)
    tr.global_step = 7
    tr.model.train()
    expected, k, rho = _reference(tr.model, batch, 0.5, ratio_offset, scope, seed=3, step=7)
    assert min(k) < 1.0  # one modality is damped in this batch
    got = capture_step_grads(tr, batch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert [d["k_a"], d["k_v"]] == pytest.approx(k, rel=1e-5)
    assert [d["rho_a"], d["rho_v"]] == pytest.approx(rho, rel=1e-5)
    # the noise depends on the global step (and replays for the same one)
    tr.global_step = 8
    other = capture_step_grads(tr, batch)
    name = next(n for n, p in tr.model.named_parameters() if n.startswith("encoders.a.") and p.dim() >= 2)
    assert not torch.allclose(other[name], got[name])


def test_ge_off_adds_no_noise():
    tr = _trainer(ge=False)
    batch = _batch(tr)
    tr.model.train()
    expected, k, _ = _reference(tr.model, batch, 0.8, False, "conv_linear_weights", 3, 0, ge=False)
    got = capture_step_grads(tr, batch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_window_boundaries():
    """Window [1, 2]: epochs 0 and 3 are plain joint training (no scaling, no noise, k = 1),
    epochs 1 and 2 are modulated."""
    tr = _trainer(modulation_start=1, modulation_end=2)
    batch = _batch(tr)
    for epoch in range(4):
        tr.epoch = epoch
        tr.model.train()
        plain = copy.deepcopy(tr.model)
        F.cross_entropy(plain(batch["inputs"]).logits, batch["label"]).backward()
        got = capture_step_grads(tr, batch)
        same = all(torch.allclose(got[n], p.grad, atol=1e-6) for n, p in plain.named_parameters())
        d = tr.method.epoch_diagnostics()
        if epoch in (1, 2):
            assert not same and min(d["k_a"], d["k_v"]) < 1.0, epoch
        else:
            assert same and d["k_a"] == d["k_v"] == 1.0, epoch


def test_a_resumed_step_replays_the_same_noise():
    a, b = _trainer(), _trainer()
    b.model.load_state_dict(a.model.state_dict())
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    batch = _batch(a)
    for t in (a, b):
        t.global_step = 12
        t.model.train()
    torch.manual_seed(0)
    ga = capture_step_grads(a, batch)
    torch.manual_seed(1)  # the global RNG plays no part
    gb = capture_step_grads(b, batch)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


# ---------------------------------------------------------------------------------------------
# no host synchronisation: the coefficient and the noise scale stay on the device
from test_precision import count_synchronisations


def test_device_coefficient_modulates_as_the_float_rule_without_reading_it_back():
    """k as a 0-d device tensor: g <- k g + std(g) N(0, 1), bit-identical to the scalar rule
    written out (k and std(g) + 1e-8 as Python floats, noise from the same seeded generator;
    a one-element tensor's std counts as 1e-8), and no host synchronisation."""
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(30, 7, generator=g) * 3.0, torch.randn(7, generator=g), torch.randn(1, generator=g)]
    k = torch.tensor(0.3173)
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, t in zip(params, grads):
        p.grad = t.clone()
    _, n = count_synchronisations(lambda: ogm_modulate_(params, k, True, torch.Generator().manual_seed(5)))
    assert n == 0
    noise_gen = torch.Generator().manual_seed(5)
    for p, t in zip(params, grads):
        std = float(t.std()) + 1e-8 if t.numel() > 1 else 1e-8
        want = t.clone().mul_(float(k)).add_(torch.randn(t.shape, generator=noise_gen), alpha=std)
        assert torch.equal(p.grad, want)
    # without GE: exactly k * g
    for p, t in zip(params, grads):
        p.grad = t.clone()
    ogm_modulate_(params, k, ge=False)
    assert all(torch.equal(p.grad, t * float(k)) for p, t in zip(params, grads))


# ---------------------------------------------------------------------------------------------
# found by mutation testing (docs/testing.md)
def test_coefficients_depend_only_on_the_ratio_of_the_scores():
    """Scores below 1 (a small batch, many classes): the same rho and k as the scores x 10."""
    for s in ([0.2, 0.3], [0.05, 0.01], [0.6, 0.2, 0.4]):
        k, rho = ogm_coefficients(torch.tensor(s), 0.8)
        k10, rho10 = ogm_coefficients(10 * torch.tensor(s), 0.8)
        assert torch.allclose(rho, rho10, rtol=1e-6) and torch.allclose(k, k10, rtol=1e-6), s
    k, rho = ogm_coefficients(torch.tensor([0.2, 0.3]), 0.8)
    assert torch.allclose(rho, torch.tensor([2 / 3, 1.5]))
    assert math.isclose(float(k[1]), 1 - math.tanh(0.8 * 1.5), rel_tol=1e-6)


def test_step_reports_its_loss_and_the_batch_mean_scores():
    tr = _trainer()
    batch = _batch(tr)
    tr.model.train()
    y = batch["label"]
    with torch.no_grad():
        out = tr.model(batch["inputs"])
        loss = float(F.cross_entropy(out.logits, y))
        mean_p = {m: float(F.softmax(out.unimodal_logits[m], 1).gather(1, y[:, None]).mean()) for m in ("a", "v")}
    res = tr.method.training_step(batch)
    assert float(res["loss"]) == pytest.approx(loss, rel=1e-5)
    d = tr.method.epoch_diagnostics()
    assert [d["score_a"], d["score_v"]] == pytest.approx([mean_p["a"], mean_p["v"]], rel=1e-5)
