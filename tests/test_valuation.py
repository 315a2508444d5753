"""Sample-level and modality-level valuation: Shapley contributions (exact), resampling rules,
datasets, the training step on unimodal items (only the kept encoder and the head learn from
them), the valuation pass's mode, warm-up boundaries, resume, and the same plan on any number of
processes."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmbalance.config import load_config
from mmbalance.data.base import ArrayDataset, DataSplits
from mmbalance.engine.trainer import Trainer
from mmbalance.evaluation.contribution import modality_contributions, use_absent_policy
from mmbalance.evaluation.shapley import shapley_numerators, shapley_values, subset_members
from mmbalance.methods import create_method
from mmbalance.methods.base import ModelSpec, build_standard_model
from mmbalance.methods.valuation import (ResampledDataset, contribution_gap, modality_resample_rate,
                                         normalize_gap, resample_counts)
from mmbalance.registry import ConfigError

from helpers import capture_step_grads

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- helpers


def brute_force_shapley(v: torch.Tensor, M: int) -> torch.Tensor:
    """phi (M, B) by averaging marginal contributions over all M! orderings."""
    phi = torch.zeros(M, v.shape[1], dtype=torch.float64)
    for order in itertools.permutations(range(M)):
        S = 0
        for i in order:
            phi[i] += v[S | (1 << i)] - v[S]
            S |= 1 << i
    return phi / math.factorial(M)


def tiny_model(M=3, policy="input", fusion="concat", dim=5, classes=3, seed=0):
    torch.manual_seed(seed)
    mods = [f"m{k}" for k in range(M)]
    spec = ModelSpec(modalities=mods, num_classes=classes, input_shapes={m: (dim,) for m in mods},
                     encoders={m: ("mlp", {"hidden": (8,), "dropout": 0.5, "batchnorm": True}) for m in mods},
                     fusion=fusion, fusion_options={}, absent_policy=policy)
    model = build_standard_model(spec)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(5):
            model({m: torch.randn(16, dim) * 2 + 1 for m in mods})
    return model, mods


def batch_of(mods, n=24, dim=5, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"inputs": {m: torch.randn(n, dim, generator=g) for m in mods},
            "label": torch.randint(0, classes, (n,), generator=g), "index": torch.arange(n),
            "present": {m: torch.ones(n, dtype=torch.bool) for m in mods}}


def naive_phi(model, batch, mods):
    """Re-encode every subset with the full model (eval mode): absent = zero input (``input``
    policy) or the model's own present-mask handling (``feature`` policy)."""
    model.eval()
    M, y = len(mods), batch["label"]
    v = torch.zeros(2**M, len(y), dtype=torch.float64)
    with torch.no_grad():
        for S in range(1, 2**M):
            keep = {mods[i] for i in subset_members(S, M)}
            inputs = {m: (x if m in keep else torch.zeros_like(x)) for m, x in batch["inputs"].items()}
            present = {m: torch.full_like(p, m in keep) for m, p in batch["present"].items()}
            if model.absent_policy == "input":
                logits = model(inputs).logits  # the encoder really runs on the zero input
            else:
                logits = model(batch["inputs"], present).logits
            v[S] = len(keep) * (logits.argmax(-1) == y).double()
    return shapley_values(v).T.float()


def tiny_splits(M=2, n=48, dim=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = [f"m{k}" for k in range(M)]

    def ds(k):
        y = torch.randint(0, classes, (k,), generator=g)
        # modality m0 is informative, the others weakly so
        arrays = {m: torch.randn(k, dim, generator=g) + (2.0 if j == 0 else 0.3) * torch.nn.functional.one_hot(
            y, dim).float() for j, m in enumerate(mods)}
        return ArrayDataset(arrays, y)

    return DataSplits(train=ds(n), val=ds(24), test=ds(24), modalities=mods, num_classes=classes,
                      input_shapes={m: (dim,) for m in mods}, default_encoders={m: "mlp" for m in mods},
                      encoder_options={m: {"hidden": [8]} for m in mods})


def trainer_for(method, splits, policy="input", epochs=2, encoder=None, seed=0, **options):
    over = {"train.epochs": epochs, "method.name": method, "train.progress": "off", "train.probe": False,
            "train.batch_size": 16, "model.absent_policy": policy, "train.device": "cpu", "train.seed": seed}
    if encoder is not None:
        over["model.encoder_options"] = encoder
    over.update({f"method.{k}": v for k, v in options.items()})
    return Trainer(load_config(None, over), data=splits)


# ----------------------------------------------------------------------------- Shapley


@pytest.mark.parametrize("M", [2, 3, 4])
def test_shapley_equals_permutation_enumeration(M):
    g = torch.Generator().manual_seed(M)
    v = torch.randn(2**M, 6, generator=g, dtype=torch.float64)
    v[0] = 0.0
    phi = shapley_values(v)
    assert torch.allclose(phi, brute_force_shapley(v, M), atol=1e-12)
    assert torch.allclose(phi.sum(0), v[-1], atol=1e-12)  # efficiency: sums to v(all)
    # the correctness game: v(S) = |S| * correct(S)
    correct = torch.randint(0, 2, (2**M, 6), generator=g).double()
    v = torch.tensor([bin(S).count("1") for S in range(2**M)]).double()[:, None] * correct
    assert torch.allclose(shapley_values(v), brute_force_shapley(v, M), atol=1e-12)


@pytest.mark.parametrize("M", [2, 3, 4])
def test_largest_single_contribution_is_half_M_plus_one(M):
    # the game where a sample is right exactly when modality 0 is present: phi_0 = (M+1)/2,
    # which is the unit Norm(d) divides by
    v = torch.tensor([[bin(S).count("1") * float(S & 1)] for S in range(2**M)], dtype=torch.float64)
    assert float(shapley_values(v)[0, 0]) == pytest.approx((M + 1) / 2)


@pytest.mark.parametrize("M", [2, 3, 4])
def test_integer_shapley_is_exact(M):
    g = torch.Generator().manual_seed(M)
    correct = torch.randint(0, 2, (2**M, 40), generator=g)
    v = torch.tensor([bin(S).count("1") for S in range(2**M)])[:, None] * correct
    v[0] = 0
    num = shapley_numerators(v.double())
    assert num.dtype == torch.int64
    assert torch.equal(num, (brute_force_shapley(v.double(), M) * math.factorial(M)).round().long())
    assert torch.equal(num.sum(0), v[-1] * math.factorial(M))  # efficiency, exactly
    with pytest.raises(ValueError):
        shapley_numerators(torch.full((2**M, 2), 0.5))


@pytest.mark.parametrize("policy", ["input", "feature"])
@pytest.mark.parametrize("M", [2, 3])
def test_head_only_contributions_equal_naive_reencoding(policy, M):
    model, mods = tiny_model(M, policy)
    batch = batch_of(mods)
    # two batches through a loader-like list: the absent features are computed once per pass
    halves = [{k: ({m: t[:12] for m, t in v.items()} if isinstance(v, dict) else v[:12]) for k, v in batch.items()},
              {k: ({m: t[12:] for m, t in v.items()} if isinstance(v, dict) else v[12:]) for k, v in batch.items()}]
    model.train()
    phi, index = modality_contributions(model, halves, return_index=True)
    assert model.training  # mode restored
    assert torch.equal(index, batch["index"])
    expected = naive_phi(model, batch, mods)
    assert torch.allclose(phi, expected, atol=1e-6)
    # sums to v(all) = M * 1[full model correct]
    full = (model(batch["inputs"]).logits.argmax(-1) == batch["label"]).float() * M
    assert torch.allclose(phi.sum(1), full, atol=1e-6)
    if M == 2:
        assert set(phi.flatten().tolist()) <= {-0.5, 0.0, 0.5, 1.0, 1.5}
    if policy == "input":  # meaningful: BN/bias make the encoder's zero-input output non-zero
        z = model.absent_feature(mods[0], torch.zeros(1, 8))
        assert z.abs().sum() > 0


def test_absent_policy_override_is_temporary_and_changes_the_substitute():
    model, mods = tiny_model(2, "input")
    batch = batch_of(mods, n=60)
    with use_absent_policy(model, "feature"):
        assert model.absent_policy == "feature"
        expected = naive_phi(model, batch, mods)
    assert model.absent_policy == "input"
    phi = modality_contributions(model, [batch], absent_policy="feature")
    assert model.absent_policy == "input"
    assert torch.allclose(phi, expected, atol=1e-6)
    with pytest.raises(ConfigError):
        modality_contributions(model, [batch], absent_policy="zeros")


def test_missing_modality_in_data_is_absent_in_every_subset():
    model, mods = tiny_model(2, "feature")
    batch = batch_of(mods, n=30)
    batch["present"]["m1"][:10] = False
    phi = modality_contributions(model, [batch])
    # naive: the subset's mask AND the data's mask, through the full model (feature policy)
    b2 = {**batch, "present": {m: p.clone() for m, p in batch["present"].items()}}
    model.eval()
    y = batch["label"]
    v = torch.zeros(4, 30, dtype=torch.float64)
    with torch.no_grad():
        for S in range(1, 4):
            pres = {m: (torch.ones(30, dtype=torch.bool) if S >> i & 1 else torch.zeros(30, dtype=torch.bool))
                    & b2["present"][m] for i, m in enumerate(mods)}
            v[S] = bin(S).count("1") * (model(batch["inputs"], pres).logits.argmax(-1) == y).double()
    assert torch.allclose(phi, shapley_values(v).T.float(), atol=1e-6)


# ----------------------------------------------------------------------------- sample level


PHIS = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5])


@pytest.mark.parametrize("f_s,expected", [
    ("double", [3, 2, 1, 0, 0]),     # round(2x): the paper / public code
    ("official", [3, 2, 1, 0, 0]),   # the public code's thresholds
    ("identity", [2, 1, 1, 0, 0]),   # round(x), ties up: x = 0.5 -> 1, x = 1.5 -> 2
    ("square", [2, 1, 0, 0, 0]),     # round(x^2): 2.25, 1, 0.25
])
def test_resample_counts_follow_f_s(f_s, expected):
    assert resample_counts(PHIS, f_s).tolist() == expected
    assert resample_counts(PHIS.view(5, 1).expand(5, 3), f_s)[:, 2].tolist() == expected  # any shape


def test_resample_count_boundaries():
    phi = torch.tensor([0.75, 0.75 + 1e-7, 0.75 - 1e-7, 0.25, 1 - 1e-8, 0.9, 2.0, -1.0])
    # ties round up; float noise does not move a value across a boundary; phi ~ 1 -> no copy
    assert resample_counts(phi, "double").tolist() == [1, 1, 1, 2, 0, 0, 0, 4]
    # the public code gives one copy for every 0.4 < phi < 1 and caps at 3
    assert resample_counts(phi, "official").tolist() == [1, 1, 1, 2, 0, 1, 0, 3]
    with pytest.raises(ValueError, match="unknown f_s 'cube'"):
        resample_counts(phi, "cube")


def test_resampled_dataset_copies_carry_only_their_modality():
    mods = ["a", "b", "c"]
    base = ArrayDataset({m: torch.randn(5, 4) + 1 for m in mods}, torch.arange(5) % 2)
    before = {m: base.arrays[m].clone() for m in mods}
    ds = ResampledDataset(base, mods, copy_index=torch.tensor([3, 3, 0]), copy_modality=torch.tensor([1, 2, 0]))
    assert len(ds) == 5 + 3
    assert ds.copies_per_modality() == {"a": 1, "b": 1, "c": 1}
    for k in range(5):  # originals untouched
        item = ds[k]
        assert all(bool(item["present"][m]) for m in mods)
        assert all(torch.equal(item["inputs"][m], before[m][k]) for m in mods)
    for pos, (src, m_keep) in zip(range(5, 8), [(3, "b"), (3, "c"), (0, "a")]):
        item = ds[pos]
        assert int(item["index"]) == src and int(item["label"]) == int(base.labels[src])
        for m in mods:
            assert bool(item["present"][m]) == (m == m_keep)
            expect = before[m][src] if m == m_keep else torch.zeros(4)
            assert torch.equal(item["inputs"][m], expect)
            assert bool(item["dropped"][m]) == (m != m_keep)  # removed by the method, not missing in the data
    assert all(not bool(ds[k]["dropped"][m]) for k in range(5) for m in mods)
    assert all(torch.equal(base.arrays[m], before[m]) for m in mods)  # base never modified


def test_sample_valuation_epoch_set_is_originals_plus_copies():
    splits = tiny_splits(M=3)
    tr = trainer_for("sample_valuation", splits, warmup_epochs=1)
    method, N = tr.method, len(splits.train)
    method.on_epoch_start(0)  # warm-up: the base split itself
    assert method.train_dataset(0, splits.train) is splits.train
    method.on_epoch_start(1)
    ds = method.train_dataset(1, splits.train)
    phi = modality_contributions(tr.model, tr.loader(splits.train_eval))
    counts = resample_counts(phi, "double")
    assert len(ds) == N + int(counts.sum())
    assert ds.copies_per_modality() == {m: int(counts[:, k].sum()) for k, m in enumerate(tr.model.modalities)}
    diag = method.epoch_diagnostics()
    assert diag["copies_total"] == counts.sum()
    assert diag["phi_mean/m0"] == pytest.approx(float(phi[:, 0].mean()), abs=1e-6)
    # per sample: copies of sample i for modality m == counts[i, m]
    got = torch.zeros_like(counts)
    for src, m in zip(ds.copy_index.tolist(), ds.copy_modality.tolist()):
        got[src, m] += 1
    assert torch.equal(got, counts)


def test_sample_valuation_fit_records_train_size_and_diagnostics():
    splits = tiny_splits(M=2)
    tr = trainer_for("sample_valuation", splits, epochs=3, warmup_epochs=1, f_s="identity")
    records = []
    tr._log_epoch = lambda record, improved: records.append(record)
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    assert records[0]["train_size"] == 48 and records[0]["diagnostics"] == {}
    for r in records[1:]:
        d = r["diagnostics"]
        assert r["train_size"] == 48 + d["copies_total"] == 48 + d["copies/m0"] + d["copies/m1"]
        assert {"phi_mean/m0", "phi_mean/m1", "fused_correct"} <= set(d)


# ----------------------------------------------------------------------------- modality level


def test_modality_rate_equals_official_formula_for_two_modalities():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # phi of random correctness games, as in a real valuation
        correct = torch.randint(0, 2, (4, 50), generator=g).double()
        v = torch.tensor([0.0, 1, 1, 2])[:, None] * correct
        phi_mean = shapley_values(v).T.mean(0)
        gap = 1 - phi_mean
        official = (2 / 3) * abs(float(gap[0] - gap[1]))
        i, p = modality_resample_rate(phi_mean)
        assert i == int(torch.argmin(phi_mean)) and p == pytest.approx(official, abs=1e-12)
        assert modality_resample_rate(phi_mean, "tanh")[1] == pytest.approx(math.tanh(official), abs=1e-12)
        assert modality_resample_rate(phi_mean, "power")[1] == pytest.approx(official ** 1.5, abs=1e-12)
    assert modality_resample_rate(torch.tensor([0.2, 1.0]), fixed_rate=0.3) == (0, 0.3)


def test_modality_gap_for_three_modalities_by_hand():
    i, d = contribution_gap(torch.tensor([1.2, 0.3, 0.9], dtype=torch.float64))
    assert i == 1 and float(d) == pytest.approx(((1.2 - 0.3) + (0.9 - 0.3)) / 2)
    assert float(normalize_gap(d, 3)) == pytest.approx(0.75 / 2)
    assert modality_resample_rate(torch.tensor([3.0, -1.0]))[1] == 1.0  # clamped to [0, 1]
    with pytest.raises(ValueError, match="at least two modalities"):
        contribution_gap(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="unknown f_m 'relu'"):
        modality_resample_rate(torch.tensor([1.0, 0.5]), "relu")


@pytest.mark.parametrize("strategy", ["resample", "modality_drop", "data_mask"])
def test_modality_valuation_strategies(strategy):
    splits = tiny_splits(M=3)
    tr = trainer_for("modality_valuation", splits, warmup_epochs=0, strategy=strategy, fixed_rate=0.5,
                     subset_ratio=0.25)
    method, N = tr.method, len(splits.train)
    seen = []
    value = method._contributions
    method._contributions = lambda positions=None: (seen.append(positions), value(positions))[1]
    method.on_epoch_start(0)
    assert len(seen[0]) == 12 and len(set(seen[0].tolist())) == 12  # only a 25% subset is valued
    ds = method.train_dataset(0, splits.train)
    diag = method.epoch_diagnostics()
    assert diag["p"] == 0.5
    weak = [m for m in tr.model.modalities if diag[f"weakest/{m}"] == 1.0]
    assert len(weak) == 1
    w = weak[0]
    items = [ds[k] for k in range(len(ds))]
    if strategy == "resample":
        n = int(diag[f"copies/{w}"])
        assert len(ds) == N + n and 0 < n < N
        for it in items[N:]:
            assert [m for m in tr.model.modalities if bool(it["present"][m])] == [w]
    elif strategy == "modality_drop":
        assert len(ds) == N
        dropped = [it for it in items if not all(bool(p) for p in it["present"].values())]
        assert len(dropped) == diag["dropped"] > 0
        for it in dropped:
            assert [m for m in tr.model.modalities if bool(it["present"][m])] == [w]
    else:
        assert len(ds) == N
        mods = tr.model.modalities
        wi = mods.index(w)
        rows = ds.mask.any(1)
        assert int(rows.sum()) == diag["masked"] > 0
        assert not ds.mask[:, wi].any() and ds.mask[rows].sum(1).eq(len(mods) - 1).all()  # all dominant ones
        zeros, total = 0, 0
        for k, it in enumerate(items):
            for j, m in enumerate(mods):
                orig = splits.train.arrays[m][k]
                if ds.mask[k, j]:
                    dropped = it["inputs"][m] != orig
                    assert (it["inputs"][m][dropped] == 0).all()  # only zeroing, nothing else
                    zeros, total = zeros + int(dropped.sum()), total + orig.numel()
                else:
                    assert torch.equal(it["inputs"][m], orig)
        assert 0.3 < zeros / total < 0.7  # mask_ratio 0.5
    # the same epoch gives the same plan (resume-safe)
    method.on_epoch_start(0)
    again = method.train_dataset(0, splits.train)
    assert len(again) == len(ds)
    assert all(torch.equal(again[k]["inputs"][m], items[k]["inputs"][m]) for k in range(len(ds))
               for m in tr.model.modalities)


def test_modality_valuation_fixed_rate_extremes_and_fit():
    splits = tiny_splits(M=2)
    tr = trainer_for("modality_valuation", splits, warmup_epochs=0, fixed_rate=1.0)
    tr.method.on_epoch_start(0)
    assert len(tr.method.train_dataset(0, splits.train)) == 2 * 48
    tr = trainer_for("modality_valuation", splits, policy="feature", epochs=2, warmup_epochs=1, f_m="tanh")
    records = []
    tr._log_epoch = lambda record, improved: records.append(record)
    tr.fit()
    d = records[1]["diagnostics"]
    assert records[1]["train_size"] == 48 + d["copies/m0"] + d["copies/m1"]
    assert 0.0 <= d["p"] <= 1.0 and {"phi_mean/m0", "phi_mean/m1", "gap"} <= set(d)


def test_options_are_validated():
    from typing import get_args

    from mmbalance.methods.valuation import (RATE_FUNCTIONS, RESAMPLE_FUNCTIONS, RateFunction,
                                             ResampleFunction)

    # the options' choices are exactly the named functions
    assert get_args(ResampleFunction) == tuple(RESAMPLE_FUNCTIONS)
    assert get_args(RateFunction) == tuple(RATE_FUNCTIONS)
    cases = [("sample_valuation", dict(f_s="cube"), "'f_s' takes one of 'double', 'identity', 'square', 'official', "
                                                    "got 'cube'"),
             ("sample_valuation", dict(warmup_epochs=-1), "'warmup_epochs' takes an integer >= 0, got -1"),
             ("modality_valuation", dict(strategy="mixup"),
              "'strategy' takes one of 'resample', 'modality_drop', 'data_mask', got 'mixup'"),
             ("modality_valuation", dict(f_m="relu"), "'f_m' takes one of 'identity', 'tanh', 'power', got 'relu'"),
             ("modality_valuation", dict(subset_ratio=0.0), "'subset_ratio' takes a number in (0, 1], got 0.0"),
             ("modality_valuation", dict(fixed_rate=1.5), "'fixed_rate' takes a number in [0, 1] or null, got 1.5"),
             ("modality_valuation", dict(mask_ratio=-0.5), "'mask_ratio' takes a number in [0, 1], got -0.5"),
             ("modality_valuation", dict(absent_policy="zeros"),
              "'absent_policy' takes one of 'input', 'feature' or null, got 'zeros'")]
    for name, bad, msg in cases:
        with pytest.raises(ConfigError) as e:
            create_method(name, **bad)
        assert str(e.value) == f"method '{name}' option {msg}"
    m = create_method("modality_valuation", fixed_rate=0.2)
    assert m.hparams() == {"warmup_epochs": 5, "subset_ratio": 0.2, "f_m": "identity", "strategy": "resample",
                           "fixed_rate": 0.2, "mask_ratio": 0.5, "absent_policy": None}
    with pytest.raises(ConfigError):
        m.modalities(["only"])


# ----------------------------------------------------------------------------- training on unimodal items

BN = {"batchnorm": True, "dropout": 0.0}


def _collate(items):
    return torch.utils.data.default_collate(items)


def _bn_buffers(module):
    return {n: b.clone() for n, b in module.named_buffers()}


def _reference_grads(model, batch):
    """The rule written out by hand: for each modality, the encoder runs (train mode) only on the
    rows the method did not remove; removed rows get the absent policy's constant feature (eval
    mode, no gradient); CE of the fused logits over all rows. Returns (grads, model after the
    forward: its BatchNorm buffers moved by the real rows only)."""
    import copy

    model = copy.deepcopy(model)
    model.train()
    feats = {}
    for m in model.modalities:
        d = batch["dropped"][m]
        rows = (~d).nonzero().flatten()
        with torch.no_grad():
            enc = copy.deepcopy(model.encoders[m]).eval()
            if model.absent_policy == "input":
                const = enc(torch.zeros(1, *batch["inputs"][m].shape[1:]))
            else:
                const = torch.zeros(1, model.feature_dim(m))
        h = model.encoders[m](batch["inputs"][m][rows])
        full = [h[(rows == i).nonzero()[0, 0]] if bool((rows == i).any()) else const[0] for i in range(len(d))]
        feats[m] = torch.stack(full)
    out = model.fuse(feats, batch["present"])
    loss = torch.nn.functional.cross_entropy(out.logits, batch["label"])
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: g for n, g in zip(names, grads) if g is not None}, model


@pytest.mark.parametrize("policy", ["input", "feature"])
def test_a_copy_trains_only_its_kept_modality(policy):
    """A batch of copies of m0 only: encoder m1 gets an exactly zero gradient and its BatchNorm
    statistics do not move (before the fix: gradient 0.1 under ``input``; BatchNorm absorbed the
    zero inputs under both policies)."""
    splits = tiny_splits(M=2)
    tr = trainer_for("sample_valuation", splits, policy=policy, encoder=BN)
    ds = ResampledDataset(splits.train, tr.model.modalities, copy_index=torch.arange(8),
                          copy_modality=torch.zeros(8, dtype=torch.long))
    batch = _collate([ds[48 + i] for i in range(8)])
    before = _bn_buffers(tr.model.encoders["m1"])
    got = capture_step_grads(tr, batch)
    b_grads = {n: g for n, g in got.items() if n.startswith("encoders.m1.")}
    assert b_grads and all(torch.equal(g, torch.zeros_like(g)) for g in b_grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in got.items() if n.startswith("encoders.m0."))
    assert any(float(g.abs().sum()) > 0 for n, g in got.items() if n.startswith("fusion."))
    after = _bn_buffers(tr.model.encoders["m1"])
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("policy", ["input", "feature"])
def test_mixed_batch_step_equals_hand_written_reference(policy):
    """Originals and copies of both modalities in one batch: the gradients the optimizer gets and
    the BatchNorm statistics after the step equal the hand-written rule (encoders see only their
    real rows; a single real row is normalised with the running statistics)."""
    splits = tiny_splits(M=3)
    tr = trainer_for("sample_valuation", splits, policy=policy, encoder=BN)
    mods = tr.model.modalities
    # copies: m0 of samples 0-3, m1 of 4-7, m2 of sample 8 (m2 then has 6 originals + 1 copy)
    ds = ResampledDataset(splits.train, mods, copy_index=torch.arange(9),
                          copy_modality=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2]))
    batch = _collate([ds[k] for k in range(6)] + [ds[48 + i] for i in range(9)])
    want, ref_model = _reference_grads(tr.model, batch)
    got = capture_step_grads(tr, batch)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-7), n
    ref_buffers = dict(ref_model.named_buffers())
    for n, b in tr.model.named_buffers():
        assert torch.allclose(b.float(), ref_buffers[n].float(), atol=1e-6), n
    # one real row only: BatchNorm in eval mode for that encoder, no error
    single = _collate([ds[0]] + [ds[48 + i] for i in range(4)])  # m1, m2 real only in row 0
    running = tr.model.encoders["m1"].net[2].running_mean.clone()
    tr.method.training_step(single)
    assert torch.equal(tr.model.encoders["m1"].net[2].running_mean, running)


def test_modality_drop_items_train_only_the_kept_modality():
    splits = tiny_splits(M=2)
    tr = trainer_for("modality_valuation", splits, encoder=BN)
    keep = torch.ones(48, 2, dtype=torch.bool)
    keep[:, 1] = False  # every item keeps only m0
    ds = ResampledDataset(splits.train, tr.model.modalities, keep=keep)
    batch = _collate([ds[k] for k in range(8)])
    assert batch["dropped"]["m1"].all() and not batch["dropped"]["m0"].any()
    before = _bn_buffers(tr.model.encoders["m1"])
    got = capture_step_grads(tr, batch)
    assert all(torch.equal(g, torch.zeros_like(g)) for n, g in got.items() if n.startswith("encoders.m1."))
    assert all(torch.equal(b, _bn_buffers(tr.model.encoders["m1"])[n]) for n, b in before.items())


@pytest.mark.parametrize("method", ["sample_valuation", "modality_valuation"])
def test_valuation_pass_runs_in_eval_mode_and_leaves_train_mode(method):
    splits = tiny_splits(M=2)
    extra = {"subset_ratio": 1.0} if method == "modality_valuation" else {}
    tr = trainer_for(method, splits, encoder={"batchnorm": True, "dropout": 0.5}, warmup_epochs=0, **extra)
    model = tr.model
    model.train()
    for b in list(tr.loader(splits.train, batch_size=16))[:2]:
        tr.method.training_step(b)  # non-trivial running statistics
    modes = []
    hooks = [mod.register_forward_pre_hook(lambda mod, inp: modes.append(mod.training))
             for mod in model.modules() if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.Dropout))]
    before = _bn_buffers(model)
    tr.method.on_epoch_start(0)
    for h in hooks:
        h.remove()
    assert modes and not any(modes)  # every BatchNorm / Dropout ran in eval mode
    assert all(mod.training for mod in model.modules())  # train mode again afterwards
    assert all(torch.equal(b, _bn_buffers(model)[n]) for n, b in before.items())
    assert tr.method._dataset_args is not None


@pytest.mark.parametrize("method", ["sample_valuation", "modality_valuation"])
@pytest.mark.parametrize("epoch,active", [(0, False), (1, False), (2, True), (3, True)])
def test_warmup_boundary(method, epoch, active):
    """warmup_epochs = 2: no valuation pass and the plain split in epochs 0 and 1 (the last warm-up
    epoch); valued and re-sampled from epoch 2 (the first) on."""
    splits = tiny_splits(M=2)
    extra = {"fixed_rate": 0.5} if method == "modality_valuation" else {}
    tr = trainer_for(method, splits, warmup_epochs=2, **extra)
    calls = []
    value = tr.method._contributions
    tr.method._contributions = lambda positions=None: (calls.append(1), value(positions))[1]
    tr.method.on_epoch_start(epoch)
    ds = tr.method.train_dataset(epoch, splits.train)
    assert bool(calls) == active
    assert (ds is splits.train) == (not active)
    if active:
        assert isinstance(ds, ResampledDataset) and len(ds) > len(splits.train)


@pytest.mark.parametrize("method", ["sample_valuation", "modality_valuation"])
def test_resume_gives_the_same_plan_and_next_step(method):
    """The plan is a function of the weights, the seed and the epoch only: a fresh trainer (other
    initial weights, other global RNG state) loaded with model, optimizer and method state builds
    the same epoch set and takes the same next step."""
    import copy

    splits = tiny_splits(M=3)
    extra = {"subset_ratio": 0.5} if method == "modality_valuation" else {}
    tr = trainer_for(method, splits, warmup_epochs=1, **extra)
    for b in list(tr.loader(splits.train, batch_size=16)):
        tr.method.training_step(b)
    state = copy.deepcopy({"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
                           "method": tr.method.state_dict()})
    other = trainer_for(method, splits, warmup_epochs=1, **extra)
    with torch.no_grad():
        for q in other.model.parameters():
            q.add_(torch.randn_like(q))
    other.model.load_state_dict(state["model"])
    other.optimizer.load_state_dict(state["optimizer"])
    other.method.load_state_dict(state["method"])
    torch.rand(7)  # a different global RNG state must not matter
    plans = []
    for t in (tr, other):
        t.epoch = 1
        t.method.on_epoch_start(1)
        plans.append(t.method.train_dataset(1, splits.train))
    assert len(plans[0]) == len(plans[1]) > 48
    assert torch.equal(plans[0].copy_index, plans[1].copy_index)
    assert torch.equal(plans[0].copy_modality, plans[1].copy_modality)
    batch = _collate([plans[0][k] for k in range(len(plans[0]) - 16, len(plans[0]))])
    torch.manual_seed(5)
    g1 = capture_step_grads(tr, batch)
    torch.manual_seed(5)
    g2 = capture_step_grads(other, batch)
    assert set(g1) == set(g2) and all(torch.equal(g1[n], g2[n]) for n in g1)


@pytest.mark.parametrize("method", ["sample_valuation", "modality_valuation"])
def test_plan_is_the_same_on_any_number_of_processes(method, monkeypatch):
    """Simulated 1, 2 and 3 processes (rank and world patched; all_reduce_sum gathers the ranks'
    tables): every sample is valued in the same evaluation batch as on one process, the integer
    tables add up exactly, and the plan and its diagnostics are bit-identical."""
    import mmbalance.methods.valuation as V

    splits = tiny_splits(M=3, n=50)
    extra = {"subset_ratio": 0.6} if method == "modality_valuation" else {}
    tr = trainer_for(method, splits, warmup_epochs=0, **extra)
    monkeypatch.setattr(tr.cfg.train, "eval_batch_size", 8)  # several evaluation batches
    batches = []
    real = V.modality_contributions

    def recording(model, loader, **kw):
        got = list(loader)
        batches.extend(tuple(b["index"].tolist()) for b in got)
        return real(model, got, **kw)

    monkeypatch.setattr(V, "modality_contributions", recording)

    def plan(world):
        batches.clear()
        tables = []
        for rank in range(world):  # each rank's own share (its plan is discarded)
            monkeypatch.setattr(Trainer, "rank", property(lambda self: rank))
            monkeypatch.setattr(Trainer, "world_size", property(lambda self: world))
            monkeypatch.setattr(tr, "all_reduce_sum", lambda t: (tables.append(t.clone()), t)[1])
            tr.method.on_epoch_start(0)
        assert len(tables) == world and all(t.dtype == torch.int64 for t in tables)
        rank_batches = list(batches)
        total = sum(tables)
        monkeypatch.setattr(tr, "all_reduce_sum", lambda t: total.clone())
        tr.method.epoch_diagnostics()  # forget the discarded plans' logs
        tr.method.on_epoch_start(0)
        return rank_batches, dict(tr.method._dataset_args), tr.method.epoch_diagnostics()

    batches1, plan1, diag1 = plan(1)
    assert len(batches1) > 3 and diag1["copies/m0"] + diag1["copies/m1"] + diag1["copies/m2"] > 0
    for world in (2, 3):
        b, p, d = plan(world)
        assert sorted(b) == sorted(batches1)  # the same batches, dealt to the ranks
        assert p.keys() == plan1.keys() and all(torch.equal(p[k], plan1[k]) for k in p)
        assert d == diag1


# ----------------------------------------------------------------------------- mutation-testing additions (valuation)


def test_official_thresholds_are_inclusive_at_phi_0_4_and_minus_0_1():
    """The public code: 1 copy for 0.4 < phi < 1, 2 for -0.1 < phi <= 0.4, 3 for phi <= -0.1 (at
    both boundaries it differs from ``double``, which rounds 2 * 0.6 and 2 * 1.1 to 1 and 2)."""
    phi = torch.tensor([0.4, 0.401, -0.1, -0.099], dtype=torch.float64)
    assert resample_counts(phi, "official").tolist() == [2, 1, 3, 2]
    assert resample_counts(phi, "double").tolist() == [1, 1, 2, 2]
    # 0.4 is a reachable Shapley value for five modalities: a multiple of 1/5! = 1/120
    assert (0.4 * math.factorial(5)).is_integer()


def test_sample_valuation_options_reach_the_plan():
    """``f_s`` and ``absent_policy`` (here other than the model's) decide the copies."""
    splits = tiny_splits(M=3)
    tr = trainer_for("sample_valuation", splits, policy="input", warmup_epochs=0, f_s="identity",
                     absent_policy="feature")
    method = tr.method
    method.on_epoch_start(0)
    ds = method.train_dataset(0, splits.train)
    assert tr.model.absent_policy == "input"
    phi = modality_contributions(tr.model, tr.loader(splits.train_eval), absent_policy="feature")
    counts = resample_counts(phi, "identity")
    got = torch.zeros_like(counts)
    for src, m in zip(ds.copy_index.tolist(), ds.copy_modality.tolist()):
        got[src, m] += 1
    assert torch.equal(got, counts)
    # the options matter here: the model's own policy or the default f_s would plan other copies
    other = modality_contributions(tr.model, tr.loader(splits.train_eval), absent_policy="input")
    assert not torch.equal(resample_counts(other, "identity"), counts)
    assert not torch.equal(resample_counts(phi, "double"), counts)


def test_modality_valuation_logs_copies_of_the_enhanced_modality_only():
    splits = tiny_splits(M=3)
    tr = trainer_for("modality_valuation", splits, warmup_epochs=0, fixed_rate=0.5, subset_ratio=0.5)
    tr.method.on_epoch_start(0)
    ds = tr.method.train_dataset(0, splits.train)
    diag = tr.method.epoch_diagnostics()
    mods = tr.model.modalities
    weak = [m for m in mods if diag[f"weakest/{m}"] == 1.0]
    assert len(weak) == 1 and diag[f"copies/{weak[0]}"] == len(ds) - 48 > 0
    assert all(diag[f"copies/{m}"] == 0 for m in mods if m != weak[0])
