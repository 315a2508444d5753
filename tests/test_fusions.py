import pytest
import torch

from mmbalance.models import create_fusion, list_fusions
from mmbalance.registry import ConfigError

C = 5
B = 4


def feats(dims, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, d, generator=g) for m, d in dims.items()}


DIMS = {2: {"a": 6, "b": 3}, 3: {"a": 6, "b": 3, "c": 4}}


@pytest.mark.parametrize("M", [2, 3])
@pytest.mark.parametrize("name", ["concat", "sum", "late", "shared_head", "film", "gated"])
def test_every_fusion_shapes_and_unimodal_logits(name, M):
    dims = DIMS[M]
    f = create_fusion(name, dims, C)
    z, zm = f(feats(dims))
    assert z.shape == (B, C)
    assert set(zm) == set(dims)
    for m in dims:
        assert zm[m].shape == (B, C)
    # the unimodal logits of m depend on h_m: changing h_m changes z_m
    x = feats(dims)
    x2 = dict(x)
    first = list(dims)[1]
    x2[first] = x[first] + 1.0
    _, zm2 = f(x2)
    assert not torch.allclose(zm[first], zm2[first])
    # backprop reaches every modality's features through the fused logits
    xs = {m: v.clone().requires_grad_(True) for m, v in feats(dims).items()}
    z, _ = f(xs)
    z.sum().backward()
    assert all(xs[m].grad is not None and xs[m].grad.abs().sum() > 0 for m in dims)


@pytest.mark.parametrize("M", [2, 3])
def test_concat_unimodal_rule(M):
    dims = DIMS[M]
    f = create_fusion("concat", dims, C)
    x = feats(dims)
    z, zm = f(x)
    W, b = f.fc.weight, f.fc.bias
    start = 0
    total = torch.zeros(B, C)
    for m, d in dims.items():
        expect = x[m] @ W[:, start:start + d].T + b / M
        assert torch.allclose(zm[m], expect, atol=1e-6)
        total += expect
        start += d
    # with the shared bias the unimodal logits sum to the fused logits
    assert torch.allclose(total, z, atol=1e-5)
    full = create_fusion("concat", dims, C, unimodal_bias="full")
    full.load_state_dict(f.state_dict())
    _, zf = full(x)
    m0 = list(dims)[0]
    assert torch.allclose(zf[m0], zm[m0] + b * (1 - 1 / M), atol=1e-6)


def test_sum_and_late_rules():
    dims = DIMS[3]
    x = feats(dims)
    s = create_fusion("sum", dims, C)
    z, zm = s(x)
    for m in dims:
        assert torch.allclose(zm[m], s.heads[m](x[m]))
    assert torch.allclose(z, sum(zm.values()), atol=1e-6)
    late = create_fusion("late", dims, C)
    late.load_state_dict(s.state_dict())
    zl, _ = late(x)
    assert torch.allclose(zl, z / 3, atol=1e-6)


def test_shared_head_projects_unequal_widths_and_shares_the_head():
    dims = {"a": 6, "b": 3}
    f = create_fusion("shared_head", dims, C)
    assert f.common_dim == 6
    assert isinstance(f.proj["a"], torch.nn.Identity) and isinstance(f.proj["b"], torch.nn.Linear)
    x = feats(dims)
    z, zm = f(x)
    assert torch.allclose(zm["a"], f.head(x["a"]))
    assert torch.allclose(zm["b"], f.head(f.proj["b"](x["b"])))
    assert torch.allclose(z, (zm["a"] + zm["b"]) / 2, atol=1e-6)


@pytest.mark.parametrize("name", ["film", "gated"])
def test_conditioned_fusions_zero_the_others(name):
    dims = DIMS[3]
    f = create_fusion(name, dims, C)
    x = feats(dims)
    z, zm = f(x)
    for m in dims:
        only = {n: (v if n == m else torch.zeros_like(v)) for n, v in x.items()}
        assert torch.allclose(zm[m], f.fuse(only), atol=1e-6)
    assert torch.allclose(z, f.fuse(x))


def test_film_two_modalities_is_feature_wise_affine():
    dims = {"a": 4, "b": 3}
    f = create_fusion("film", dims, C)
    x = feats(dims)
    gamma, beta = f.film["b"](x["a"]).chunk(2, dim=1)
    assert torch.allclose(f.fuse(x), f.out(gamma * x["b"] + beta), atol=1e-6)


def test_film_and_gated_need_two_modalities_and_valid_condition():
    with pytest.raises(ConfigError, match="at least 2"):
        create_fusion("film", {"a": 3}, C)
    with pytest.raises(ConfigError, match="condition"):
        create_fusion("gated", {"a": 3, "b": 2}, C, condition="zzz")


def test_unknown_fusion_and_option_list_valid_names():
    with pytest.raises(ConfigError) as e:
        create_fusion("nope", {"a": 3}, C)
    for n in list_fusions():
        assert n in str(e.value)
    with pytest.raises(ConfigError, match="valid options"):
        create_fusion("concat", {"a": 3}, C, bogus=1)


def test_fusion_options_are_typed_one_line_errors():
    dims = {"a": 3, "b": 2}
    for name, bad, msg in (("concat", dict(unimodal_bias="half"), "'unimodal_bias' takes one of 'share', 'full', got 'half'"),
                           ("shared_head", dict(combine="max"), "'combine' takes one of 'mean', 'sum', got 'max'"),
                           ("shared_head", dict(common_dim=0), "'common_dim' takes an integer >= 1 or null, got 0"),
                           ("gated", dict(hidden_dim=-4), "'hidden_dim' takes an integer >= 1 or null, got -4"),
                           ("gated", dict(unimodal="others"), "'unimodal' takes one of 'zero_others', 'self', got 'others'")):
        with pytest.raises(ConfigError) as e:
            create_fusion(name, dims, C, **bad)
        assert str(e.value) == f"fusion '{name}' option {msg}"
    assert create_fusion("shared_head", dims, C, common_dim="8").common_dim == 8
    assert create_fusion("gated", dims, C, hidden_dim="null", unimodal="self").hidden == 3


@pytest.mark.parametrize("M", [2, 3])
def test_gated_self_gating_unimodal_rule(M):
    dims = DIMS[M]
    f = create_fusion("gated", dims, C, unimodal="self")
    x = feats(dims)
    z, zm = f(x)
    c, targets = f.condition, f.targets
    assert torch.allclose(z, f.fuse(x))
    u = [f.gate[t](x[c]) for t in targets]
    assert torch.allclose(zm[c], f.out(torch.cat([torch.sigmoid(v) * v for v in u], 1)), atol=1e-6)
    t0 = targets[0]
    v = f.value[t0](x[t0])
    blocks = [torch.sigmoid(v) * v] + [torch.zeros(B, f.hidden)] * (len(targets) - 1)
    assert torch.allclose(zm[t0], f.out(torch.cat(blocks, 1)), atol=1e-6)


def test_model_absent_policy_choices():
    from typing import get_args

    from mmbalance.models.model import ABSENT_POLICIES, AbsentPolicy, MultimodalModel

    assert ABSENT_POLICIES == get_args(AbsentPolicy) == ("input", "feature")
    enc = {"a": torch.nn.Identity()}
    with pytest.raises(ValueError, match="unknown absent_policy 'zeros'"):
        MultimodalModel(enc, create_fusion("concat", {"a": 3}, C), {"a": (3,)}, absent_policy="zeros")
