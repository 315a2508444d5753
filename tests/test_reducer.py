"""The overlapped gradient reducer (engine/distributed.py ``GradReducer``) and the sharded
evaluation's gather, in one process: bucket layout, the all-reduce launched while backward runs
(a real gloo group of one process), which gradients each bucket carries (accumulation,
``inputs=``, ``retain_graph``, parameters without a gradient) against the synchronous
``average_gradients``, and the shard gather's order. The two-process checks (replicas
bit-identical to the synchronous path, sharded evaluation equal to one process) are in
tests/test_distributed.py."""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mmbalance.engine import distributed as D


def mlp(dims=(4, 8, 8, 8, 3), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


MB = 2 ** -20  # one byte, in MB


# ------------------------------------------------------------------ bucket layout
def test_buckets_follow_reverse_registration_order_cap_and_dtype():
    model = mlp()
    model[2].double()  # a float64 layer: its own buckets
    params = list(model.parameters())
    # first bucket 1 parameter's worth (3 floats = 12 bytes: the last bias), the rest 40 floats
    r = D.GradReducer(params, bucket_mb=160 * MB, first_bucket_mb=12 * MB)
    try:
        order = [id(p) for b in r.buckets for p in b.params]
        assert sorted(order) == sorted(id(p) for p in params)  # every parameter exactly once
        for b in r.buckets:
            assert len({p.dtype for p in b.params}) == 1
            # inside a bucket: reverse registration order
            pos = [next(i for i, q in enumerate(params) if q is p) for p in b.params]
            assert pos == sorted(pos, reverse=True)
        f32 = [b for b in r.buckets if b.params[0].dtype == torch.float32]
        f64 = [b for b in r.buckets if b.params[0].dtype == torch.float64]
        assert [p is params[-1] for p in f32[0].params] == [True]  # first bucket: the last bias only
        assert all(b.nbytes() <= 160 or len(b.params) == 1 for b in f32[1:])  # only a lone parameter exceeds it
        # a bucket closes when the next parameter would overflow it
        for b, nxt in zip(f32[1:], f32[2:]):
            assert b.nbytes() + nxt.params[0].numel() * 4 > 160
        assert len(f64) == 2  # the float64 layer: its bias (first bucket of that dtype), its weight
        # the cap counts bytes: 8-byte float64 weight of 64 values = 512 bytes > 160, alone
        assert [p.shape for p in f64[1].params] == [torch.Size([8, 8])]
    finally:
        r.remove()


def test_frozen_parameters_get_no_bucket_and_matches_sees_changes():
    model = mlp()
    model[0].weight.requires_grad_(False)
    params = list(model.parameters())
    r = D.GradReducer(params)
    try:
        assert all(p is not model[0].weight for b in r.buckets for p in b.params)
        assert r.matches(model.parameters())
        model[0].weight.requires_grad_(True)
        assert not r.matches(model.parameters())
        model[0].weight.requires_grad_(False)
        model[4] = nn.Linear(8, 3)
        assert not r.matches(model.parameters())
    finally:
        r.remove()


def test_reachable_leaves_follow_the_graph():
    model = mlp()
    x = torch.randn(5, 4)
    h = model[:3](x)
    loss = h.sum()
    reach = D.reachable_leaves([loss])
    assert reach == {id(p) for p in model[:3].parameters()}
    leaf = torch.ones(2, requires_grad=True)
    assert D.reachable_leaves([leaf]) == {id(leaf)}
    assert D.reachable_leaves([torch.ones(2)]) == set()


# ------------------------------------------------------------------ a real process group of one
@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_buckets_are_all_reduced_asynchronously_while_backward_runs(group_of_one, monkeypatch):
    """The bucket of the last layers is launched (async) before backward reaches the input, and
    backward returns before finish() waits: communication overlaps the rest of backward."""
    model = mlp(dims=(4, 16, 16, 16, 16, 3))
    r = D.GradReducer(model.parameters(), bucket_mb=300 * MB, first_bucket_mb=60 * MB)
    events: list[str] = []
    real = dist.all_reduce

    def recording(t, *a, **kw):
        events.append(f"launch async={kw.get('async_op', False)}")
        return real(t, *a, **kw)

    monkeypatch.setattr(dist, "all_reduce", recording)
    x = torch.randn(6, 4, requires_grad=True)
    x.register_hook(lambda g: events.append("input grad"))  # the last thing backward computes
    loss = model(x).pow(2).sum()
    expected = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    r.begin([loss])
    loss.backward()
    events.append("backward returned")
    r.finish()
    events.append("finished")
    assert len(r.buckets) >= 4
    n = len(r.buckets)
    # every bucket is launched asynchronously inside backward, most before backward reaches the
    # first layer (the input's gradient), and none is left for finish()
    assert events.index("backward returned") == n + 1 and events[-1] == "finished"
    assert events.count("launch async=True") == n == r.launches["launched_in_backward"]
    assert events[:events.index("input grad")].count("launch async=True") >= n - 2
    assert r.launches["flushed"] == 0
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(p.grad, g)  # a world of one: the average is the gradient
    # outside begin/finish the hooks do nothing, also after a backward that raised (the
    # trainer then clears ``active``) left buckets half ready
    events.clear()
    model.zero_grad()
    model(x).sum().backward()
    loss = model(x).sum()
    r.begin([loss])
    r.active = False
    loss.backward()
    assert events == ["input grad", "input grad"]
    r.remove()


def test_a_gradient_after_the_launch_reduces_the_bucket_again(group_of_one):
    """A parameter whose hook fires twice in one backward (reentrant backward): its bucket's
    early result is dropped and the final accumulated gradient is reduced in finish()."""
    p = nn.Parameter(torch.ones(3))
    r = D.GradReducer([p])
    try:
        loss = (p * 2).sum()
        r.begin([loss])
        loss.backward(retain_graph=True)
        assert r.launches["launched_in_backward"] == 1
        r._on_grad(p)  # the same parameter fires again after the launch
        assert r.buckets[0].stale
        r.finish()
        assert r.launches["flushed"] == 1
        assert torch.equal(p.grad, torch.full((3,), 2.0))
    finally:
        r.remove()


def test_all_gather_shards_on_one_process_is_identity(group_of_one):
    t = torch.arange(6.0).view(3, 2)
    (got,) = D.all_gather_shards([t], 3)
    assert torch.equal(got, t)


# ------------------------------------------------------------------ two ranks, simulated
class FakeWork:
    def __init__(self, log, i):
        self.log, self.i = log, i

    def wait(self):
        self.log.append(("wait", self.i))


def fake_two_ranks(monkeypatch, other):
    """``dist.all_reduce`` of a world of two whose other rank holds ``other(t)`` (recorded)."""
    log: list = []

    def all_reduce(t, *a, async_op=False, **kw):
        log.append(("reduce", t.numel(), async_op))
        t.add_(other(t))
        return FakeWork(log, len(log) - 1) if async_op else None

    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return log


def sync_reference(model, run, other):
    """The gradients the synchronous path gives after ``run(backward)``, where ``backward``
    is ``loss.backward(**kw)`` then ``average_gradients`` (the fake reduction already patched)."""

    def backward(loss, **kw):
        loss.backward(**kw)
        D.average_gradients(model.parameters())

    model.zero_grad(set_to_none=True)
    run(backward)
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def overlapped(model, reducer, run):
    def backward(loss, **kw):
        reducer.begin([loss], kw.get("inputs"))
        loss.backward(**kw)
        reducer.finish()

    model.zero_grad(set_to_none=True)
    run(backward)
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def scenarios(model, seed: int = 1):
    """Sequences of backward calls before one optimizer step (each takes the ``backward`` to
    use); ``seed`` draws the input (a rank's own data in tests/test_distributed.py)."""
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(seed))
    head = list(model[6].parameters())

    def accumulate(backward):  # two backwards before one step: the hook sees the accumulated .grad
        backward(model(x).pow(2).mean())
        backward(model(x * 0.5).sum())

    def retain(backward):  # MMPareto: backward with retain_graph, then a second loss on the same graph
        h = model[:4](x)
        out = model[4:](h)
        backward(out.sum(), retain_graph=True)
        backward(h.pow(2).sum())  # reaches the first layers only: the head is reduced from its earlier grad

    def inputs(backward):  # inputs=: only these accumulate; the rest keep their earlier gradient
        backward(model(x).sum())
        backward(model(x).pow(2).sum(), inputs=head)

    def partial(backward):  # a backward that reaches part of the model, nothing before
        backward(model[:2](x).sum())

    return {"accumulate": accumulate, "retain": retain, "inputs": inputs, "partial": partial}


@pytest.mark.parametrize("name", ["accumulate", "retain", "inputs", "partial"])
@pytest.mark.parametrize("bucket_bytes", [1, 100, 10 ** 6])
def test_overlapped_equals_synchronous_averaging(monkeypatch, name, bucket_bytes):
    """With the other rank's gradient a fixed function of this one's, the overlapped reducer
    leaves exactly the synchronous path's gradients, whatever the bucket size, and reduces
    every parameter with a gradient once per backward."""
    other = lambda t: t * 3 + 0.25  # noqa: E731 - elementwise, exactly rounded: the same whatever the buckets
    log = fake_two_ranks(monkeypatch, other)
    model = mlp()
    run = scenarios(model)[name]
    want = sync_reference(model, run, other)
    log.clear()
    r = D.GradReducer(model.parameters(), bucket_mb=bucket_bytes * MB, first_bucket_mb=bucket_bytes * MB)
    try:
        got = overlapped(model, r, run)
    finally:
        r.remove()
    for w, g in zip(want, got):
        assert (w is None) == (g is None)
        if w is not None:
            assert torch.equal(w, g)
    n_grads = sum(g.numel() for g in got if g is not None)
    reduced = sum(n for kind, n, *_ in log if kind == "reduce")
    backwards = {"accumulate": 2, "retain": 2, "inputs": 2, "partial": 1}[name]
    if name == "partial":
        assert reduced == n_grads
    else:  # every backward reduces every gradient held (accumulated ones again)
        assert reduced == backwards * n_grads
    assert all(e[2] for e in log if e[0] == "reduce")  # all launched during backward
    assert r.launches["flushed"] == 0
    assert all(("wait", i) in log for i, e in enumerate(log) if e[0] == "reduce" and e[2])


def test_launch_order_is_bucket_order_whatever_order_gradients_arrive(monkeypatch):
    """Buckets launch in index order only: one that is ready early waits for the lower ones, so
    every rank issues the same sequence of collectives."""
    log = fake_two_ranks(monkeypatch, lambda t: t)
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    r = D.GradReducer([a, b], bucket_mb=4 * MB, first_bucket_mb=4 * MB)  # buckets: [b], [a]
    try:
        assert [bk.params[0] is b for bk in r.buckets] == [True, False]
        loss = (a * 2).sum() + (b * 3).sum()
        r.begin([loss])
        assert log == []
        r._on_grad(a)  # bucket 1 ready first (as if its gradient arrived first): held back
        a.grad = torch.full((2,), 2.0)
        assert log == []
        b.grad = torch.full((3,), 3.0)
        r._on_grad(b)
        assert [e[1] for e in log] == [3, 2]  # b's bucket, then a's
        r.active = False  # the real backward below is not part of this test
        for bk in r.buckets:
            bk.work = None
    finally:
        r.remove()


def test_buckets_holding_only_earlier_gradients_launch_at_begin(monkeypatch):
    """A parameter the backward does not reach but which holds a gradient (accumulation) is
    ready at once: its bucket does not wait for a hook that will not come."""
    log = fake_two_ranks(monkeypatch, lambda t: t)
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    r = D.GradReducer([a, b], bucket_mb=4 * MB, first_bucket_mb=4 * MB)  # buckets: [b], [a]
    try:
        b.grad = torch.ones(3)
        loss = (a * 2).sum()
        r.begin([loss])
        assert [e[1:] for e in log] == [(3, True)]  # b's bucket, before backward
        loss.backward()
        r.finish()
        assert [e[1:] for e in log if e[0] == "reduce"] == [(3, True), (2, True)]
        assert torch.equal(a.grad, torch.full((2,), 2.0)) and torch.equal(b.grad, torch.ones(3))
    finally:
        r.remove()


# ------------------------------------------------------------------ the shard gather's order
def test_all_gather_shards_restores_the_split_order(monkeypatch):
    """Ranks hold positions r::world (sizes differ by one); the gather pads, exchanges and
    interleaves them back into the split's order, per dtype, bools included."""
    n, world = 7, 3
    full = {"f": torch.arange(n * 2, dtype=torch.float32).view(n, 2), "y": torch.arange(n) * 10,
            "p": torch.arange(n) % 2 == 0, "z": torch.arange(n * 4, dtype=torch.float32).view(n, 2, 2)}
    shards = [{k: v[r::world] for k, v in full.items()} for r in range(world)]
    calls = []

    def all_gather(parts, t):
        calls.append(t.dtype)
        assert t.shape[0] == 3  # ceil(7 / 3)
        rows = [pad_of(r, t.dtype) for r in range(world)]
        for dst, src in zip(parts, rows):
            dst.copy_(src)

    def pad_of(r, dtype):
        s = shards[r]
        cols = {torch.float32: torch.cat([s["f"], s["z"].reshape(-1, 4)], 1), torch.int64: s["y"].view(-1, 1),
                torch.uint8: s["p"].to(torch.uint8).view(-1, 1)}[dtype]
        out = cols.new_full((3, cols.shape[1]), 99)
        out[:len(cols)] = cols
        return out

    monkeypatch.setattr(D, "world_size", lambda: world)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    s = shards[1]
    got = D.all_gather_shards([s["f"], s["y"], s["p"], s["z"]], n)
    assert sorted(map(str, calls)) == ["torch.float32", "torch.int64", "torch.uint8"]  # one call per dtype
    for key, g in zip("fypz", got):
        assert g.dtype == full[key].dtype and torch.equal(g, full[key]), key
