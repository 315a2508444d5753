"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023).

Pure math: :func:`class_sums`, :func:`update_prototypes`, :func:`prototype_logits`,
:func:`prototype_scores`, :func:`pmr_weak_modalities`, :func:`prototype_positions`; the method
class wires them in.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from ..utils import epoch_seed, to_device
from ..options import Annotated, Interval
from ..registry import ConfigError
from . import register_method
from .base import Method


def class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class feature sums (C, d) and counts (C,) — all-reducible, unlike means."""
    f = features.detach().float()
    sums = torch.zeros(num_classes, f.shape[1], device=f.device).index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).to(f)
    return sums, counts


def update_prototypes(sums: Tensor, counts: Tensor, old: Tensor | None, mu: float) -> Tensor:
    """New prototypes P = (1 - mu) * mean + mu * P_old for classes seen in the pass.

    A class with no sample in the pass keeps its old prototype; with no old prototype either
    (the first pass) it gets the mean of all features of the pass (a neutral point), never a
    division by zero.
    """
    seen = counts > 0
    mean = sums / counts.clamp_min(1).unsqueeze(1)
    if old is None:
        fallback = sums.sum(0) / counts.sum().clamp_min(1)
        return torch.where(seen.unsqueeze(1), mean, fallback.expand_as(mean))
    new = (1.0 - mu) * mean + mu * old
    return torch.where(seen.unsqueeze(1), new, old)


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """d[i, k] = -||h_i - c_k||_2 (B, C), vectorised with ``torch.cdist``."""
    return -torch.cdist(features.float(), prototypes.float().to(features.device))


def prototype_scores(features: Tensor, prototypes: Tensor, labels: Tensor) -> Tensor:
    """s^p = sum_i softmax(d)_{i, y_i} (a detached scalar)."""
    with torch.no_grad():
        return prototype_logits(features, prototypes).softmax(1).gather(1, labels.view(-1, 1)).sum()


def pmr_weak_modalities(scores: Sequence[float] | Tensor) -> Tensor:
    """Which modalities get the prototypical CE: those whose score ratio to the best is < 1
    (none when the best score is not positive). A bool tensor (M,) on the scores' device,
    computed there (no host synchronisation); ``s_m / best < 1`` is evaluated as the
    equivalent ``s_m < best``.

    For M = 2 this is the official rule: rho = s_a / s_v > 1 -> v, < 1 -> a, = 1 -> none.

    >>> [pmr_weak_modalities(s).tolist() for s in ([3.0, 2.0], [1.0, 1.0], [1, 3, 2])]
    [[False, True], [False, False], [True, False, True]]
    """
    s = scores.detach() if isinstance(scores, Tensor) else torch.as_tensor(scores, dtype=torch.float64)
    best = s.max()
    return (s < best) & (best > 0)


def prototype_positions(n: int, batch_size: int, fraction: float, seed: int) -> list[int]:
    """Training positions the prototype pass reads: the first ``floor(fraction * N_batches)``
    (at least 1) batches of a seeded shuffle of the ``n`` positions, ``N_batches = ceil(n /
    batch_size)`` (the official pass breaks after that many batches of the shuffled training
    loader). Seeded, so every process and a resumed run pick the same samples.

    >>> len(prototype_positions(100, 16, 0.1, 0)), len(prototype_positions(100, 16, 0.5, 0))
    (16, 48)
    >>> sorted(prototype_positions(10, 4, 1.0, 3)) == list(range(10))
    True
    """
    n_batches = max(1, int(math.floor(fraction * -(-n // batch_size))))
    g = torch.Generator()
    g.manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: min(n, n_batches * batch_size)].tolist()


@register_method("pmr", summary="PMR: prototypical CE on the weaker modality (Fan et al. 2023)",
                 paper='Fan et al., "PMR: Prototypical Modal Rebalance for Multimodal Learning"',
                 venue='CVPR', year=2023, category='objective')
class PMR(Method):
    """Prototypical Modal Rebalance (Fan et al. 2023; official ``main_Prototype_grad.py``).

    Prototypes: at the start of every epoch (= before epoch 0 and after every epoch, as the
    official code), class means ``c_m,k`` of the encoder features over the samples of the first
    ``floor(proto_fraction * N_batches)`` (at least 1) batches of a shuffled pass over the
    training split (:func:`prototype_positions`, seeded by the epoch), in eval mode (BatchNorm
    running statistics used, not updated; no dropout), without gradients; the model's mode is
    restored afterwards. ``P <- (1 - mu) P_new + mu P_old``. Several processes share the pass
    (``trainer.shard``) and sum their class sums and counts, so each sample is read once and
    the prototypes are those of one process. A class absent from the pass keeps its old
    prototype. (The official code applies the EMA from the third pass on — its pass after the
    first epoch is called with epoch 0 — and this one from the second; with the CREMA-D
    ``mu = 0`` the two agree.)

    Rule, per step (as in the public script, fanyunfeng-bit/Modal-Imbalance-PMR
    ``main_Prototype_grad.py``):

    1. ``d_m[i, k] = -||h_m,i - c_m,k||`` (``torch.cdist``);
       ``s^p_m = sum_i softmax(d_m)_{i, y_i}`` (all-reduced sum).
    2. For epochs in ``[modulation_start, modulation_end]``: ``L = CE(z, y) + alpha * sum over the
       weaker modalities of CE(d_m, y)``; otherwise ``L = CE(z, y)``. CE(d_m, y) is the mean over
       the samples of the (global) batch where m is present; with several processes, whose
       shares of those samples differ, it is computed from summed losses and the all-reduced
       count, so the averaged gradient is one process's. For M = 2 the weaker modality is the
       one with the lower score (ratio rho = s_a / s_v, none on a tie); for M > 2 every
       modality whose score ratio to the best modality is below 1 gets the prototypical CE
       (the direct extension of the two-modality rule; BalanceBenchmark's OGM-style switch for
       M > 2 is not used). No gradient scaling.

    Inference: the fused logits z.

    Options:
        alpha: weight of the prototypical CE (2.0, CREMA-D ``bash.sh``; 1.0 for film/gated on AVE).
        mu: prototype EMA momentum (0.0 = recompute each epoch, the CREMA-D ``bash.sh`` value;
            the argparse default is 0.2).
        proto_fraction: fraction of training batches for the prototype pass (0.1).
        modulation_start: first epoch of the PCE window (0-based, inclusive; default 0, ``bash.sh``).
        modulation_end: last epoch of the window (inclusive; default 70, ``bash.sh``).

    Not included: the paper's prototype-entropy regulariser and imbalance-scaled PCE weight
    (absent from the public script and BalanceBenchmark). Decision: classes missing from the
    first prototype pass get the mean feature of that pass.

    Diagnostics: ``rho`` (s_first / s_second, M = 2), ``ratio_<m>`` (s_m / best),
    ``weak_<m>`` (fraction of steps in which m got the PCE), ``proto_acc_<m>`` (nearest-prototype
    accuracy on the training batches), ``pce_<m>``. Cost: ~1.1x joint (the prototype pass).
    """

    def __init__(self, alpha: Annotated[float, Interval(0, None)] = 2.0, mu: Annotated[float, Interval(0, 1)] = 0.0,
                 proto_fraction: Annotated[float, Interval(0, 1, closed="right")] = 0.1,
                 modulation_start: Annotated[int, Interval(0, None)] = 0,
                 modulation_end: Annotated[int, Interval(0, None)] = 70):
        super().__init__()
        self.alpha = float(alpha)
        self.mu = float(mu)
        self.proto_fraction = float(proto_fraction)
        self.modulation_start = int(modulation_start)
        self.modulation_end = int(modulation_end)
        self.prototypes: dict[str, Tensor] = {}

    def setup(self, trainer):
        super().setup(trainer)
        if len(self.model.modalities) < 2:
            raise ConfigError("pmr needs at least two modalities")

    # -- prototypes --------------------------------------------------------------------------
    @torch.no_grad()
    def compute_prototypes(self, epoch: int) -> None:
        tr = self.trainer
        C = tr.data.num_classes
        mods = self.model.modalities
        positions = prototype_positions(len(tr.data.train), tr.cfg.train.batch_size, self.proto_fraction,
                                        epoch_seed(tr.cfg.train.seed, epoch) + 1)
        dims = {m: self.model.feature_dim(m) for m in mods}
        sums = {m: torch.zeros(C, dims[m], device=tr.device) for m in mods}
        counts = {m: torch.zeros(C, device=tr.device) for m in mods}
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in tr.loader(tr.shard(Subset(tr.data.train, positions))):
                batch = to_device(batch, tr.device)
                with tr.autocast():
                    feats = self.model.encode_all(batch["inputs"], batch["present"])
                y = batch["label"]
                for m in mods:
                    keep = batch["present"][m]  # missing modalities do not shape the prototypes
                    s, c = class_sums(feats[m][keep], y[keep], C)
                    sums[m] += s
                    counts[m] += c
        finally:
            self.model.train(was_training)
        for m in mods:
            s, c = tr.all_reduce_sum(sums[m]), tr.all_reduce_sum(counts[m])
            self.prototypes[m] = update_prototypes(s, c, self.prototypes.get(m), self.mu)

    def on_epoch_start(self, epoch):
        self.compute_prototypes(epoch)

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch):
        tr = self.trainer
        mods = self.model.modalities
        out, loss = self.fused_forward(batch)
        y = batch["label"]
        # samples missing a modality take no part in that modality's prototype terms (masked on
        # the device: every row is scored, absent rows weigh 0; no data-dependent shapes)
        keep = {m: batch["present"][m].to(torch.bool) for m in mods}
        d = {m: prototype_logits(out.features[m], self.prototypes[m]) for m in mods}
        pce_sum = {m: (F.cross_entropy(d[m], y, reduction="none") * keep[m]).sum() for m in mods}
        # per modality: score sum, PCE sum, nearest-prototype hits, present samples (one all-reduce)
        stats = tr.all_reduce_sum(torch.stack([torch.stack([
            (d[m].detach().softmax(1).gather(1, y.view(-1, 1)).squeeze(1) * keep[m]).sum(), pce_sum[m].detach(),
            ((d[m].detach().argmax(1) == y) & keep[m]).sum().float(), keep[m].sum().float()]) for m in mods]))
        scores, counts = stats[:, 0], stats[:, 3]
        weak = pmr_weak_modalities(scores)
        active = self.in_window(tr.epoch)
        if active:
            for i, m in enumerate(mods):
                # CE(d_m, y) = the mean over the global batch's present samples; the engine
                # averages the processes' gradients, hence world_size * local sum / global count.
                # Only the weaker modalities with a present sample: a 0/1 selection on the device
                n = counts[i].double()
                factor = (n.new_full((), float(tr.world_size)) / n.clamp(min=1.0)).float()
                term = self.alpha * pce_sum[m] * factor
                loss = loss + torch.where(weak[i] & (counts[i] > 0), term, torch.zeros_like(term))
        best = scores.max().double()
        s64, n64 = scores.double(), counts.double()
        for i, m in enumerate(mods):
            self.log(f"weak_{m}", weak[i] & (counts[i] > 0) if active else 0.0)  # m got the PCE
            self.log(f"ratio_{m}", torch.where(best > 0, s64[i] / best, 1.0))
            self.log(f"pce_{m}", stats[i, 1].double() / n64[i], weight=n64[i] > 0)
            self.log(f"proto_acc_{m}", stats[i, 2].double() / n64[i], weight=n64[i] > 0)
        if len(mods) == 2:
            self.log("rho", scores[0] / scores[1], weight=scores[1] > 0)
        tr.step(loss)
        return {"loss": loss.detach()}

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self):
        return {"prototypes": {m: p.cpu().clone() for m, p in self.prototypes.items()}}

    def load_state_dict(self, state):
        dev = self.trainer.device if self.trainer is not None else "cpu"
        self.prototypes = {m: p.to(dev) for m, p in state.get("prototypes", {}).items()}
