"""Two processes simulated in one, for the methods' process-count tests: two trainers run in two
threads, a barrier-synchronised exchange stands in for every collective (``all_reduce_sum``,
``all_reduce_mean`` and the engine's gradient averaging after each ``backward``), and each rank
gets the samples ``r::2`` of a global batch (:func:`shard_batch`), as the engine's sharded
sampler deals them. A rank that makes a different sequence of collective calls than the other
fails (a shape mismatch, a timeout, or the final check)."""
from __future__ import annotations

import threading
from typing import Any, Callable

import torch

from mmbalance.engine.trainer import Trainer


def shard_batch(batch: Any, r: int, world: int = 2) -> Any:
    """Rank ``r``'s share of a global batch: samples ``r::world`` of every tensor."""
    if isinstance(batch, dict):
        return {k: shard_batch(v, r, world) for k, v in batch.items()}
    return batch[r::world]


def run_two_ranks(monkeypatch, make: Callable[[], Trainer], body: Callable[[Trainer, int], Any],
                  timeout: float = 60.0) -> list[Any]:
    """``[body(trainer_0, 0), body(trainer_1, 1)]``, run concurrently on two trainers from
    ``make()`` that believe they are ranks 0 and 1 of two processes. Collectives sum (or average)
    over the two ranks; ``backward`` averages the gradients over them as the engine does."""
    monkeypatch.setattr(Trainer, "world_size", property(lambda s: getattr(s, "_sim_world", 1)))
    monkeypatch.setattr(Trainer, "rank", property(lambda s: getattr(s, "_sim_rank", 0)))
    ranks = [make(), make()]
    barrier = threading.Barrier(2, timeout=timeout)
    box: dict[int, torch.Tensor] = {}
    calls: dict[int, list[str]] = {0: [], 1: []}
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def exchange(r: int, t: torch.Tensor, what: str) -> torch.Tensor:
        calls[r].append(f"{what}{tuple(t.shape)}")
        box[r] = t.detach().clone()
        barrier.wait()
        total = box[0] + box[1]
        barrier.wait()
        return total

    def run(r: int) -> None:
        try:
            tr = ranks[r]
            tr._sim_world, tr._sim_rank = 2, r
            tr.all_reduce_sum = lambda t: exchange(r, t, "sum")
            tr.all_reduce_mean = lambda t: exchange(r, t, "mean") / 2

            def backward(loss, **kwargs):
                tr.check_finite(loss)
                loss.backward(**kwargs)
                grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
                if not grads:
                    return
                flat = exchange(r, torch.cat([g.reshape(-1) for g in grads]), "grads") / 2
                off = 0
                for g in grads:
                    n = g.numel()
                    g.copy_(flat[off:off + n].view_as(g))
                    off += n

            tr.backward = backward
            results[r] = body(tr, r)
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert calls[0] == calls[1], f"the ranks made different collective calls: {calls}"
    return [results[0], results[1]]


def two_rank_step_grads(monkeypatch, make: Callable[[], Trainer], batch: Any) -> dict[str, torch.Tensor]:
    """The gradients one ``training_step`` leaves for the optimizer when ``batch`` is dealt to two
    simulated ranks (samples ``r::2``, as the engine's sharded sampler deals them): what a test
    compares with one process's step on the whole batch."""
    from helpers import capture_step_grads

    def body(tr: Trainer, r: int) -> dict[str, torch.Tensor]:
        tr.model.train()
        return capture_step_grads(tr, shard_batch(batch, r))

    g0, g1 = run_two_ranks(monkeypatch, make, body)
    for n in g0:  # backward averaged them over the ranks: both ranks hold the same gradients
        assert torch.equal(g0[n], g1[n]), n
    return g0


def two_ranks_vs_one(monkeypatch, make: Callable[[], Trainer], batch: Any, atol: float = 1e-6):
    """One process's step on ``batch`` and two simulated ranks' steps on its halves: asserts the
    ranks' gradients are identical and equal one process's (within ``atol``); returns the
    one-process and rank-0 diagnostics for the caller's own checks."""
    from helpers import capture_step_grads

    single = make()
    single.model.train()
    expected = capture_step_grads(single, batch)
    d1 = single.method.epoch_diagnostics()

    def body(tr: Trainer, r: int):
        tr.model.train()
        return capture_step_grads(tr, shard_batch(batch, r)), tr.method.epoch_diagnostics()

    (g0, d0), (g1, _) = run_two_ranks(monkeypatch, make, body)
    for n in expected:
        assert torch.allclose(g0[n], expected[n], atol=atol), n
        assert torch.equal(g0[n], g1[n]), n
    return d1, d0
