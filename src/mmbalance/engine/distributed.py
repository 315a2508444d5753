"""Multi-process training with ``torchrun`` (CPU: gloo, GPU: NCCL).

How it works, in a few lines, without wrapping the model in DDP (methods call encoders and
fusions directly, not one ``forward``):

* the training split is sharded so that, at every step, the ranks together see exactly the
  batch one process would see (:class:`ShardedSampler`; ``train.batch_size`` stays the
  *global* batch size; an epoch whose size is not a multiple of the number of processes
  leaves its last ``size mod world`` shuffled samples out);
* during every ``trainer.backward`` the gradients are averaged over ranks while backward still
  runs, as DDP's reducer does (:class:`GradReducer`): the parameters are grouped into buckets
  (reverse registration order, about ``train.bucket_mb`` MB each, the first one 1 MB, one dtype
  per bucket), and a bucket whose parameters have all received this backward's gradient is
  flattened and all-reduced asynchronously; when ``loss.backward()`` returns the engine waits
  for every bucket, reduces what was not launched and copies the averages back. So when
  ``trainer.backward`` returns, every method sees the full global-batch gradient, exactly the
  one the synchronous :func:`average_gradients` gives (bit for bit with two processes; with
  more, identical on every rank): clipping, gradient modulation, projections, SAM and the
  methods that call backward several times or accumulate need no synchronous mode.
  ``train.bucket_mb 0`` selects the
  synchronous path: one flat all-reduce per dtype after backward;
* after every optimizer step the buffers (BatchNorm statistics) are broadcast from rank 0, as
  DDP does;
* methods all-reduce the batch statistics their rules use (``trainer.all_reduce_*``) and shard
  their per-epoch passes (``trainer.shard``);
* evaluation is sharded too: each rank predicts positions ``rank::world`` of the split, the
  outputs are gathered to every rank in the split's order (:func:`all_gather_shards`), and
  every rank computes the same metrics; only rank 0 writes.

The contract that keeps the ranks' collective calls in step: after a backward every rank holds
the same set of parameters with a gradient (methods run placeholder passes for modalities a
rank's share of the batch lacks), so every rank launches the same buckets in the same order.

Launch: ``torchrun --nproc-per-node 2 -m mmbalance train ...``; several machines:
``torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m
mmbalance train ...`` on each machine.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import threading
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE > 1)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_dt.timedelta(minutes=30))
    return True


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def average_gradients(params) -> None:
    """Average ``.grad`` over ranks, in one flat all-reduce per dtype."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    ws = world_size()
    for dtype in {g.dtype for g in grads}:
        group = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= ws
        offset = 0
        for g in group:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


#: size cap (MB) of the gradient buckets all-reduced while backward runs; 0 = synchronous
#: averaging after backward (:func:`average_gradients`)
GRAD_BUCKET_MB: float = 25.0
#: cap of the first bucket (the last layers' gradients, ready first), as DDP: starts the
#: communication early
FIRST_BUCKET_MB: float = 1.0


def reachable_leaves(roots: Sequence[torch.Tensor]) -> set[int]:
    """``id``s of the leaf tensors a backward from ``roots`` accumulates into (the
    ``AccumulateGrad`` nodes reachable in their autograd graph)."""
    out: set[int] = set()
    stack, seen = [], set()
    for t in roots:
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
        elif t.requires_grad:
            out.add(id(t))
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            out.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None and nxt not in seen)
    return out


class _Bucket:
    __slots__ = ("params", "members", "pending", "flat", "work", "stale")

    def __init__(self) -> None:
        self.params: list[torch.nn.Parameter] = []
        self.members: list[torch.nn.Parameter] = []
        self.pending: set[int] = set()
        self.flat: torch.Tensor | None = None
        self.work: Any = None
        self.stale = False

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


class GradReducer:
    """Average the gradients of ``params`` over ranks while backward runs (DDP's reducer, for
    models driven by methods rather than one ``forward``).

    Buckets hold parameters in reverse registration order (the order backward produces their
    gradients), one dtype and device each, up to ``bucket_mb`` MB (the first ``first_bucket_mb``).
    Use::

        reducer.begin([loss], inputs)   # which parameters this backward reaches
        loss.backward(inputs=inputs)    # hooks launch full buckets asynchronously, in order
        reducer.finish()                # wait, reduce the rest, average, copy back

    A bucket reduces its parameters that hold a gradient after this backward: those the backward
    reaches and those holding one from an earlier backward (accumulation), exactly the set the
    synchronous :func:`average_gradients` reduces. It is launched once each of them is ready (a
    reached parameter when its post-accumulate hook fires, with the accumulated ``.grad``; the
    others at once), and only after every lower bucket, so every rank issues the same
    collectives in the same order. What was not launched during backward (a reached parameter
    whose hook did not fire) is reduced by :meth:`finish` in one flat all-reduce per dtype, and a
    bucket whose parameter fired again after its launch (reentrant backward) is discarded and
    reduced there too. Outside ``begin`` / ``finish`` the hooks do nothing, so a method's own
    ``loss.backward()`` followed by :func:`average_gradients` is unaffected.

    ``launches`` counts the buckets launched while backward ran (``launched_in_backward``) and
    after it (``flushed``) in the last backward.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], bucket_mb: float = GRAD_BUCKET_MB,
                 first_bucket_mb: float = FIRST_BUCKET_MB):
        self.params = list(params)
        self.bucket_mb = bucket_mb
        self.signature = [(p, p.requires_grad) for p in self.params]
        cap, first_cap = int(bucket_mb * 2 ** 20), int(min(first_bucket_mb, bucket_mb) * 2 ** 20)
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, _Bucket] = {}
        open_: dict[tuple[Any, torch.dtype], _Bucket] = {}
        started: set[tuple[Any, torch.dtype]] = set()
        for p in reversed(self.params):
            if not p.requires_grad or id(p) in self._bucket_of:
                continue
            key = (p.device, p.dtype)
            b = open_.get(key)
            limit = cap if key in started else first_cap
            if b is not None and b.params and b.nbytes() + p.numel() * p.element_size() > limit:
                started.add(key)
                b = None
            if b is None:
                b = open_[key] = _Bucket()
                self.buckets.append(b)
            b.params.append(p)
            self._bucket_of[id(p)] = b
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for b in self.buckets for p in b.params]
        self.active = False
        self._next = 0
        self._lock = threading.Lock()  # CUDA backward runs hooks on the device's autograd thread
        self.launches = {"launched_in_backward": 0, "flushed": 0}

    def matches(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Whether ``params`` are still the parameters (and ``requires_grad`` flags) it was
        built for."""
        sig = [(p, p.requires_grad) for p in params]
        return len(sig) == len(self.signature) and all(
            a is c and b == d for (a, b), (c, d) in zip(sig, self.signature))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def begin(self, roots: Sequence[torch.Tensor], inputs: Iterable[torch.Tensor] | None = None) -> None:
        reach = reachable_leaves(roots)
        if inputs is not None:
            if isinstance(inputs, torch.Tensor):
                inputs = [inputs]
            reach &= {id(t) for t in inputs}
        for b in self.buckets:
            b.members = [p for p in b.params if id(p) in reach or p.grad is not None]
            b.pending = {id(p) for p in b.members if id(p) in reach}
            b.flat, b.work, b.stale = None, None, False
        self._next = 0
        self.launches = {"launched_in_backward": 0, "flushed": 0}
        self.active = True
        self._launch_ready()

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.active:
            return
        with self._lock:
            b = self._bucket_of[id(p)]
            if b.work is not None:
                b.stale = True  # a second gradient after the launch: reduce this bucket in finish()
                return
            b.pending.discard(id(p))
            self._launch_ready()

    @torch.no_grad()
    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and not self.buckets[self._next].pending:
            b = self.buckets[self._next]
            self._next += 1
            if b.members:
                b.flat = torch.cat([p.grad.reshape(-1) for p in b.members])
                b.work = dist.all_reduce(b.flat, async_op=True)
                self.launches["launched_in_backward"] += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for the launched buckets, average them into ``.grad``, and reduce the gradients
        of the parameters no launched bucket covered (one flat all-reduce per dtype)."""
        self.active = False
        ws = world_size()
        done: set[int] = set()
        for b in self.buckets:
            if b.work is None:
                continue
            b.work.wait()
            if not b.stale:
                b.flat /= ws
                offset = 0
                for p in b.members:
                    n = p.numel()
                    p.grad.copy_(b.flat[offset:offset + n].view_as(p.grad))
                    offset += n
                    done.add(id(p))
            b.flat, b.work = None, None
        rest = [p for p in self.params if p.grad is not None and id(p) not in done]
        if rest:
            self.launches["flushed"] += len({(g.device, g.dtype) for g in (p.grad for p in rest)})
            average_gradients(rest)


@torch.no_grad()
def all_gather_shards(tensors: Sequence[torch.Tensor], n: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Reassemble a split from its shards: this rank holds rows ``rank::world`` of ``n`` (the
    positions :meth:`Trainer.shard` gives it) in each of ``tensors``; every rank gets the ``n``
    rows in the split's order, on the CPU. Shards differ in size by at most one row: each is
    padded to ``ceil(n / world)`` rows and gathered in one ``all_gather`` per dtype (through
    ``device``: the CUDA device with NCCL). Identity on one process."""
    ws = world_size()
    if ws == 1:
        return [t.cpu() for t in tensors]
    per = math.ceil(n / ws)
    groups: dict[torch.dtype, list[int]] = {}
    flat = []
    for i, t in enumerate(tensors):
        t2 = t.reshape(t.shape[0], math.prod(t.shape[1:]))
        if t2.dtype == torch.bool:
            t2 = t2.to(torch.uint8)
        flat.append(t2)
        groups.setdefault(t2.dtype, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype, idx in groups.items():
        local = torch.cat([flat[i] for i in idx], 1).to(device)
        pad = local.new_zeros(per, local.shape[1])
        pad[:local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(ws)]
        dist.all_gather(parts, pad)
        # row j of rank r is position j * world + r
        whole = torch.stack(parts, 1).reshape(per * ws, -1)[:n].cpu()
        at = 0
        for i in idx:
            k = flat[i].shape[1]
            col = whole[:, at:at + k]
            at += k
            src = tensors[i]
            out[i] = col.reshape(n, *src.shape[1:]).to(src.dtype)
    return out  # type: ignore[return-value]


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    if not is_distributed():
        return
    for b in module.buffers():
        dist.broadcast(b, src)


class ShardedSampler(Sampler[int]):
    """This rank's share of a seeded shuffle: ``perm[rank::world]`` of ``randperm(n, seed)``.

    The permutation is the one a single process's shuffling ``DataLoader`` draws with the same
    seed, and with a per-rank batch of ``B / world`` the ranks' step-t batches together are
    exactly positions ``[tB, (t+1)B)`` of it: the single-process global batch. When ``n`` is not
    a multiple of ``world``, the last ``n mod world`` positions of the shuffle are left out of
    that epoch (never duplicated: a duplicated sample would count twice in the gradient), so
    only the epoch's last step can differ from one process, by at most ``world - 1`` samples.
    """

    def __init__(self, n: int, seed: int, rank: int, world: int):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.per_rank = n // world

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed)
        # a shuffling DataLoader first draws its workers' base seed from the generator, then the
        # permutation: replay both (tests/test_distributed.py checks the two orders agree)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        perm = torch.randperm(self.n, generator=g).tolist()
        return iter(perm[self.rank:self.per_rank * self.world:self.world])

    def __len__(self) -> int:
        return self.per_rank
