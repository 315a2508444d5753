"""Per-sample modality contributions: exact Shapley values of a correctness game.

The value of a modality subset S for one sample (Wei et al., CVPR 2024, Sec. 3) is

    v(S) = |S| * 1[argmax of the fused logits given only the modalities in S == y],  v(empty) = 0,

and the contribution of modality m is its exact Shapley value over all 2^M subsets
(:func:`mmbalance.evaluation.shapley.shapley_values`), so ``phi.sum(-1) == v(all)`` per sample:
M for a correctly classified sample, 0 otherwise. For M = 2, phi is in {-0.5, 0, 0.5, 1, 1.5}.

Absent modalities follow the model's ``absent_policy`` (``input``: the encoder's output for a
zero input, the paper; ``feature``: a zero feature, the official code), or ``absent_policy``
given here (for this computation only). The pass runs in eval mode and encodes each sample
once: every subset is a *head* evaluation with the absent modalities' constant features
substituted (:meth:`MultimodalModel.fuse_subset`), i.e. 2^M - 1 head evaluations per batch.
A modality that is missing for a sample in the data (``present`` False) is absent in every
subset for that sample. The game is integer-valued, so phi is computed exactly
(:func:`~mmbalance.evaluation.shapley.shapley_numerators`): ``numerators=True`` returns the
int64 ``M! * phi``, which can be summed over processes without any rounding.

>>> import torch
>>> from mmbalance.models import MultimodalModel, create_encoder, create_fusion
>>> enc = {m: create_encoder("mlp", (4,), hidden=(8,)) for m in ("a", "b")}
>>> model = MultimodalModel(enc, create_fusion("concat", {"a": 8, "b": 8}, 3), {"a": (4,), "b": (4,)})
>>> batch = {"inputs": {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}, "label": torch.arange(5) % 3,
...          "present": {"a": torch.ones(5, dtype=torch.bool), "b": torch.ones(5, dtype=torch.bool)}}
>>> phi = modality_contributions(model, [batch])
>>> phi.shape
torch.Size([5, 2])
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

from ..utils import to_device
from ..models.model import ABSENT_POLICIES, MultimodalModel
from ..registry import ConfigError
from .shapley import shapley_numerators, subset_members

__all__ = ["use_absent_policy", "subset_values", "batch_contributions", "modality_contributions"]


@contextlib.contextmanager
def use_absent_policy(model: MultimodalModel, policy: str | None) -> Iterator[MultimodalModel]:
    """Temporarily use ``policy`` (``input``/``feature``; None = keep the model's) for absent
    modalities."""
    if policy is None:
        yield model
        return
    if policy not in ABSENT_POLICIES:
        raise ConfigError(f"unknown absent_policy '{policy}'; valid: {', '.join(ABSENT_POLICIES)}")
    old = model.absent_policy
    model.absent_policy = policy
    try:
        yield model
    finally:
        model.absent_policy = old


def subset_values(model: MultimodalModel, features: Mapping[str, Tensor], labels: Tensor,
                  absent: Mapping[str, Tensor], max_rows: int = 65536) -> Tensor:
    """v(S) for every subset mask S (bit i = ``model.modalities[i]`` present): shape (2^M, B).

    ``features`` are the encoder features (absent-for-the-sample modalities already replaced by
    their ``absent`` feature). The non-empty subsets are evaluated in as few fusion-head calls as
    ``max_rows`` allows: each subset's features (the absent ones substituted) are stacked along
    the batch axis, so the cost is the head's arithmetic, not 2^M Python-level calls (the head
    treats samples independently in eval mode, so this equals one call per subset).
    """
    mods = model.modalities
    M = len(mods)
    B = labels.shape[0]
    values = torch.zeros(2**M, B, dtype=torch.float64, device=labels.device)
    masks = torch.tensor([[bool(S >> i & 1) for i in range(M)] for S in range(2**M)], device=labels.device)
    per_call = max(1, max_rows // max(B, 1))
    for start in range(1, 2**M, per_call):
        subsets = range(start, min(2**M, start + per_call))
        k = len(subsets)
        stacked = {}
        for i, m in enumerate(mods):
            f = features[m]
            keep = masks[start:start + k, i].view(k, 1, 1)
            stacked[m] = torch.where(keep, f.unsqueeze(0), absent[m].to(f.dtype).view(1, 1, -1)).reshape(k * B, -1)
        logits, _ = model.fusion(stacked)
        correct = (logits.argmax(-1).view(k, B) == labels.view(1, B)).to(torch.float64)
        sizes = masks[start:start + k].sum(1).to(torch.float64).view(k, 1)
        values[start:start + k] = sizes * correct
    return values


@torch.no_grad()
def batch_contributions(model: MultimodalModel, inputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None,
                        labels: Tensor, absent: Mapping[str, Tensor] | None = None,
                        numerators: bool = False) -> Tensor:
    """Shapley contributions (B, M) for one batch, at the model's current mode and policy:
    float64 phi, or the exact int64 ``M! * phi`` with ``numerators=True``.

    Callers put the model in eval mode (see :func:`modality_contributions`); ``absent`` may hold
    precomputed :meth:`MultimodalModel.absent_features` to reuse across batches.
    """
    present = present or {}
    feats = {m: model.encoders[m](inputs[m]) for m in model.modalities}  # one encoder pass each
    if absent is None:
        absent = model.absent_features(feats)
    for m, f in feats.items():
        p = present.get(m)
        if p is not None and not bool(p.all()):  # missing in the data: absent in every subset
            feats[m] = torch.where(p.view(-1, 1), f, absent[m].to(f.dtype).expand_as(f))
    num = shapley_numerators(subset_values(model, feats, labels, absent)).T.contiguous()
    if numerators:
        return num
    return num.to(torch.float64) / math.factorial(len(model.modalities))


@torch.no_grad()
def modality_contributions(model: MultimodalModel, loader: Iterable[Mapping[str, Any]], *,
                           absent_policy: str | None = None, device: torch.device | str | None = None,
                           autocast: Callable[[], Any] | None = None,
                           progress: Callable[..., Iterable] | None = None,
                           return_index: bool = False, numerators: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per-sample Shapley contributions ``phi`` (N, M) over ``loader`` (columns in
    ``model.modalities`` order, rows in the loader's order): float32 phi, or the exact int64
    ``M! * phi`` with ``numerators=True``.

    Args:
        model: the :class:`MultimodalModel` (put in eval mode for the pass, mode restored after).
        loader: batches of the batch contract (use an unshuffled loader over deterministic
            transforms, e.g. ``trainer.loader(trainer.data.train_eval)``).
        absent_policy: ``input`` / ``feature`` for this computation only (None = the model's).
        device: where to move batches (None = the model's device).
        autocast: a context-manager factory for mixed precision (e.g. ``trainer.autocast``).
        progress: wraps the loader (e.g. ``trainer.progress``).
        return_index: also return the batches' ``index`` entries (N,), i.e. the dataset positions.
        numerators: return ``M! * phi`` as int64 (exact; sum it over processes, divide by M!).
    """
    if device is None:
        device = next(model.parameters()).device
    ctx = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    phis, index = [], []
    absent = None
    try:
        with use_absent_policy(model, absent_policy):
            it = progress(loader, desc="valuation") if progress is not None else loader
            for batch in it:
                batch = to_device(batch, device)
                with ctx():
                    if absent is None:  # one constant vector per modality for the whole pass
                        absent = model.absent_features(
                            {m: torch.zeros(1, model.feature_dim(m), device=device) for m in model.modalities})
                    phis.append(batch_contributions(model, batch["inputs"], batch.get("present"),
                                                    batch["label"], absent, numerators=True).cpu())
                if return_index:
                    index.append(torch.as_tensor(batch["index"]).cpu())
    finally:
        model.train(was_training)
    M = len(model.modalities)
    num = torch.cat(phis) if phis else torch.zeros(0, M, dtype=torch.int64)
    phi = num if numerators else (num.to(torch.float64) / math.factorial(M)).float()
    if return_index:
        return phi, (torch.cat(index) if index else torch.zeros(0, dtype=torch.long))
    return phi
