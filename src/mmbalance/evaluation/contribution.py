"""Per-sample modality contributions: exact Shapley values of a correctness game.

The value of a modality subset S for one sample (Wei et al., CVPR 2024, Sec. 3) is

    v(S) = |S| * 1[argmax of the fused logits given only the modalities in S == y],  v(empty) = 0,

and the contribution of modality m is its exact Shapley value over all 2^M subsets
(:func:`mmbalance.evaluation.shapley.shapley_values`), so ``phi.sum(-1) == v(all)`` per sample:
M for a correctly classified sample, 0 otherwise. For M = 2, phi is in {-0.5, 0, 0.5, 1, 1.5}.

Absent modalities follow the model's ``absent_policy`` (``input``: the encoder's output for a
zero input, the paper; ``feature``: a zero feature, the official code), or ``absent_policy``
given here (for this computation only). The pass runs in eval mode and encodes each sample
once; every subset is a *head* evaluation with the absent modalities' constant features
substituted (:meth:`MultimodalModel.fuse_subset`). When the fused logits are a sum of
per-modality terms (concat, sum, late, shared_head: :func:`additive_head`) each modality's term
is computed once and every subset's logits are a 0/1 combination of the terms (one small
matmul for all 2^M subsets); other fusions (film, gated, methods' own heads) are called on the
2^M - 1 substituted feature sets, stacked into few calls (:func:`iter_subset_logits`).
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
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils import to_device
from ..models.fusions import ConcatFusion, LateFusion, SharedHeadFusion, SumFusion
from ..models.model import ABSENT_POLICIES, MultimodalModel
from ..registry import ConfigError
from .shapley import shapley_numerators

__all__ = ["use_absent_policy", "AdditiveHead", "additive_head", "register_additive_head", "subset_masks",
           "iter_subset_logits", "argmax_equals", "subset_values", "batch_contributions", "modality_contributions"]


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


# ---------------------------------------------------------------------------------------------
# Additive heads: the subset logits as sums of per-modality terms computed once
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdditiveHead:
    """A fusion whose fused logits are a sum of per-modality terms:
    ``z(h) = scale * (bias + sum_m term(m, h_m))``.

    ``term(m, h)`` maps the features (B, d_m) of modality m alone to its logit term (B, C);
    ``bias`` is (C,) or None; ``scale`` a positive constant (1/M for a mean). A fusion opts in
    by a method ``additive_head(self) -> AdditiveHead | None`` or through
    :func:`register_additive_head` for its exact class.
    """

    term: Callable[[str, Tensor], Tensor]
    bias: Tensor | None = None
    scale: float | None = None


#: exact fusion class -> its additive decomposition (a subclass may override ``forward``, so it
#: must register itself)
ADDITIVE_HEADS: dict[type, Callable[[Any], AdditiveHead | None]] = {}


def register_additive_head(cls: type) -> Callable[[Callable[[Any], AdditiveHead | None]], Callable]:
    def deco(fn):
        ADDITIVE_HEADS[cls] = fn
        return fn
    return deco


@register_additive_head(ConcatFusion)
def _concat_head(f: ConcatFusion) -> AdditiveHead:
    # W [h_1; ...; h_M] + b = b + sum_m W[:, block m] h_m
    return AdditiveHead(lambda m, h: F.linear(h, f.fc.weight[:, f.blocks[m][0]:f.blocks[m][1]]), f.fc.bias)


@register_additive_head(SumFusion)
def _sum_head(f: SumFusion) -> AdditiveHead:
    return AdditiveHead(lambda m, h: f.heads[m](h))


@register_additive_head(LateFusion)
def _late_head(f: LateFusion) -> AdditiveHead:
    return AdditiveHead(lambda m, h: f.heads[m](h), scale=1.0 / len(f.modalities))


@register_additive_head(SharedHeadFusion)
def _shared_head(f: SharedHeadFusion) -> AdditiveHead:
    # mean / sum over m of g(P_m h_m): each term sees one modality only
    return AdditiveHead(lambda m, h: f.head(f.head_input(m, h)),
                        scale=1.0 / len(f.modalities) if f.combine == "mean" else None)


def additive_head(fusion: nn.Module) -> AdditiveHead | None:
    """The fusion's :class:`AdditiveHead`, or None when its fused logits are not a sum of
    per-modality terms (film, gated, methods' own heads): those take the general path."""
    own = getattr(fusion, "additive_head", None)
    if callable(own):
        return own()
    fn = ADDITIVE_HEADS.get(type(fusion))
    return fn(fusion) if fn is not None else None


def subset_masks(M: int, device: torch.device | str | None = None) -> Tensor:
    """(2^M, M) bool: row S has column i set when bit i of S is set (modality i present)."""
    return _tables(M)[0].to(device, copy=True)


@lru_cache(maxsize=None)
def _tables(M: int) -> tuple[Tensor, Tensor, Tensor]:
    """(read-only, CPU) subset masks (2^M, M) bool, subset sizes (2^M,) int64, and the selector
    [S, 1 - S] (2^M, 2M) float64 of the additive path."""
    masks = (torch.arange(2**M).unsqueeze(1) >> torch.arange(M).unsqueeze(0) & 1).bool()
    keep = masks.to(torch.float64)
    return masks, masks.sum(1), torch.cat([keep, 1 - keep], 1)


SubsetPath = Literal["auto", "additive", "general"]


def iter_subset_logits(model: MultimodalModel, features: Mapping[str, Tensor], absent: Mapping[str, Tensor],
                       max_rows: int = 65536, path: SubsetPath = "auto") -> Iterator[tuple[int, Tensor]]:
    """The fused logits of every non-empty subset, in chunks: yields ``(start, logits)`` with
    logits (k, B, C) for the subset masks ``start .. start + k - 1`` (bit i = ``model.modalities[i]``
    present; the absent ones take their ``absent`` feature).

    ``path``:

    * ``additive`` — the fusion has an :class:`AdditiveHead` (concat, sum, late, shared_head):
      each modality's term is computed once for its features (M small matmuls) and once for its
      absent feature, and every subset's logits are ``scale * (bias + sum_{m in S} T_m(h_m) +
      sum_{m not in S} T_m(a_m))`` — one (k x 2M) 0/1 matrix times the (2M, B*C) stack of
      terms, summed in at least float32 (also under autocast). The fusion's forward is never
      called. Equal to the general path in exact arithmetic; in floating point the terms are
      added in another order, so a logit may differ in its last bits (and a near-tie between
      two classes may, rarely, resolve the other way).
    * ``general`` — one fusion call per chunk of subsets, the features stacked along the batch
      axis (``k * B <= max_rows``); the head treats samples independently in eval mode, so this
      equals one call per subset. Works for any fusion.
    * ``auto`` (default) — ``additive`` where the fusion allows it, else ``general``.
    """
    mods = model.modalities
    M = len(mods)
    B = next(iter(features.values())).shape[0]
    dev = next(iter(features.values())).device
    masks, _, selector = _tables(M)
    head = additive_head(model.fusion) if path != "general" else None
    if path == "additive" and head is None:
        raise ValueError(f"fusion {type(model.fusion).__name__} has no additive head")
    per_call = max(1, max_rows // max(B, 1))
    if head is not None:
        own = torch.stack([head.term(m, features[m]) for m in mods])  # (M, B, C)
        gone = torch.cat([head.term(m, absent[m].to(features[m].dtype)) for m in mods])  # (M, C)
        dt = torch.promote_types(own.dtype, torch.float32)  # sums in at least float32 (autocast)
        C = own.shape[-1]
        # z_S = [S, 1 - S] @ [T(h); T(a) for every sample] + bias: one matmul per chunk (a
        # broadcast add of a (k, C) table would cost more than the matmul itself). Laid out
        # (k, C, B) so that reductions over the classes run along contiguous samples.
        terms = torch.cat([own.to(dt).transpose(1, 2).reshape(M, C * B),
                           gone.to(dt).repeat_interleave(B, dim=1)])  # (2M, C*B)
        sel = selector.to(device=dev, dtype=dt)  # (2^M, 2M): [S, 1 - S]
        bias = (head.bias.to(dt).repeat_interleave(B) if head.bias is not None else terms.new_zeros(C * B))
        for start in range(1, 2**M, per_call):
            stop = min(2**M, start + per_call)
            with torch.autocast(dev.type, enabled=False):  # autocast would round the sums to 16 bits
                z = torch.addmm(bias, sel[start:stop], terms).view(stop - start, C, B)
            if head.scale is not None:
                z.mul_(head.scale)
            yield start, z.transpose(1, 2)
        return
    masks = masks.to(dev)
    for start in range(1, 2**M, per_call):
        k = min(2**M, start + per_call) - start
        stacked = {}
        for i, m in enumerate(mods):
            f = features[m]
            keep = masks[start:start + k, i].view(k, 1, 1)
            stacked[m] = torch.where(keep, f.unsqueeze(0), absent[m].to(f.dtype).view(1, 1, -1)).reshape(k * B, f.shape[-1])
        logits, _ = model.fusion(stacked)
        yield start, logits.view(k, B, logits.shape[-1])


def subset_values(model: MultimodalModel, features: Mapping[str, Tensor], labels: Tensor,
                  absent: Mapping[str, Tensor], max_rows: int = 65536, path: SubsetPath = "auto") -> Tensor:
    """v(S) = |S| * 1[argmax z_S == y] for every subset mask S (bit i = ``model.modalities[i]``
    present): shape (2^M, B), float64, v(empty) = 0.

    ``features`` are the encoder features (absent-for-the-sample modalities already replaced by
    their ``absent`` feature); the subset logits come from :func:`iter_subset_logits` (``path``:
    the additive shortcut where the fusion allows it, else stacked fusion-head calls).
    """
    return _subset_values(model, features, labels, absent, max_rows, path).to(torch.float64)


def _subset_values(model, features, labels, absent, max_rows=65536, path: SubsetPath = "auto") -> Tensor:
    M = len(model.modalities)
    values = torch.zeros(2**M, labels.shape[0], dtype=torch.int64, device=labels.device)
    sizes = _tables(M)[1].to(labels.device)
    for start, z in iter_subset_logits(model, features, absent, max_rows, path):
        k = z.shape[0]
        values[start:start + k] = sizes[start:start + k, None] * argmax_equals(z, labels)
    return values


def argmax_equals(logits: Tensor, labels: Tensor) -> Tensor:
    """``logits.argmax(-1) == labels`` (first maximum wins, as argmax) for logits (..., B, C)
    and labels (B,), as max/gather reductions, which run along whichever axis is contiguous
    (argmax over a short strided class axis is several times slower). NaN logits count as wrong."""
    C = logits.shape[-1]
    idx = labels.view(*([1] * (logits.dim() - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    zy = logits.gather(-1, idx).squeeze(-1)
    classes = torch.arange(C, device=labels.device)
    if logits.stride(-1) == 1:
        earlier = classes.view(1, C) < labels.view(-1, 1)  # (B, C), laid out like the logits
    else:
        earlier = (classes.view(C, 1) < labels.view(1, -1)).T
    first = torch.where(earlier, logits, logits.new_tensor(float("-inf"))).amax(-1)  # best earlier class
    return (zy == logits.amax(-1)) & (first < zy)


@torch.no_grad()
def batch_contributions(model: MultimodalModel, inputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None,
                        labels: Tensor, absent: Mapping[str, Tensor] | None = None,
                        numerators: bool = False, path: SubsetPath = "auto") -> Tensor:
    """Shapley contributions (B, M) for one batch, at the model's current mode and policy:
    float64 phi, or the exact int64 ``M! * phi`` with ``numerators=True``.

    Callers put the model in eval mode (see :func:`modality_contributions`); ``absent`` may hold
    precomputed :meth:`MultimodalModel.absent_features` to reuse across batches; ``path`` chooses
    how the subset logits are formed (:func:`iter_subset_logits`).
    """
    present = present or {}
    feats = {m: model.encoders[m](inputs[m]) for m in model.modalities}  # one encoder pass each
    if absent is None:
        absent = model.absent_features(feats)
    for m, f in feats.items():
        p = present.get(m)
        if p is not None and not bool(p.all()):  # missing in the data: absent in every subset
            feats[m] = torch.where(p.view(-1, 1), f, absent[m].to(f.dtype).expand_as(f))
    num = shapley_numerators(_subset_values(model, feats, labels, absent, path=path)).T.contiguous()
    if numerators:
        return num
    return num.to(torch.float64) / math.factorial(len(model.modalities))


@torch.no_grad()
def modality_contributions(model: MultimodalModel, loader: Iterable[Mapping[str, Any]], *,
                           absent_policy: str | None = None, device: torch.device | str | None = None,
                           autocast: Callable[[], Any] | None = None,
                           progress: Callable[..., Iterable] | None = None,
                           return_index: bool = False, numerators: bool = False,
                           path: SubsetPath = "auto") -> Tensor | tuple[Tensor, Tensor]:
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
        path: ``auto`` (the additive shortcut where the fusion allows it), ``additive`` or
            ``general`` (see :func:`iter_subset_logits`).
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
                                                    batch["label"], absent, numerators=True, path=path).cpu())
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
