"""InfoReg: the Fisher trace against a direct computation, the prime-window rate by hand and
against the public code's running means, the proximal coefficients, the training step against
a hand-written reference (loss composition, the pull on the dominant encoder only, the head
untouched), window boundaries, regulation of any modality, resume, and two simulated processes."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods.inforeg import (fisher_trace, inforeg_betas, prime_window_rate, proximal_pull_,
                                       trace_parameters)
from mmbalance.registry import ConfigError

from helpers import assert_score_diagnostics_skip_absent_steps, capture_step_grads, quick_config, tiny_data
from simulated_ranks import run_two_ranks, shard_batch


# ----------------------------------------------------------------------------- pure math
def test_fisher_trace_equals_the_direct_gradient_of_a_linear_softmax_model():
    """For z = W x + b and the mean CE, dL/dW = (P - Y)^T X / B and dL/db = mean(P - Y): the trace
    is the sum of their squared entries."""
    g = torch.Generator().manual_seed(0)
    B, d, C = 7, 5, 4
    X, y = torch.randn(B, d, generator=g), torch.randint(0, C, (B,), generator=g)
    lin = torch.nn.Linear(d, C)
    F.cross_entropy(lin(X), y).backward()
    with torch.no_grad():
        R = torch.softmax(lin(X), 1) - F.one_hot(y, C).float()
        dW, db = R.T @ X / B, R.mean(0)
    direct = float((dW.double() ** 2).sum() + (db.double() ** 2).sum())
    assert float(fisher_trace([lin.weight.grad, lin.bias.grad])) == pytest.approx(direct, rel=1e-5)
    layer_mean = float((dW.double() ** 2).mean() + (db.double() ** 2).mean())
    assert float(fisher_trace([lin.weight.grad, lin.bias.grad], "layer_mean")) == pytest.approx(layer_mean, rel=1e-5)
    assert float(fisher_trace([None, lin.bias.grad])) == pytest.approx(float((db.double() ** 2).sum()), rel=1e-5)
    assert float(fisher_trace([])) == 0.0
    with pytest.raises(ConfigError):
        fisher_trace([lin.bias.grad], "max")


def _public_code_rates(traces, window=10):
    """The public code's rate, transcribed: a list that starts with ten zeros, k = 1 in epoch 0."""
    hist, out = [0.0] * window, []
    for e in range(len(traces) + 1):
        if e == 0:
            out.append(1.0)
        else:
            tr1 = sum(hist[-window:]) / window
            tr2 = sum(hist[-window - 1:-1]) / window
            out.append((tr1 - tr2) / tr1)
        if e < len(traces):
            hist.append(traces[e])
    return out


def test_prime_window_rate_by_hand_and_as_the_public_code():
    assert prime_window_rate([]) == 1.0
    assert prime_window_rate([2.0, 4.0], window=2) == pytest.approx((3.0 - 1.0) / 3.0)   # [0,0,2,4]
    assert prime_window_rate([1, 2, 3, 4, 5], window=2) == pytest.approx((4.5 - 3.5) / 4.5)
    assert prime_window_rate([3.0] * 5, window=2) == 0.0          # a flat trace has left its window
    assert prime_window_rate([0.0, 0.0], window=2) == 0.0         # no information at all: not a window
    traces = [1.0, 3.0, 6.0, 8.0, 9.0, 9.5, 9.7, 9.8, 9.9, 10.0, 10.0, 10.1, 10.1, 10.0]
    expected = _public_code_rates(traces)
    got = [prime_window_rate(traces[:e]) for e in range(len(traces) + 1)]
    assert got == pytest.approx(expected)
    # with a flat trace the zero padding alone keeps k = 1/e for the first epochs: e < 25 > 0.04
    flat = [prime_window_rate([5.0] * e) for e in range(1, 11)]
    assert flat == pytest.approx([1 / e for e in range(1, 11)])


def test_betas_by_hand():
    b, gap = inforeg_betas(torch.tensor([3.0, 2.0]), 0.95, [True, True])
    assert gap.tolist() == [1.0, -1.0]
    assert b.tolist() == pytest.approx([0.95 * math.exp(math.tanh(1.0)), 0.0])
    b, _ = inforeg_betas(torch.tensor([1.0, 4.0]), 0.5, [True, True])   # the second modality: any modality
    assert b.tolist() == pytest.approx([0.0, 0.5 * math.exp(math.tanh(3.0))])
    b, _ = inforeg_betas(torch.tensor([1.0, 4.0]), 0.5, [True, False])  # outside its window: no pull
    assert b.tolist() == [0.0, 0.0]
    b, _ = inforeg_betas(torch.tensor([2.0, 2.0]), 0.5, [True, True])   # tie
    assert b.tolist() == [0.0, 0.0]
    b, gap = inforeg_betas(torch.tensor([6.0, 2.0, 4.0]), 1.0, [True, True, True])
    assert gap.tolist() == pytest.approx([3.0, -3.0, 0.0])
    assert b.tolist() == pytest.approx([math.exp(math.tanh(3.0)), 0.0, 0.0])


def test_betas_with_missing_modalities_compare_on_a_common_scale():
    # b present in half the samples with the same mean score: no gap
    b, gap = inforeg_betas(torch.tensor([8.0, 4.0]), 1.0, [True, True], counts=torch.tensor([16.0, 8.0]))
    assert gap.tolist() == [0.0, 0.0] and b.tolist() == [0.0, 0.0]
    # b absent from the whole batch: it takes no part and nobody is pulled
    b, gap = inforeg_betas(torch.tensor([8.0, 0.0]), 1.0, [True, True], counts=torch.tensor([16.0, 0.0]))
    assert b.tolist() == [0.0, 0.0]


def test_proximal_pull_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    q = torch.nn.Parameter(torch.tensor([0.5]))
    p.grad = torch.tensor([0.1, 0.1])
    proximal_pull_([p, q], [torch.tensor([0.0, 4.0]), torch.tensor([0.0])], 0.5)  # q has no grad: skipped
    assert p.grad.tolist() == pytest.approx([0.1 + 0.5 * 1.0, 0.1 + 0.5 * (2.0 - 4.0)])
    assert q.grad is None


def test_trace_parameters_are_the_conv_and_linear_weights():
    enc = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    got = trace_parameters(enc)
    assert [tuple(p.shape) for p in got] == [(2, 1, 3, 3), (3, 8)]


def test_options_are_validated():
    with pytest.raises(ConfigError, match="beta"):
        create_method("inforeg", beta=-1)
    with pytest.raises(ConfigError, match="trace_reduction"):
        create_method("inforeg", trace_reduction="max")
    with pytest.raises(ConfigError, match="window_modality 'x'"):
        _trainer(window_modality="x")
    with pytest.raises(ConfigError, match="at least two modalities"):
        Trainer(quick_config("inforeg", epochs=1, **{"dataset.options": {"modalities": ["pix"]}}))


# ----------------------------------------------------------------------------- training step
def _trainer(missing=0.0, bn=False, absent_policy="input", **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("inforeg", epochs=1, **{"train.batch_size": 32, "train.seed": 3,
                                                "model.absent_policy": absent_policy, **over})
    return Trainer(cfg, data=tiny_data(64, ("a", "v"), hidden=[8], dropout=0.0, missing=missing, batchnorm=bn,
                                       signal={"a": 2.0, "v": 0.2}))


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=32, shuffle=True, seed=seed)))


def _warm(tr, batch):
    """Start an epoch, take one step (so the weights leave the epoch-start anchor), return the anchor."""
    tr.method.on_epoch_start(tr.epoch)
    anchor = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.model.train()
    tr.method.training_step(_batch(tr, seed=9))
    return anchor


def _reference(tr, batch, anchor, beta, unimodal_weight, in_window=(True, True)):
    """InfoReg written out for two modalities: CE(z) (+ w * CE(z_m)), the score sums, the pull
    beta * exp(tanh(s_dom - s_other)) * (theta - theta^0) on the dominant encoder's parameters."""
    model = copy.deepcopy(tr.model)
    y = batch["label"]
    out = model(batch["inputs"])
    loss = F.cross_entropy(out.logits, y)
    for m in ("a", "v"):
        loss = loss + unimodal_weight * F.cross_entropy(out.unimodal_logits[m], y)
    loss.backward()
    s = [float(F.softmax(out.unimodal_logits[m].detach(), 1).gather(1, y[:, None]).sum()) for m in ("a", "v")]
    trace = {m: sum(float((p.grad.double() ** 2).sum()) for p in model.encoders[m].parameters() if p.dim() >= 2)
             for m in ("a", "v")}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    betas = {}
    for i, m in enumerate(("a", "v")):
        gap = s[i] - s[1 - i]
        betas[m] = beta * math.exp(math.tanh(gap)) if gap > 0 and in_window[i] else 0.0
        for n, p in model.encoders[m].named_parameters():
            full = f"encoders.{m}.{n}"
            grads[full] = grads[full] + betas[m] * (p.detach() - anchor[full])
    return grads, betas, trace


@pytest.mark.parametrize("unimodal_weight", [0.0, 1.0])
def test_training_step_equals_a_hand_written_reference(unimodal_weight):
    tr = _trainer(beta=0.7, unimodal_weight=unimodal_weight)
    batch = _batch(tr)
    anchor = _warm(tr, batch)
    expected, betas, _ = _reference(tr, batch, anchor, 0.7, unimodal_weight)
    assert sum(b > 0 for b in betas.values()) == 1  # exactly one encoder is pulled
    got = capture_step_grads(tr, batch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n
    d = tr.method.epoch_diagnostics()
    assert d["window_a"] == d["window_v"] == 1.0
    # logged per step: the warm step and this one
    dom = max(betas, key=betas.get)
    assert d[f"beta_{dom}"] >= betas[dom] / 2


def test_the_pull_reaches_any_modality():
    """Labels chosen where v's probability most exceeds a's make v the dominant modality: v's
    encoder is pulled (the public code can only ever pull audio, the first modality)."""
    tr = _trainer(beta=0.7)
    batch = _batch(tr)
    anchor = _warm(tr, batch)
    with torch.no_grad():
        z = tr.model(batch["inputs"]).unimodal_logits
        batch["label"] = (z["v"].softmax(1) - z["a"].softmax(1)).argmax(1)
    expected, betas, _ = _reference(tr, batch, anchor, 0.7, 0.0)
    assert betas["v"] > 0 and betas["a"] == 0
    got = capture_step_grads(tr, batch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


@pytest.mark.parametrize("absent_policy", ["input", "feature"])
def test_training_step_with_missing_modalities_equals_a_hand_written_reference(absent_policy):
    """Absent samples are left out of each unimodal CE (a mean over the present ones) and of the
    score sums, which are put on the fullest modality's scale before the gap; the forward
    represents them by the model's absent policy (zero input or zero feature)."""
    tr = _trainer(missing={"v": 0.5}, absent_policy=absent_policy, beta=0.7, unimodal_weight=1.0)
    batch = _batch(tr)
    pres = batch["present"]
    assert not pres["v"].all() and pres["a"].all()
    anchor = _warm(tr, batch)
    model = copy.deepcopy(tr.model)
    y = batch["label"]
    out = model(batch["inputs"], pres)
    loss = F.cross_entropy(out.logits, y)
    for m in ("a", "v"):
        loss = loss + F.cross_entropy(out.unimodal_logits[m][pres[m]], y[pres[m]])
    loss.backward()
    n = {m: float(pres[m].sum()) for m in ("a", "v")}
    s = {m: float(F.softmax(out.unimodal_logits[m].detach(), 1).gather(1, y[:, None]).squeeze(1)[pres[m]].sum())
         * max(n.values()) / n[m] for m in ("a", "v")}
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    pulled = 0
    for m, o in (("a", "v"), ("v", "a")):
        gap = s[m] - s[o]
        if gap > 0:
            pulled += 1
            for k, p in model.encoders[m].named_parameters():
                full = f"encoders.{m}.{k}"
                expected[full] += 0.7 * math.exp(math.tanh(gap)) * (p.detach() - anchor[full])
    assert pulled == 1
    got = capture_step_grads(tr, batch)
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k


def test_epoch_trace_history_and_window_boundary():
    """The epoch's trace is the sum over its steps of sum g^2 of the loss gradient (conv/linear
    weights); it enters the history at the epoch end; the next epoch is in the window exactly
    when the rate exceeds the threshold, and outside it the step is plain joint training."""
    tr = _trainer(window=2, threshold=0.3)
    batches = [_batch(tr, seed=s) for s in (1, 2)]
    tr.method.on_epoch_start(0)
    traces = {"a": 0.0, "v": 0.0}
    tr.model.train()
    for b in batches:
        model = copy.deepcopy(tr.model)
        F.cross_entropy(model(b["inputs"]).logits, b["label"]).backward()
        for m in traces:  # conv/linear weights: the MLP's Linear weights, not its biases
            traces[m] += sum(float((p.grad.double() ** 2).sum()) for n, p in model.encoders[m].named_parameters()
                             if n.endswith("weight"))
        tr.method.training_step(b)
    tr.method.on_epoch_end(0)
    for m in traces:
        assert tr.method.history[m] == pytest.approx([traces[m]], rel=1e-6)
    d = tr.method.epoch_diagnostics()
    assert d["trace_a"] == pytest.approx(traces["a"], rel=1e-6)
    # window = 2: history [t] -> rate 1 > 0.3; [t, t, t] -> 0; [t, 2t] -> (1.5 - 0.5) / 1.5
    for hist, inside in (([1.0, 1.0, 1.0], False), ([1.0, 2.0], True), ([4.0, 4.0, 5.0], False), ([4.0, 4.0, 8.0], True)):
        tr.method.history = {"a": list(hist), "v": list(hist)}
        rate = prime_window_rate(hist, 2)
        assert (rate > 0.3) == inside
        tr.epoch = 1
        tr.method.on_epoch_start(1)
        anchor = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        with torch.no_grad():
            for p in tr.model.encoders.parameters():
                p.add_(0.05)  # away from the anchor, so a pull would show
        batch = batches[0]
        expected, betas, _ = _reference(tr, batch, anchor, 0.95, 0.0, in_window=(inside, inside))
        assert (max(betas.values()) > 0) == inside
        got = capture_step_grads(tr, batch)
        for n in expected:
            assert torch.allclose(got[n], expected[n], atol=1e-6), (hist, n)
        d = tr.method.epoch_diagnostics()
        assert d["window_a"] == float(inside) and d["rate_a"] == pytest.approx(rate)


def test_window_modality_takes_every_window_from_one_trace():
    tr = _trainer(window=2, threshold=0.3, window_modality="a")
    tr.method.history = {"a": [1.0, 2.0], "v": [1.0, 1.0, 1.0]}  # a rising, v flat
    tr.method.on_epoch_start(3)
    d = tr.method.epoch_diagnostics()
    assert d["window_a"] == d["window_v"] == 1.0
    own = _trainer(window=2, threshold=0.3)
    own.method.history = {"a": [1.0, 2.0], "v": [1.0, 1.0, 1.0]}
    own.method.on_epoch_start(3)
    d = own.method.epoch_diagnostics()
    assert d["window_a"] == 1.0 and d["window_v"] == 0.0


def test_trace_reduction_layer_mean():
    tr = _trainer(trace_reduction="layer_mean")
    batch = _batch(tr)
    tr.method.on_epoch_start(0)
    model = copy.deepcopy(tr.model)
    F.cross_entropy(model(batch["inputs"]).logits, batch["label"]).backward()
    expected = sum(float((p.grad.double() ** 2).mean()) for p in trace_parameters(model.encoders["a"]))
    tr.model.train()
    tr.method.training_step(batch)
    tr.method.on_epoch_end(0)
    assert tr.method.history["a"] == pytest.approx([expected], rel=1e-6)


def test_resume_state_round_trip_gives_the_same_next_epoch():
    a = _trainer(window=3)
    a.method.on_epoch_start(0)
    a.model.train()
    a.method.training_step(_batch(a, seed=1))
    a.method.on_epoch_end(0)
    a.method.epoch_diagnostics()  # as the engine does after every epoch
    b = _trainer(window=3)
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    assert b.method.history == a.method.history and len(a.method.history["a"]) == 1
    for t in (a, b):
        t.epoch = 1
        t.method.on_epoch_start(1)
        t.model.train()
        t.method.training_step(_batch(t, seed=2))  # moves the weights away from the anchor
    batch = _batch(a, seed=3)
    ga, gb = capture_step_grads(a, batch), capture_step_grads(b, batch)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    assert a.method.epoch_diagnostics() == b.method.epoch_diagnostics()


def test_a_state_without_history_starts_the_traces_afresh():
    """A checkpoint without the method's state (the engine passes {}): no history, so epoch 0's
    rate is 1 (in the window) and the epoch's trace starts a new history."""
    tr = _trainer(window=3)
    tr.method.load_state_dict({})
    assert tr.method.history == {}
    tr.method.on_epoch_start(0)
    assert tr.method.epoch_diagnostics()["window_a"] == 1.0
    tr.model.train()
    tr.method.training_step(_batch(tr))
    tr.method.on_epoch_end(0)
    assert [len(tr.method.history[m]) for m in ("a", "v")] == [1, 1] and tr.method.history["a"][0] > 0


def test_score_diagnostics_are_mean_true_class_probabilities_over_present_samples():
    """score_v averages the steps where v is present: a batch without v leaves it unchanged
    (no 0/0), and a batch with a single v sample counts."""
    tr = _trainer(missing={"v": 0.5}, beta=0.0)
    batch = _batch(tr)
    tr.method.on_epoch_start(0)
    assert_score_diagnostics_skip_absent_steps(tr, batch)


def test_fit_three_modalities_missing_data_and_gated():
    res = Trainer(quick_config("inforeg", epochs=2, **{"dataset.options": {"modalities": ["pix", "fou", "zer"]},
                                                       "method.unimodal_weight": 1.0})).fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    tr = Trainer(quick_config("inforeg", epochs=2, **{"model.fusion": "gated", "dataset.missing_rate": 0.3}))
    tr.fit()
    assert len(tr.method.history["pix"]) == 2 and all(t > 0 for t in tr.method.history["pix"])


def test_two_processes_with_missing_modalities_equal_one_process(monkeypatch):
    """Scores and counts are summed over processes; the trace and the pull act on the averaged
    gradient: every rank applies the update, and records the trace, of one process."""
    def make():
        tr = _trainer(missing=0.5, beta=0.7, unimodal_weight=1.0)
        tr.method.on_epoch_start(0)
        with torch.no_grad():
            for p in tr.model.encoders.parameters():
                p.add_(0.03)  # away from the anchor
        return tr

    batch = _batch(make())
    assert batch["present"]["a"][0::2].sum() != batch["present"]["a"][1::2].sum()
    single = make()
    single.model.train()
    expected = capture_step_grads(single, batch)
    single.method.on_epoch_end(0)
    d1 = single.method.epoch_diagnostics()
    assert max(d1["beta_a"], d1["beta_v"]) > 0

    def body(tr, r):
        tr.model.train()
        grads = capture_step_grads(tr, shard_batch(batch, r))
        tr.method.on_epoch_end(0)
        return grads, tr.method.history

    (g0, h0), (g1, h1) = run_two_ranks(monkeypatch, make, body)
    for n in expected:
        assert torch.allclose(g0[n], expected[n], atol=1e-6), n
        assert torch.equal(g0[n], g1[n]), n
    assert h0 == h1
    for m in ("a", "v"):
        assert h0[m] == pytest.approx(single.method.history[m], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# the rule on the device: the same numbers as the rule in plain Python, nothing read back
from test_precision import count_synchronisations


def _host_betas(scores, beta, in_window, counts=None):
    """The rule of :func:`inforeg_betas` in plain Python (float64), as float32 tensors."""
    s = [float(x) for x in scores]
    on = [True] * len(s)
    if counts is not None:
        n = [float(x) for x in counts]
        top = max(n)
        s = [si * top / ni if ni > 0 else 0.0 for si, ni in zip(s, n)]
        on = [ni > 0 for ni in n]
    gap, b = [0.0] * len(s), [0.0] * len(s)
    k = sum(on)
    if k >= 2:
        total = sum(x for x, o in zip(s, on) if o)
        for m in range(len(s)):
            if on[m]:
                gap[m] = s[m] - (total - s[m]) / (k - 1)
                if gap[m] > 0 and in_window[m]:
                    b[m] = beta * math.exp(math.tanh(gap[m]))
    return torch.tensor(b), torch.tensor(gap)


def test_betas_on_the_device_equal_the_plain_python_rule():
    g = torch.Generator().manual_seed(4)
    for trial in range(300):
        M = 2 + trial % 3
        scores = (torch.rand(M, generator=g, dtype=torch.float64) * 40).round(decimals=trial % 4)
        counts = torch.randint(0, 4, (M,), generator=g).double() * 8 if trial % 2 else None
        window = [bool(v) for v in torch.rand(M, generator=g) < 0.8]
        (b, gap), n = count_synchronisations(lambda: inforeg_betas(scores, 0.95, window, counts))
        want_b, want_gap = _host_betas(scores, 0.95, window, counts)
        assert n == 0 and b.dtype == gap.dtype == torch.float32
        assert torch.equal(b, want_b) and torch.equal(gap, want_gap), (scores, counts, window)


def test_proximal_pull_with_a_device_beta_equals_the_float_one():
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 3), (3,)]
    anchors = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    for beta in (0.0, 1.7321):
        a = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(9))) for s in shapes]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        for p, q, t in zip(a, b, grads):
            p.grad, q.grad = t.clone(), t.clone()
        proximal_pull_(a, anchors, beta)
        _, n = count_synchronisations(lambda: proximal_pull_(b, anchors, torch.tensor(beta)))
        assert n == 0
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
        if beta == 0.0:  # a zero coefficient leaves the gradients exactly as they were
            assert all(torch.equal(q.grad, t) for q, t in zip(b, grads))
