"""Sample-level and modality-level valuation (Wei, Feng, Wang, Hu, "Enhancing Multimodal
Cooperation via Sample-level Modality Valuation", CVPR 2024).

Both methods value every modality's contribution to a sample's fused prediction with exact
Shapley values (:func:`mmbalance.evaluation.contribution.modality_contributions`, v(S) =
|S| * correct) and then enhance the low-contributing modality by adding training items that
carry only that modality. Training itself is joint training on the enlarged set (as the
official code does; the paper's separate encoder-only stage does not exist there either), in
which a unimodal item trains only its kept modality's encoder and the head.

The pure rules live here as small functions: :func:`resample_counts` (supplement Eq. 7),
:func:`contribution_gap` / :func:`normalize_gap` / :func:`modality_resample_rate`
(supplement Eq. 8); :class:`ResampledDataset` turns a plan into the epoch's training set.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence, get_args

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..utils import epoch_seed
from ..evaluation.contribution import modality_contributions
from ..models.model import AbsentPolicy, Output
from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from . import register_method
from .joint import Joint

# ---------------------------------------------------------------------------------------------
# Sample level (supplement Eq. 7): copies s = f_s(1 - phi) for phi < 1, else 0
# ---------------------------------------------------------------------------------------------


def _round_half_up(x: Tensor) -> Tensor:
    return torch.floor(x + 0.5)


def _official_steps(x: Tensor) -> Tensor:
    # the public code's thresholds on phi: 1 copy for 0.4 < phi < 1, 2 for -0.1 < phi <= 0.4,
    # 3 for phi <= -0.1 (x = 1 - phi); equals ``double`` on the two-modality values
    return torch.where(x < 0.6, 1.0, torch.where(x < 1.1, 2.0, 3.0)).to(x.dtype)


#: named resample-frequency functions f_s(x), x = 1 - phi > 0 (rounded to whole copies)
RESAMPLE_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "double": lambda x: _round_half_up(2 * x),
    "identity": lambda x: _round_half_up(x),
    "square": lambda x: _round_half_up(x * x),
    "official": _official_steps,
}
#: the names of :data:`RESAMPLE_FUNCTIONS` (the ``f_s`` option's choices)
ResampleFunction = Literal["double", "identity", "square", "official"]


def resample_counts(phi: Tensor, f_s: str = "double") -> Tensor:
    """Number of unimodal copies per sample and modality (supplement Eq. 7).

    ``s = f_s(1 - phi)`` where ``phi < 1``, else 0; ``phi`` of any shape, result int64 of the
    same shape. ``1 - phi`` is first snapped to a 1e-6 grid so float error in phi cannot move a
    value across a rounding boundary; ties round *up* (``double``: phi = 0.75 -> 1 copy).

    >>> resample_counts(torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5])).tolist()
    [3, 2, 1, 0, 0]
    """
    if f_s not in RESAMPLE_FUNCTIONS:  # a direct call (the method's option is validated by the config layer)
        raise ValueError(f"unknown f_s '{f_s}'; valid: {', '.join(RESAMPLE_FUNCTIONS)}")
    x = torch.round((1.0 - phi.double()) * 1e6) / 1e6
    s = RESAMPLE_FUNCTIONS[f_s](x.clamp(min=0.0)).clamp(min=0.0)
    return torch.where(x > 0, s, torch.zeros_like(s)).long()


# ---------------------------------------------------------------------------------------------
# Modality level (supplement Eq. 8): p = f_m(Norm(d)) for the lowest-contributing modality
# ---------------------------------------------------------------------------------------------

#: named rate functions f_m applied to the normalised gap
RATE_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "tanh": torch.tanh,
    "power": lambda x: x.clamp(min=0.0) ** 1.5,
}
#: the names of :data:`RATE_FUNCTIONS` (the ``f_m`` option's choices)
RateFunction = Literal["identity", "tanh", "power"]


def contribution_gap(phi_mean: Tensor) -> tuple[int, Tensor]:
    """Lowest-contributing modality i and its gap d_i = (1/(M-1)) sum_{j != i} (phi_j - phi_i)."""
    M = phi_mean.shape[0]
    if M < 2:  # the methods refuse fewer than two modalities in ``modalities``
        raise ValueError("modality-level valuation needs at least two modalities")
    i = int(torch.argmin(phi_mean))
    d = (phi_mean.sum() - M * phi_mean[i]) / (M - 1)
    return i, d


def normalize_gap(d: Tensor, M: int) -> Tensor:
    """Norm(d) = d / ((M + 1) / 2).

    (M + 1) / 2 is the largest Shapley value one modality can have on one sample under
    v(S) = |S| * correct (it is correct exactly when that modality is present), so the gap is
    measured in units of the largest possible contribution. For M = 2 this is the official
    (2/3) * |gap_a - gap_v| with gap_m = 1 - mean phi_m.
    """
    return d * (2.0 / (M + 1))


def modality_resample_rate(phi_mean: Tensor, f_m: str = "identity", fixed_rate: float | None = None
                           ) -> tuple[int, float]:
    """(i, p): the lowest-contributing modality and its resample probability
    p = clamp(f_m(Norm(d_i)), 0, 1), or ``fixed_rate`` when given (supplement Table 6 ablation).

    >>> modality_resample_rate(torch.tensor([1.0, 0.25]))  # (2/3) * 0.75
    (1, 0.5)
    """
    if f_m not in RATE_FUNCTIONS:  # a direct call (the method's option is validated by the config layer)
        raise ValueError(f"unknown f_m '{f_m}'; valid: {', '.join(RATE_FUNCTIONS)}")
    i, d = contribution_gap(phi_mean.double())
    if fixed_rate is not None:
        return i, float(fixed_rate)
    p = RATE_FUNCTIONS[f_m](normalize_gap(d, phi_mean.shape[0]))
    return i, float(p.clamp(0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# The epoch's training set
# ---------------------------------------------------------------------------------------------


class ResampledDataset(Dataset):
    """The base training split, optionally changed in place, followed by unimodal copies.

    * ``copy_index`` (K,) / ``copy_modality`` (K,): item ``N + k`` is base item
      ``copy_index[k]`` carrying only modality ``copy_modality[k]`` (the others' ``present`` is
      False and their inputs zero); it keeps the original ``index``.
    * ``keep`` (N, M) bool: originals with only the kept modalities present (``modality_drop``).
    * ``mask`` (N, M) bool: zero a random ``mask_ratio`` of the elements of these modalities'
      inputs (``data_mask``); the element mask is drawn from ``mask_seed`` and the item position,
      so it does not depend on loader order or workers.

    Every item carries an extra entry ``dropped: {modality: bool}``, True where *this dataset*
    removed the modality (copies, ``keep``), as opposed to a modality missing in the data. The
    valuation methods' training step reads it: a removed modality's encoder is not run on the
    item (see :meth:`_Valuation.forward_without_dropped`).
    """

    def __init__(self, base: Dataset, modalities: Sequence[str], copy_index: Tensor | None = None,
                 copy_modality: Tensor | None = None, keep: Tensor | None = None, mask: Tensor | None = None,
                 mask_ratio: float = 0.5, mask_seed: int = 0):
        self.base = base
        self.modalities = list(modalities)
        self.num_base = len(base)  # type: ignore[arg-type]
        self.copy_index = (copy_index if copy_index is not None else torch.zeros(0)).long().cpu()
        self.copy_modality = (copy_modality if copy_modality is not None else torch.zeros(0)).long().cpu()
        if self.copy_index.shape != self.copy_modality.shape:
            raise ValueError("copy_index and copy_modality must have the same length")
        self.keep = keep.bool().cpu() if keep is not None else None
        self.mask = mask.bool().cpu() if mask is not None else None
        self.mask_ratio = float(mask_ratio)
        self.mask_seed = int(mask_seed)

    def __len__(self) -> int:
        return self.num_base + len(self.copy_index)

    def copies_per_modality(self) -> dict[str, int]:
        counts = torch.bincount(self.copy_modality, minlength=len(self.modalities))
        return {m: int(counts[k]) for k, m in enumerate(self.modalities)}

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < self.num_base:
            item = self.base[i]
            keep = self.keep[i] if self.keep is not None else None
            mask = self.mask[i] if self.mask is not None else None
        else:
            k = i - self.num_base
            item = self.base[int(self.copy_index[k])]
            keep = torch.zeros(len(self.modalities), dtype=torch.bool)
            keep[self.copy_modality[k]] = True
            mask = None
        dropped = {m: torch.tensor(False) for m in self.modalities}
        if keep is None and (mask is None or not bool(mask.any())):
            return {**item, "dropped": dropped}
        inputs, present = dict(item["inputs"]), dict(item["present"])  # never modify the base's tensors
        for k, m in enumerate(self.modalities):
            if keep is not None and not bool(keep[k]):
                inputs[m] = torch.zeros_like(inputs[m])
                present[m] = torch.zeros_like(torch.as_tensor(present[m]), dtype=torch.bool)
                dropped[m] = torch.tensor(True)
            elif mask is not None and bool(mask[k]):
                g = torch.Generator().manual_seed((self.mask_seed + i * len(self.modalities) + k) % (2**63))
                drop = torch.rand(inputs[m].shape, generator=g) < self.mask_ratio
                inputs[m] = inputs[m].masked_fill(drop, 0.0)
        return {**item, "inputs": inputs, "present": present, "dropped": dropped}


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _batchnorm_eval(module: nn.Module):
    """BatchNorm layers of ``module`` in eval mode (running statistics, no update) for a while."""
    bns = [b for b in module.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.training]
    for b in bns:
        b.eval()
    try:
        yield
    finally:
        for b in bns:
            b.train()


class _Valuation(Joint):
    """Shared machinery: the training step on unimodal items, the valuation pass, warm-up,
    datasets."""

    def __init__(self, warmup_epochs: int, absent_policy: AbsentPolicy | None):
        super().__init__(unimodal_weight=0.0)
        self.warmup_epochs = int(warmup_epochs)
        self.absent_policy = absent_policy
        self._dataset_args: dict[str, Any] | None = None

    def modalities(self, available):
        if len(available) < 2:
            raise ConfigError(f"{self.name} needs at least two modalities, got {', '.join(available)}")
        return list(available)

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch):
        if batch.get("dropped") is None:  # warm-up: the plain training split
            return super().training_step(batch)
        with self.trainer.autocast():
            out = self.forward_without_dropped(batch)
        loss = self.ce(out.logits, batch["label"])
        self.trainer.step(loss)
        return {"loss": float(loss.detach())}

    def forward_without_dropped(self, batch) -> Output:
        """The model's output where every modality the method removed from an item (``dropped``)
        is the absent policy's *constant* feature: the encoder is not run on those rows, so they
        send it no gradient and do not move its BatchNorm statistics; a unimodal item trains only
        its kept modality's encoder and the head. Modalities missing in the data follow the
        model's absent policy as in any method.

        The constant is :meth:`MultimodalModel.absent_feature` (``input``: the eval-mode encoder
        output for a zero input, the same substitute the valuation uses; ``feature``: zeros),
        without gradient. An encoder that has no row left still gets a (zero) gradient, so every
        process makes the same gradient all-reduce; a single remaining row is normalised with the
        BatchNorm running statistics (batch statistics of one sample do not exist).
        """
        model = self.model
        inputs, present, dropped = batch["inputs"], batch.get("present") or {}, batch["dropped"]
        feats: dict[str, Tensor] = {}
        for m in model.modalities:
            x, p = inputs[m], present.get(m)
            d = torch.as_tensor(dropped[m], device=x.device).view(-1).bool()
            if not bool(d.any()):
                feats[m] = model.encode(m, x, p)
                continue
            B = x.shape[0]
            rows = torch.nonzero(~d).flatten()
            with torch.no_grad():
                ref = torch.zeros(1, model.feature_dim(m), device=x.device)
                const = model.absent_feature(m, ref).detach()
            if rows.numel() == 0:
                anchor = sum(q.sum() for q in model.encoders[m].parameters() if q.requires_grad)
                feats[m] = const.expand(B, -1) + 0.0 * anchor  # zero gradient, not None
                continue
            ctx = _batchnorm_eval(model.encoders[m]) if rows.numel() == 1 else contextlib.nullcontext()
            with ctx:
                h = model.encode(m, x[rows], p[rows] if p is not None else None)
            feats[m] = const.to(h.dtype).expand(B, h.shape[1]).clone().index_copy(0, rows, h)
        return model.fuse(feats, present)

    # -- valuation --------------------------------------------------------------------------
    def _contributions(self, positions: Tensor | None = None) -> Tensor:
        """phi (n, M), float64, of the ``train_eval`` items at ``positions`` (None = all), the same
        on every process and for any number of processes.

        The positions are cut into the evaluation batches one process would use, and whole
        batches are dealt to the processes (batch j to process j mod world): every sample is
        evaluated in exactly the batch it would be in on one process, so no floating-point
        difference from batch composition can flip a near-tie. Each process returns the exact
        integer ``M! * phi`` of its samples; the (N, M) int64 table is summed over processes
        (exact) and divided by M! once.
        """
        tr = self.trainer
        ds = tr.data.train_eval
        N, M = len(ds), len(self.model.modalities)
        positions = torch.arange(N) if positions is None else positions.long().cpu()
        rank, world = tr.rank, tr.world_size
        bs = int(tr.cfg.train.eval_batch_size)
        chunks = list(torch.split(positions, bs))
        mine_chunks = chunks[rank::world]
        mine = torch.cat(mine_chunks) if mine_chunks else positions[:0]
        whole = world == 1 and len(positions) == N and bool((positions == torch.arange(N)).all())
        sub = ds if whole else Subset(ds, mine.tolist())
        num_mine = modality_contributions(self.model, tr.loader(sub, batch_size=bs), absent_policy=self.absent_policy,
                                          device=tr.device, autocast=tr.autocast, progress=tr.progress,
                                          numerators=True)
        table = torch.zeros(N, M, dtype=torch.int64, device=tr.device)
        table[mine.to(tr.device)] = num_mine.to(tr.device)
        table = tr.all_reduce_sum(table).cpu()  # one collective on every process, whatever its share
        return table[positions].to(torch.float64) / math.factorial(M)

    def _present_table(self) -> Tensor | None:
        """(N, M) presence of each modality in the training data, if the dataset exposes it."""
        pres = getattr(self.trainer.data.train_eval, "present", None)
        if not isinstance(pres, Mapping):
            return None
        try:
            return torch.stack([torch.as_tensor(pres[m]).bool() for m in self.model.modalities], 1)
        except KeyError:
            return None

    def _log_phi(self, phi: Tensor) -> None:
        mean = phi.mean(0)  # phi comes from the all-reduced table: already global
        for k, m in enumerate(self.model.modalities):
            self.log(f"phi_mean/{m}", mean[k])
        self.log("fused_correct", (phi.sum(1) > 0.5).float().mean())

    def _epoch_generator(self, epoch: int, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(epoch_seed(self.trainer.cfg.train.seed, epoch) * 31 + salt)

    def train_dataset(self, epoch, dataset):
        if self._dataset_args is None:
            return dataset
        return ResampledDataset(dataset, self.model.modalities, **self._dataset_args)


@register_method("sample_valuation",
                 summary="per-sample Shapley valuation; unimodal copies of low-contributing modalities",
                 paper='Wei et al., "Enhancing Multimodal Cooperation via Sample-level Modality Valuation"', venue="CVPR", year=2024, category="data")
class SampleValuation(_Valuation):
    """Sample-level valuation (Wei et al., CVPR 2024, Sec. 3 and supplement Eq. 7).

    Every epoch from ``warmup_epochs`` on (0-based epoch index >= ``warmup_epochs``), before
    training the epoch (the official ``code/sample_level.py`` values at the end of epoch
    ``warmup - 1`` and trains on the result from epoch ``warmup``: the same timing):

    1. Value each training sample (``train_eval``: deterministic transforms, unshuffled, eval
       mode): v(S) = |S| * 1[argmax z(S) = y] for every subset S of the M modalities, v(empty)
       = 0, with absent modalities substituted at head-only cost; phi_m = exact Shapley value
       (paper Eq. 3-4, for any M). sum_m phi_m = v(all).
    2. Resample frequency (supplement Eq. 7): s_m = f_s(1 - phi_m) if phi_m < 1 else 0.
    3. The epoch's training set is the N originals (always kept) followed by s_m copies of each
       sample for each modality m, each carrying only modality m (the others absent: their
       ``present`` is False and inputs zero, so the model applies its absent policy) and the
       original ``index``. Copies of a modality the sample lacks in the data are not made.
    4. Training is a joint CE step on the fused logits over that set (as the official code). A
       copy trains only its kept modality's encoder and the head: the removed modalities'
       features are the absent policy's constant feature, computed without gradient and without
       running their encoders on the copy, so their BatchNorm statistics see only real inputs
       (:meth:`forward_without_dropped`). The official code zeroes the dropped feature after the
       encoder ran on the real input in train mode (no gradient either, but its BatchNorm
       statistics absorb the copies).

    Options:
        warmup_epochs: plain joint epochs before the first valuation (default 5).
        f_s: the frequency function, one of ``double`` (default, round(2x): 1, 2, 3 copies at
            phi = 0.5, 0, -0.5, as the public code), ``identity`` (round(x)), ``square``
            (round(x^2)), ``official`` (the public code's thresholds 0.4 / -0.1 on phi, which
            differ from ``double`` only for M >= 3). Rounding is half-up (phi = 0.75 -> x = 0.25
            -> round(0.5) = 1 copy with ``double``), after snapping x to a 1e-6 grid.
        absent_policy: ``input`` (paper: zero input, encoder runs) or ``feature`` (official:
            zero feature) for the *valuation only*; None (default) = the model's
            ``--model.absent_policy``, which also gives the constant feature that stands for a
            copy's removed modalities in training.

    Determinism: phi is exact (integer ``M! * phi``, summed over processes without rounding) and
    every sample is valued in the same evaluation batch whatever the number of processes, so the
    copies are the same on 1 or N processes for the same weights.

    Diagnostics: ``phi_mean/<m>`` (mean contribution), ``copies/<m>`` (copies added),
    ``copies_total``, ``fused_correct`` (train accuracy seen by the valuation).
    Cost: one eval pass over the training set per epoch (one encoder pass, 2^M - 1 head
    evaluations per batch), plus the copies (up to ~3 per sample and modality).
    """

    def __init__(self, warmup_epochs: Annotated[int, Interval(0, None)] = 5, f_s: ResampleFunction = "double",
                 absent_policy: AbsentPolicy | None = None):
        super().__init__(warmup_epochs, absent_policy)
        self.f_s = f_s

    def on_epoch_start(self, epoch):
        self._dataset_args = None
        if epoch < self.warmup_epochs:
            return
        phi = self._contributions()
        counts = resample_counts(phi, self.f_s)  # (N, M)
        present = self._present_table()
        if present is not None:
            counts = counts * present.long()
        M = counts.shape[1]
        flat = counts.reshape(-1)
        order = torch.repeat_interleave(torch.arange(flat.numel()), flat)  # sample-major, then modality
        copy_index, copy_modality = order // M, order % M
        self._dataset_args = {"copy_index": copy_index, "copy_modality": copy_modality}
        self._log_phi(phi)
        for k, m in enumerate(self.model.modalities):
            self.log(f"copies/{m}", counts[:, k].sum())
        self.log("copies_total", counts.sum())


Strategy = Literal["resample", "modality_drop", "data_mask"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


@register_method("modality_valuation",
                 summary="Shapley valuation on a subset; enhance the weakest modality with probability p",
                 paper='Wei et al., "Enhancing Multimodal Cooperation via Sample-level Modality Valuation"', venue="CVPR", year=2024, category="data")
class ModalityValuation(_Valuation):
    """Modality-level valuation (Wei et al., CVPR 2024, Sec. 3 and supplement Eq. 8).

    Every epoch from ``warmup_epochs`` on (same timing as the official ``code/modality_level.py``):

    1. Value only a random ``subset_ratio`` of the training set (drawn without replacement,
       seeded by the epoch; the official code values everything and draws the 20% with
       replacement): per-sample exact Shapley phi as in ``sample_valuation``, then the mean
       phi_m per modality.
    2. The lowest-contributing modality i and its gap (Eq. 8)
       d_i = (1/(M-1)) sum_{j != i} (mean phi_j - mean phi_i) >= 0.
    3. p = clamp(f_m(Norm(d_i)), 0, 1) with Norm(d) = d / ((M+1)/2): (M+1)/2 is the largest
       contribution a single modality can make to one sample, and for M = 2 Norm(d) is exactly
       the official (2/3) * |gap_a - gap_v| (gap_m = 1 - mean phi_m).
    4. Enhance modality i, each training sample independently with probability p (the official
       code appends int(p * N) draws with replacement; same expectation):

       * ``resample`` (default): add a unimodal copy of the sample carrying only modality i
         (originals kept), like ``sample_valuation``'s copies;
       * ``modality_drop``: in place, mark every *other* modality of the sample absent (like a
         copy, the item then trains only modality i's encoder and the head);
       * ``data_mask``: in place, zero a random ``mask_ratio`` fraction of the input elements of
         every other (dominant) modality, drawn independently per sample, modality and epoch.

    Options:
        warmup_epochs: plain joint epochs before the first valuation (default 5).
        subset_ratio: fraction of the training set valued per epoch, in (0, 1] (default 0.2).
        f_m: ``identity`` (default), ``tanh`` or ``power`` (x^1.5), applied to Norm(d).
        strategy: ``resample`` (default), ``modality_drop`` or ``data_mask`` (supplement Table 7).
        fixed_rate: use p = fixed_rate in [0, 1] instead of f_m(Norm(d)) (supplement Table 6
            ablation); the modality is still the lowest-contributing one. Default None.
        mask_ratio: fraction of input elements zeroed by ``data_mask`` (default 0.5).
        absent_policy: as in ``sample_valuation`` (valuation only; None = the model's).

    Diagnostics: ``phi_mean/<m>``, ``weakest/<m>`` (1 for the enhanced modality), ``gap`` (d_i),
    ``p``, ``copies/<m>`` (resample), ``dropped`` (modality_drop) or ``masked`` (data_mask),
    ``fused_correct``.
    Cost: an eval pass over ``subset_ratio`` of the training set per epoch, plus p * N copies.
    """

    def __init__(self, warmup_epochs: Annotated[int, Interval(0, None)] = 5,
                 subset_ratio: Annotated[float, Interval(0, 1, closed="right")] = 0.2,
                 f_m: RateFunction = "identity", strategy: Strategy = "resample",
                 fixed_rate: Annotated[float, Interval(0, 1)] | None = None,
                 mask_ratio: Annotated[float, Interval(0, 1)] = 0.5, absent_policy: AbsentPolicy | None = None):
        super().__init__(warmup_epochs, absent_policy)
        self.subset_ratio = float(subset_ratio)
        self.f_m = f_m
        self.strategy = strategy
        self.fixed_rate = None if fixed_rate is None else float(fixed_rate)
        self.mask_ratio = float(mask_ratio)

    def on_epoch_start(self, epoch):
        self._dataset_args = None
        if epoch < self.warmup_epochs:
            return
        N = len(self.trainer.data.train_eval)
        mods = self.model.modalities
        M = len(mods)
        g = self._epoch_generator(epoch, salt=1)
        n_sub = min(N, max(1, int(round(self.subset_ratio * N))))
        positions = torch.randperm(N, generator=g)[:n_sub]
        phi = self._contributions(positions)
        i, p = modality_resample_rate(phi.mean(0), self.f_m, self.fixed_rate)
        chosen = torch.rand(N, generator=g) < p
        present = self._present_table()
        others = torch.ones(M, dtype=torch.bool)
        others[i] = False
        if self.strategy == "resample":
            if present is not None:
                chosen &= present[:, i]
            idx = torch.nonzero(chosen).flatten()
            self._dataset_args = {"copy_index": idx, "copy_modality": torch.full_like(idx, i)}
            for k, m in enumerate(mods):
                self.log(f"copies/{m}", int(chosen.sum()) if k == i else 0)
        elif self.strategy == "modality_drop":
            keep = torch.ones(N, M, dtype=torch.bool)
            keep[chosen] = ~others
            self._dataset_args = {"keep": keep}
            self.log("dropped", chosen.sum())
        else:  # data_mask
            mask = torch.zeros(N, M, dtype=torch.bool)
            mask[chosen] = others
            seed = int(torch.randint(0, 2**62, (1,), generator=g))
            self._dataset_args = {"mask": mask, "mask_ratio": self.mask_ratio, "mask_seed": seed}
            self.log("masked", chosen.sum())
        self._log_phi(phi)
        _, d = contribution_gap(phi.mean(0).double())
        self.log("gap", d)
        self.log("p", p)
        for k, m in enumerate(mods):
            self.log(f"weakest/{m}", float(k == i))


__all__ = ["ModalityValuation", "RATE_FUNCTIONS", "RESAMPLE_FUNCTIONS", "ResampledDataset", "SampleValuation",
           "contribution_gap", "modality_resample_rate", "normalize_gap", "resample_counts"]
