"""The additive shortcut of exact Shapley valuation (evaluation/contribution.py): for fusions whose
fused logits are a sum of per-modality terms, every subset's logits are a 0/1 combination of terms
computed once. It must equal the general path (the fusion called on substituted features) and
the model's own ``fuse_subset``, be taken exactly for the eligible fusions, and keep argmax's
first-maximum rule."""
from __future__ import annotations

import math

import pytest
import torch

from mmbalance.evaluation import contribution as contrib
from mmbalance.evaluation.contribution import (AdditiveHead, additive_head, argmax_equals, batch_contributions,
                                               iter_subset_logits, modality_contributions, subset_masks,
                                               subset_values)
from mmbalance.evaluation.shapley import _exact_integer_product, shapley_integer_matrix, shapley_numerators
from mmbalance.methods.base import ModelSpec, build_standard_model
from mmbalance.models.fusions import ConcatFusion

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def float64_default():
    """Float64 models (exactness at float64 tolerance). The model builds its zero inputs for
    the ``input`` policy in the default dtype, so that is float64 too; float32 tests reset it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

#: every registered fusion whose fused logits are additive over modalities (with options that change it)
ADDITIVE = [("concat", {}), ("concat", {"unimodal_bias": "full"}), ("sum", {}), ("late", {}),
            ("shared_head", {}), ("shared_head", {"combine": "sum"}), ("shared_head", {"common_dim": 5})]
GENERAL = [("film", {}), ("gated", {}), ("gated", {"unimodal": "self"})]


def model_for(M, fusion, options=None, policy="input", classes=4, dim=5, seed=0, dtype=torch.float64):
    """M MLP encoders of *unequal* widths (shared_head then projects), BatchNorm with non-trivial
    running statistics (so the ``input`` policy's absent feature is not zero), eval mode."""
    torch.manual_seed(seed)
    mods = [f"m{k}" for k in range(M)]
    spec = ModelSpec(modalities=mods, num_classes=classes, input_shapes={m: (dim,) for m in mods},
                     encoders={m: ("mlp", {"hidden": (6 + k,), "batchnorm": True}) for k, m in enumerate(mods)},
                     fusion=fusion, fusion_options=dict(options or {}), absent_policy=policy)
    model = build_standard_model(spec).to(dtype)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model({m: torch.randn(16, dim, dtype=dtype) * 2 + 1 for m in mods})
    return model.eval(), mods


def batch_for(mods, n=20, dim=5, classes=4, seed=1, missing=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    present = {m: torch.ones(n, dtype=torch.bool) for m in mods}
    if missing:  # every modality missing for some samples, never all of one sample
        for k, m in enumerate(mods):
            present[m][k::len(mods) + 1] = False
    return {"inputs": {m: torch.randn(n, dim, generator=g, dtype=dtype) for m in mods},
            "label": torch.randint(0, classes, (n,), generator=g), "index": torch.arange(n), "present": present}


def features_for(model, batch):
    """What batch_contributions hands to the subset logits: encoder features, the data's missing
    samples replaced by the absent feature."""
    with torch.no_grad():
        feats = {m: model.encoders[m](x) for m, x in batch["inputs"].items()}
        absent = model.absent_features(feats)
        for m, p in batch["present"].items():
            feats[m] = torch.where(p.view(-1, 1), feats[m], absent[m].expand_as(feats[m]))
    return feats, absent


def all_logits(model, feats, absent, path, max_rows=65536):
    with torch.no_grad():
        chunks = list(iter_subset_logits(model, feats, absent, max_rows=max_rows, path=path))
    starts = [s for s, _ in chunks]
    z = torch.cat([c for _, c in chunks])
    assert starts[0] == 1 and z.shape[0] == 2 ** len(model.modalities) - 1  # every non-empty subset, in order
    return z


class CallCounter:
    """Counts forward calls of a module through a forward hook."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.calls += 1


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("policy", ["input", "feature"])
@pytest.mark.parametrize("fusion,options", ADDITIVE)
@pytest.mark.parametrize("M", [2, 3, 4, 5, 6])
def test_shortcut_equals_general_path_and_fuse_subset(M, fusion, options, policy):
    model, mods = model_for(M, fusion, options, policy, seed=M)
    batch = batch_for(mods, seed=M)
    feats, absent = features_for(model, batch)
    fast = all_logits(model, feats, absent, "additive")
    slow = all_logits(model, feats, absent, "general")
    assert fast.dtype == slow.dtype == torch.float64
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-12)
    # the model's own per-subset API, one call per subset
    with torch.no_grad():
        for S in range(1, 2**M):
            keep = [m for i, m in enumerate(mods) if S >> i & 1]
            ref = model.fuse_subset(feats, keep, absent).logits
            assert torch.allclose(fast[S - 1], ref, rtol=1e-10, atol=1e-12), S
    # values and contributions: identical (integer game), at the end-to-end level too
    assert torch.equal(subset_values(model, feats, batch["label"], absent, path="additive"),
                       subset_values(model, feats, batch["label"], absent, path="general"))
    num_fast = modality_contributions(model, [batch], numerators=True, path="additive")
    num_slow = modality_contributions(model, [batch], numerators=True, path="general")
    assert torch.equal(num_fast, num_slow)
    # efficiency: sums to v(all) = M * 1[full model right] (all present modalities, the rest absent)
    full = subset_values(model, feats, batch["label"], absent)[-1]
    assert torch.equal(num_fast.sum(1), full.long() * math.factorial(M))


@pytest.mark.parametrize("fusion,options", ADDITIVE)
def test_missing_modality_is_absent_in_every_subset_of_the_shortcut(fusion, options):
    # a sample missing m0 in the data: the subsets with and without m0 have the same logits
    model, mods = model_for(3, fusion, options, "input")
    batch = batch_for(mods)
    feats, absent = features_for(model, batch)
    z = all_logits(model, feats, absent, "additive")
    gone = ~batch["present"]["m0"]
    assert gone.any()
    for S in range(2, 8, 2):  # S without m0 (bit 0) vs S | 1
        a, b = z[S - 1][gone], z[(S | 1) - 1][gone]
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(z[S - 1][~gone], z[(S | 1) - 1][~gone])  # present: m0 matters


@pytest.mark.parametrize("fusion,options", ADDITIVE[:3])
def test_chunking_does_not_change_the_logits(fusion, options):
    model, mods = model_for(4, fusion, options)
    batch = batch_for(mods)
    feats, absent = features_for(model, batch)
    one = all_logits(model, feats, absent, "additive")
    for path in ("additive", "general"):
        many = all_logits(model, feats, absent, path, max_rows=3 * 20)  # 3 subsets per chunk
        assert torch.allclose(many, one, rtol=1e-10, atol=1e-12)


def test_float32_shortcut_agrees_with_the_general_path():
    torch.set_default_dtype(torch.float32)
    model, mods = model_for(6, "concat", dtype=torch.float32, classes=10)
    batch = batch_for(mods, n=200, classes=10, dtype=torch.float32)
    feats, absent = features_for(model, batch)
    fast = all_logits(model, feats, absent, "additive")
    slow = all_logits(model, feats, absent, "general")
    assert fast.dtype == torch.float32
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-5)
    assert torch.equal(modality_contributions(model, [batch], numerators=True),
                       modality_contributions(model, [batch], numerators=True, path="general"))


def test_autocast_keeps_the_shortcut_sums_in_float32():
    torch.set_default_dtype(torch.float32)
    model, mods = model_for(3, "concat", dtype=torch.float32)
    batch = batch_for(mods, dtype=torch.float32)
    feats, absent = features_for(model, batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = all_logits(model, feats, absent, "additive")
        ref = all_logits(model, feats, absent, "general")
        phi = batch_contributions(model, batch["inputs"], batch["present"], batch["label"])
    assert z.dtype == torch.float32 and ref.dtype == torch.bfloat16
    assert torch.allclose(z, ref.float(), rtol=0.05, atol=0.05)  # bf16 terms, float32 sums
    assert phi.shape == (20, 3) and torch.allclose(phi.sum(1) % 1, torch.zeros(20, dtype=phi.dtype))


# ----------------------------------------------------------------------------- which path runs


@pytest.mark.parametrize("fusion,options", ADDITIVE)
def test_shortcut_never_calls_the_fusion(fusion, options):
    model, mods = model_for(4, fusion, options)
    assert additive_head(model.fusion) is not None
    batch = batch_for(mods)
    counter = CallCounter(model.fusion)
    modality_contributions(model, [batch, batch])
    assert counter.calls == 0
    modality_contributions(model, [batch, batch], path="general")  # the hook does count calls
    assert counter.calls == 2


@pytest.mark.parametrize("fusion,options", GENERAL)
def test_other_fusions_take_the_general_path(fusion, options):
    model, mods = model_for(4, fusion, options)
    assert additive_head(model.fusion) is None
    batch = batch_for(mods)
    feats, absent = features_for(model, batch)
    counter = CallCounter(model.fusion)
    phi = modality_contributions(model, [batch, batch])
    assert counter.calls == 2  # one stacked call for the 15 subsets of each batch
    with torch.no_grad():  # and the general path is the model's per-subset logits
        z = all_logits(model, feats, absent, "general")
        for S in (1, 6, 15):
            keep = [m for i, m in enumerate(mods) if S >> i & 1]
            assert torch.allclose(z[S - 1], model.fuse_subset(feats, keep, absent).logits, rtol=1e-10, atol=1e-12)
    assert phi.shape == (40, 4)
    with pytest.raises(ValueError, match="no additive head"):
        next(iter_subset_logits(model, feats, absent, path="additive"))


def test_only_the_exact_class_or_an_opt_in_is_additive():
    dims = {"a": 3, "b": 4}

    class Doubled(ConcatFusion):  # overrides forward: must not inherit the shortcut
        def forward(self, features):
            z, zm = super().forward(features)
            return 2 * z, zm

    assert additive_head(ConcatFusion(dims, 3)) is not None
    assert additive_head(Doubled(dims, 3)) is None

    class OptIn(Doubled):
        def additive_head(self):
            base = contrib._concat_head(self)
            return AdditiveHead(base.term, base.bias, scale=2.0)

    torch.manual_seed(0)
    f = OptIn(dims, 3).double()
    model, mods = model_for(2, "concat")
    model.fusion = OptIn({m: model.feature_dim(m) for m in mods}, 4).double()
    feats, absent = features_for(model, batch_for(mods))
    assert torch.allclose(all_logits(model, feats, absent, "additive"), all_logits(model, feats, absent, "general"),
                          rtol=1e-10, atol=1e-12)
    assert additive_head(f).scale == 2.0


# ----------------------------------------------------------------------------- pieces


def test_subset_masks_bits():
    masks = subset_masks(3)
    assert masks.shape == (8, 3) and masks.dtype == torch.bool
    assert masks[0].tolist() == [False, False, False] and masks[5].tolist() == [True, False, True]
    assert masks[6].tolist() == [False, True, True] and bool(masks[7].all())
    masks[0] = True  # a copy: the cached table behind it is unchanged
    assert not subset_masks(3)[0].any()


@pytest.mark.parametrize("layout", ["BC", "CB"])
def test_argmax_equals_matches_argmax_with_ties(layout):
    g = torch.Generator().manual_seed(0)
    k, B, C = 5, 40, 6
    z = torch.randint(0, 3, (k, B, C), generator=g).float()  # many exact ties between classes
    z[0] = torch.randn(B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    if layout == "CB":  # the shortcut's layout: a transposed view of (k, C, B)
        z = z.transpose(1, 2).contiguous().transpose(1, 2)
        assert z.stride(-1) != 1
    expected = z.argmax(-1) == y
    got = argmax_equals(z, y)
    assert torch.equal(got, expected)
    assert bool((~expected).any()) and bool(expected.any())
    # the first maximum wins: a tie with an earlier class is wrong, with a later class right
    t = torch.tensor([[[1.0, 1.0, 0.0]]]).expand(1, 2, 3)
    assert argmax_equals(t, torch.tensor([0, 1])).tolist() == [[True, False]]


def test_exact_integer_product_float64_route():
    g = torch.Generator().manual_seed(0)
    for M in (2, 4, 6):
        A = shapley_integer_matrix(M)
        v = torch.randint(0, M + 1, (2**M, 37), generator=g)
        assert torch.equal(_exact_integer_product(A, v, float64=True), A @ v)
    # past 2^53 the float route would round: the product is formed in integers instead
    A = torch.tensor([[1, -1]])
    v = torch.tensor([[2**60 + 1], [2**60]])  # equal once rounded to float64
    assert _exact_integer_product(A, v, float64=True).item() == 1
    assert torch.equal(shapley_numerators(v.new_tensor([[0], [3], [1], [5]])), torch.tensor([[7], [3]]))


@pytest.mark.parametrize("path", ["additive", "general"])
def test_empty_batch_gives_empty_values(path):
    model, mods = model_for(3, "concat")
    feats = {m: torch.zeros(0, model.feature_dim(m)) for m in mods}
    absent = model.absent_features({m: torch.zeros(1, model.feature_dim(m)) for m in mods})
    with torch.no_grad():
        v = subset_values(model, feats, torch.zeros(0, dtype=torch.long), absent, path=path)
    assert v.shape == (8, 0)


def test_exact_integer_product_float64_route_is_int64_exact_to_the_bound_and_handles_empty():
    # the float route returns int64 like the integer route
    A = shapley_integer_matrix(3)
    v = torch.randint(-3, 4, (8, 5), generator=torch.Generator().manual_seed(1))
    out = _exact_integer_product(A, v, float64=True)
    assert out.dtype == torch.int64 and torch.equal(out, A @ v)
    # sum |A_i| * max |v| = 2^53 + 2 is past the bound: 2^53 + 1 (not a float64) comes out exactly
    A1 = torch.tensor([[-1, 1]])
    assert _exact_integer_product(A1, torch.tensor([[-2**52], [2**52 + 1]]), float64=True).item() == 2**53 + 1
    # an empty batch (a process with no samples) gives an empty (M, 0) product on either route
    for route in (True, False):
        e = _exact_integer_product(A, torch.zeros(8, 0, dtype=torch.int64), float64=route)
        assert e.shape == (3, 0) and e.dtype == torch.int64


def test_subset_values_passes_its_path_on():
    model, mods = model_for(2, "film")
    feats, absent = features_for(model, batch_for(mods, n=6))
    labels = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="no additive head"):
        subset_values(model, feats, labels, absent, path="additive")
    model, mods = model_for(2, "concat")
    feats, absent = features_for(model, batch_for(mods, n=6))
    counter = CallCounter(model.fusion)
    subset_values(model, feats, labels, absent, path="general")
    assert counter.calls >= 1  # the general path calls the fusion head ...
    counter.calls = 0
    subset_values(model, feats, labels, absent, path="additive")
    assert counter.calls == 0  # ... the additive one never does


@pytest.mark.parametrize("path", ["additive", "general"])
def test_precomputed_absent_features_take_the_features_dtype(path):
    """``absent`` reused across batches may come in another dtype (e.g. computed in float64):
    both paths cast it to the features' dtype and give the same logits."""
    model, mods = model_for(3, "concat", dtype=torch.float32)
    batch = batch_for(mods, n=8, dtype=torch.float32)
    feats, absent = features_for(model, batch)
    ref = all_logits(model, feats, absent, path)
    got = all_logits(model, feats, {m: a.double() for m, a in absent.items()}, path)
    assert got.dtype == ref.dtype and torch.allclose(got, ref, atol=1e-6)


def test_low_precision_model_shortcut_sums_terms_and_bias_in_float32():
    """A bfloat16 model (no autocast): the shortcut adds the bf16 terms and the bf16 bias in
    float32, as the docstring promises."""
    model, mods = model_for(2, "concat", dtype=torch.bfloat16)
    batch = batch_for(mods, n=6, missing=False, dtype=torch.bfloat16)
    feats, absent = features_for(model, batch)
    z = all_logits(model, feats, absent, "additive")
    assert z.dtype == torch.float32
    head = additive_head(model.fusion)
    with torch.no_grad():
        full = head.bias.float() + sum(head.term(m, feats[m]).float() for m in mods)
    assert torch.allclose(z[-1], full, atol=1e-5)  # subset 0b11: every modality present


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_exact_paths_run_on_the_device_and_stay_there():
    """On CUDA (no int64 matmul) the exact product takes the float64 route on the device, or the
    CPU past the 2^53 bound, and every result comes back on the inputs' device."""
    from mmbalance.evaluation.shapley import shapley_values
    v = torch.randint(0, 4, (8, 7), generator=torch.Generator().manual_seed(0))
    out = shapley_numerators(v.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.int64 and torch.equal(out.cpu(), shapley_numerators(v))
    big = _exact_integer_product(torch.tensor([[1, -1]]), torch.tensor([[2**60 + 1], [2**60]]).cuda())
    assert big.device.type == "cuda" and big.item() == 1
    phi = shapley_values(v.double().cuda())
    assert phi.device.type == "cuda" and torch.allclose(phi.cpu(), shapley_values(v.double()))
    model, mods = model_for(3, "concat")
    batch = batch_for(mods, n=12)
    ref = batch_contributions(model, batch["inputs"], batch["present"], batch["label"], numerators=True)
    dev = {k: ({m: t.cuda() for m, t in x.items()} if isinstance(x, dict) else x.cuda()) for k, x in batch.items()}
    for path in ("additive", "general"):
        got = batch_contributions(model.cuda(), dev["inputs"], dev["present"], dev["label"], numerators=True, path=path)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), ref)
