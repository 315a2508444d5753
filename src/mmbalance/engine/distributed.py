"""Multi-process training with ``torchrun`` (CPU: gloo, GPU: NCCL).

How it works, in a few lines, without wrapping the model in DDP (methods call encoders and
fusions directly, not one ``forward``):

* the training split is sharded so that, at every step, the ranks together see exactly the
  batch one process would see (:class:`ShardedSampler`; ``train.batch_size`` stays the
  *global* batch size; an epoch whose size is not a multiple of the number of processes
  leaves its last ``size mod world`` shuffled samples out);
* after every ``trainer.backward`` the gradients are averaged over ranks
  (:func:`average_gradients`), so clipping, gradient modulation, projections and SAM all see
  the global-batch gradient, and every rank applies the same update;
* after every optimizer step the buffers (BatchNorm statistics) are broadcast from rank 0, as
  DDP does;
* methods all-reduce the batch statistics their rules use (``trainer.all_reduce_*``);
* evaluation runs on every rank over the whole split (identical), and only rank 0 writes.

Launch: ``torchrun --nproc-per-node 2 -m mmbalance train ...``.
"""
from __future__ import annotations

import datetime as _dt
import os
from typing import Any, Iterator

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
