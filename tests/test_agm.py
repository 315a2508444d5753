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

