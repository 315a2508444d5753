"""Mixed precision: every method trains under bf16 autocast on the CPU; fp16 uses dynamic loss
scaling whose gradients, as methods see them, are the unscaled ones, and overflowing steps are
skipped; the host synchronisations of a training step stay within a stated budget."""
import math

import pytest
import torch

from mmbalance.engine import Trainer
from mmbalance.methods import list_methods
from mmbalance.utils import to_device

from helpers import capture_step_grads, quick_config, tiny_data

FAST = {"arl": {"method.warmup_epochs": 0}, "sample_valuation": {"method.warmup_epochs": 0},
        "modality_valuation": {"method.warmup_epochs": 0}, "opm": {"method.modulation_start": 0},
        "dr": {"method.interval": 1}, "reconboost": {"method.epochs_per_stage": 1, "method.correct_epochs": 1}}


def trainer(method, precision, epochs=1, **extra):
    ov = {"train.precision": precision, "model.encoder_options": {"hidden": [16, 8], "dropout": 0.0},
          "train.batch_size": 16, **FAST.get(method, {}), **extra}
    return Trainer(quick_config(method, epochs=epochs, **ov), data=tiny_data(n=48, n_eval=12, missing=0.2))


@pytest.mark.parametrize("method", list_methods())
def test_every_method_trains_under_bf16_autocast(method):
    tr = trainer(method, "bf16")
    assert tr.amp_dtype is torch.bfloat16
    res = tr.fit()
    assert math.isfinite(res["test"]["loss"]) and 0.0 <= res["test"]["accuracy"] <= 1.0


def test_fp16_methods_see_unscaled_gradients():
    ref = trainer("joint", "fp32")
    fp = trainer("joint", "fp16")
    fp.model.load_state_dict(ref.model.state_dict())
    fp.amp_dtype = None  # same arithmetic, only the loss scaling differs
    batch = to_device(next(iter(ref.loader(ref.data.train, batch_size=16))), ref.device)
    g_ref = capture_step_grads(ref, batch)
    g_fp = capture_step_grads(fp, batch)
    assert fp.loss_scale == 2.0 ** 16
    for k in g_ref:
        assert torch.allclose(g_fp[k], g_ref[k], rtol=1e-4, atol=1e-6), k
    for k, v in ref.model.state_dict().items():
        assert torch.allclose(v, fp.model.state_dict()[k], atol=1e-6)


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    tr = trainer("joint", "fp16")
    tr.amp_dtype = None
    batch = to_device(next(iter(tr.loader(tr.data.train, batch_size=16))), tr.device)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.loss_scale = 1.0e39  # the scaled loss and gradients overflow float32
    tr.method.training_step(batch)
    assert tr.skipped_steps == 1 and tr.loss_scale == 5.0e38
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, before[k]), "a step with overflowing gradients must not change the model"


def test_fp16_trains_every_step_when_nothing_overflows():
    res = trainer("arl", "fp16").fit()
    assert math.isfinite(res["test"]["loss"])


# host synchronisations per training step. Counted: Tensor.item / float / bool / int / tolist
# (the conversions a GPU waits for) and what waits without one of them: .cpu(), .numpy(),
# torch.nonzero and indexing with a boolean mask (a data-dependent shape). On the CPU these are
# cheap; on a GPU each one stalls the host until the device has caught up.
ORIGINAL_ITEM, ORIGINAL_NONZERO = torch.Tensor.item, torch.nonzero
SYNC_CALLS = ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy", "nonzero")
#: the engine's divergence check (one per backward) plus at most two for the method
SYNC_BUDGET = 3
#: methods over the budget, at their measured count, with where the count comes from; a count
#: may only go down (docs/performance.md). "check" = the engine's divergence check, one per backward.
SYNC_BUDGET_OVER = {
    "arl": 9,                 # check; arl.py: coefficient normalisation 2, hook scales 2, returned floats 3,
                              # nonzero over the modalities with samples 1
    "greedy": 5,              # check; greedy.py: its own present.all() 2, statistics tolist 1, loss float 1
    "mie": 5,                 # check x4 (SAM: two backward passes per modality); the batch's presence counts 1
    "mla": 16,                # check x2; mla.py: present rows (int + boolean masks) 6, global count and loss 4,
                              # projection ratio and P norm diagnostics 4
    "modality_valuation": 5,  # check; valuation.py: any() 2, nonzero 1, loss float 1
    "sample_valuation": 6,    # check; valuation.py: any() 2, nonzero 2, loss float 1
}


def _is_mask(index) -> bool:
    if isinstance(index, tuple):
        return any(_is_mask(i) for i in index)
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool


def count_synchronisations(fn):
    """``(fn(), n)``: the result of ``fn()`` and how many host synchronisations (SYNC_CALLS) it
    made; the patches are its own (a test's monkeypatch is left alone). Usable from any test:
    ``from test_precision import count_synchronisations``."""
    count = {"n": 0}
    nonzero, getitem = torch.nonzero, torch.Tensor.__getitem__

    def counted_nonzero(*a, **k):
        count["n"] += 1
        return nonzero(*a, **k)

    def counted_getitem(self, index):
        count["n"] += _is_mask(index)
        return getitem(self, index)

    with pytest.MonkeyPatch.context() as mp:
        for name in SYNC_CALLS:
            orig = getattr(torch.Tensor, name)

            def wrapped(self, *a, _orig=orig, **k):
                count["n"] += 1
                return _orig(self, *a, **k)

            mp.setattr(torch.Tensor, name, wrapped)
        mp.setattr(torch, "nonzero", counted_nonzero)
        mp.setattr(torch.Tensor, "__getitem__", counted_getitem)
        out = fn()
    return out, count["n"]


def count_step_synchronisations(tr, batch) -> int:
    """The host synchronisations of one ``training_step`` on ``batch`` (see SYNC_CALLS)."""
    return count_synchronisations(lambda: tr.method.training_step(batch))[1]


@pytest.mark.parametrize("method", list_methods())
def test_host_synchronisations_per_step_within_budget(method):
    tr = trainer(method, "fp32")
    tr.method.on_epoch_start(0)
    ds = tr.method.train_dataset(0, tr.data.train)
    batch = to_device(next(iter(tr.loader(ds, shuffle=True, batch_size=16, drop_last=True))), tr.device)
    tr.model.train()
    tr.method.training_step(batch)  # first step (lazy state) not counted
    n = count_step_synchronisations(tr, batch)
    budget = SYNC_BUDGET_OVER.get(method, SYNC_BUDGET)
    assert n <= budget, f"{method}: {n} host synchronisations in one step (budget {budget})"


def test_the_counter_sees_each_kind_of_synchronisation():
    """Every kind of SYNC_CALLS is counted once; device-side work is not; nothing stays patched."""
    x = torch.tensor([1.0, -2.0, 3.0])
    mask = x > 0
    steps = [lambda: x.sum().item(), lambda: float(x[0]), lambda: bool(mask.any()), lambda: int(x.argmax()),
             lambda: x.tolist(), lambda: x.cpu(), lambda: x.numpy(), lambda: torch.nonzero(mask), lambda: x[mask]]
    assert [count_synchronisations(fn)[1] for fn in steps] == [1] * len(steps)
    quiet = [lambda: torch.where(mask, x, 0.0).sum(), lambda: x[1:], lambda: x[torch.tensor([0, 2])],
             lambda: (x * mask).clamp(min=0)]
    assert [count_synchronisations(fn)[1] for fn in quiet] == [0] * len(quiet)
    assert torch.Tensor.item is ORIGINAL_ITEM and torch.nonzero is ORIGINAL_NONZERO


def test_weighted_diagnostics_are_the_mean_over_the_steps_that_count():
    """``Method.log(name, value, weight=...)``: a diagnostic logged on the device every step with
    a 0/1 weight averages over the steps whose weight is 1, like a host-side ``if``; a weight-0
    value is ignored even when it is not finite; unweighted entries weigh 1; an epoch with only
    weight 0 leaves the name out."""
    from mmbalance.methods.base import Method

    m = Method()
    for v, w in ((1.0, 1), (float("nan"), 0), (4.0, 1), (float("inf"), 0)):
        m.log("a", torch.tensor(v), weight=torch.tensor(bool(w)))
    m.log("b", torch.tensor(5.0), weight=torch.tensor(False))
    m.log("c", 2.0)
    m.log("c", torch.tensor(6.0), weight=torch.tensor(1.0))
    m.log("c", 100.0, weight=0)
    m.log("c", float("nan"), weight=0.0)  # a number weight 0 ignores a non-finite value too
    m.log("d", torch.tensor(3.0), weight=torch.tensor(2.0))  # a count: a weighted mean
    m.log("d", 6.0)
    d = m.epoch_diagnostics()
    assert d == {"a": 2.5, "c": 4.0, "d": 4.0}
    assert m.epoch_diagnostics() == {}  # reset
