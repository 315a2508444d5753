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
    ref = Trainer(_cfg(**{**over, "method.modulation_end": -1}))  # window closed: plain joint step
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


def test_bad_scope_is_a_config_error():
    with pytest.raises(ConfigError):
        create_method("ogm_ge", scope="everything")

