"""QMF: quality-aware multimodal fusion with energy confidence (Zhang et al., ICML 2023).

Pure math: :func:`energy_confidence`, :func:`qmf_fuse`, :func:`qmf_rank_target_margin`,
:func:`qmf_rank_loss`, :func:`gather_global_batch`, :func:`qmf_global_rank_loss`;
:class:`LossHistory` keeps the per-sample loss history by dataset index.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import Output
from ..options import Annotated, Interval
from ..registry import ConfigError
from . import register_method
from .base import Method, build_standard_model

#: fusions whose unimodal logits are independent per-modality heads (QMF's classifiers)
HEAD_FUSIONS = ("late", "sum", "shared_head")


def energy_confidence(logits: Tensor, temperature: float = 10.0) -> Tensor:
    """w = -E / T with the energy E = -logsumexp(z): shape (B, 1).

    >>> energy_confidence(torch.tensor([[0.0, 0.0]]), 1.0).tolist()  # log 2
    [[0.6931471824645996]]
    """
    return (torch.logsumexp(logits.float(), dim=1) / temperature).unsqueeze(1)


def qmf_fuse(unimodal_logits: Mapping[str, Tensor], temperature: float = 10.0,
             detach_weights: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Fused logits z = sum_m w_m * z_m with per-sample confidences w_m; returns (z, {m: w_m})."""
    w = {m: energy_confidence(z, temperature) for m, z in unimodal_logits.items()}
    z = sum((w[m].detach() if detach_weights else w[m]) * unimodal_logits[m].float() for m in unimodal_logits)
    return z, w


def minmax_normalise(values: Tensor, history: Tensor) -> Tensor:
    """(values - min(history)) / (max(history) - min(history)); zeros when the history is flat."""
    lo, hi = history.min(), history.max()
    span = hi - lo
    return torch.where(span > 0, (values - lo) / span, torch.zeros_like(values))  # on the device


def qmf_rank_target_margin(hist_i: Tensor, hist_j: Tensor) -> tuple[Tensor, Tensor]:
    """Target t = sign(L_i - L_j) and margin |L_i - L_j| of normalised history losses."""
    return torch.sign(hist_i - hist_j), (hist_i - hist_j).abs()


def qmf_rank_loss(confidence: Tensor, hist: Tensor) -> Tensor:
    """The history ranking loss of QMF's ``rank_loss`` (from CRL), reproduced as released.

    ``confidence`` (B,) or (B, 1): w_i; ``hist`` (B,): the normalised history loss L_i of the
    same samples. Pairs i with j = roll(i, -1); t = sign(L_i - L_j), margin = |L_i - L_j|;
    ``MarginRankingLoss(margin=0)(w_i, w_j + margin / t', -t)`` with t' = t where t != 0 else 1.
    Per pair that is:

    * t = +1 (i has the larger history loss): max(0, w_i - w_j - margin)
    * t = -1 (j has the larger history loss): max(0, w_j - w_i - margin)
    * t =  0: 0

    i.e. it is zero exactly when, in every pair, the sample with the larger history loss has a
    confidence at most the other's plus the margin (the margin is slack, not an enforced gap).
    """
    w = confidence.reshape(-1).float()
    w2 = torch.roll(w, -1)
    t, margin = qmf_rank_target_margin(hist, torch.roll(hist, -1))
    t_nz = torch.where(t == 0, torch.ones_like(t), t)
    return F.margin_ranking_loss(w, w2 + margin / t_nz, -t, margin=0.0)


def gather_global_batch(values: Tensor, rank: int, world: int, all_reduce_sum) -> Tensor:
    """This process's ``values`` (..., B) and every other process's, in the single-process order
    of the global batch: (..., world * B).

    The engine deals a global batch to the processes as ``perm[rank::world]``
    (:class:`~mmbalance.engine.distributed.ShardedSampler`), so position k of rank r's batch is
    position ``k * world + r`` of the global one. The gather is one ``all_reduce_sum`` of a
    zero-padded (world, ..., B) tensor (exact: every entry adds zeros only); this process's own
    slot is ``values`` itself, so gradients flow to its own entries (the others are constants).
    Every process must pass the same shape. One process: ``values`` unchanged.

    >>> mine = torch.tensor([[1.0, 3.0]])
    >>> def reduce(t):  # rank 0 of 2; rank 1 holds [[2, 4]]
    ...     t = t.clone(); t[1] = torch.tensor([[2.0, 4.0]]); return t
    >>> gather_global_batch(mine, 0, 2, reduce).tolist()
    [[1.0, 2.0, 3.0, 4.0]]
    """
    if world == 1:
        return values
    slots = values.new_zeros(world, *values.shape)
    slots[rank] = values.detach()
    gathered = all_reduce_sum(slots)
    parts = [values if r == rank else gathered[r] for r in range(world)]
    return torch.stack(parts, dim=-1).reshape(*values.shape[:-1], -1)


def qmf_global_rank_loss(confidence: Tensor, hist: Tensor, rank: int = 0, world: int = 1,
                         all_reduce_sum=None) -> Tensor:
    """:func:`qmf_rank_loss` of the *global* batch, computed on each of ``world`` processes from
    its local ``confidence`` (B,) and normalised history ``hist`` (B,).

    The pairs (i, roll(i, -1)) are those of the single-process global batch, so the value is the
    same whatever the number of processes. Each process's loss carries gradient through its own
    confidences only, and the engine averages gradients over processes after backward; so the
    gradient (not the value) is multiplied by ``world``: the averaged gradient is then the
    single-process gradient.
    """
    if world == 1:
        return qmf_rank_loss(confidence, hist)
    both = torch.stack([confidence.reshape(-1).float(), hist.reshape(-1).float()])
    glob = gather_global_batch(both, rank, world, all_reduce_sum)
    loss = qmf_rank_loss(glob[0], glob[1])
    return loss + (world - 1) * (loss - loss.detach())


class LossHistory:
    """Cumulative per-sample loss per modality, indexed by dataset position (``batch["index"]``)."""

    def __init__(self, modalities: list[str], n: int, device: torch.device | str = "cpu"):
        self.modalities = list(modalities)
        self.values = {m: torch.zeros(n, dtype=torch.float64, device=device) for m in modalities}

    def normalised(self, m: str, index: Tensor) -> Tensor:
        h = self.values[m]
        return minmax_normalise(h[index], h).float()

    def update(self, m: str, index: Tensor, losses: Tensor, reduce_sum=None) -> None:
        delta = torch.zeros_like(self.values[m])
        delta.index_add_(0, index, losses.detach().to(delta.dtype))
        if reduce_sum is not None:  # distributed: every rank adds every rank's samples
            delta = reduce_sum(delta)
        self.values[m] += delta

    def state_dict(self) -> dict[str, Tensor]:
        return {m: v.cpu().clone() for m, v in self.values.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for m, v in state.items():
            if m in self.values:
                if v.numel() != self.values[m].numel():
                    raise ConfigError(f"qmf: saved loss history has {v.numel()} samples, the training split "
                                      f"has {self.values[m].numel()}")
                self.values[m] = v.to(self.values[m].device, self.values[m].dtype)


@register_method("qmf", summary="QMF: energy-confidence dynamic late fusion + history ranking loss (Zhang 2023)",
                 paper='Zhang et al., "Provable Dynamic Fusion for Low-Quality Multimodal Data"',
                 venue='ICML', year=2023, category='feed-forward')
class QMF(Method):
    """Quality-aware multimodal fusion (Zhang et al. 2023, official RGB-D code ``models/QMF.py``).

    Model: an encoder and a linear classifier per modality (z_m = W_m h_m + b_m). The config's
    fusion is replaced by ``late`` unless it already has independent per-modality heads
    (``late``, ``sum`` — same parameters — or ``shared_head``); ``film`` / ``gated`` are refused
    because their unimodal logits are not per-modality classifiers. The fusion's own fused
    output is not used: QMF fuses with its confidences.

    Rule, per step:

    1. Energy confidence ``w_m = -E(z_m) / T = logsumexp(z_m) / T`` (per sample).
    2. Fused logits ``z = sum_m w_m * z_m`` (``detach_weights`` detaches w_m inside the fusion,
       as the text-image code; default off, as the RGB-D code).
    3. ``L = sum_m CE(z_m) + CE(z) + lambda * sum_m L_rank(w_m)``, with the CRL-style ranking loss
       of :func:`qmf_rank_loss` against the min-max-normalised cumulative loss history of that
       modality (min and max over the whole history), computed **before** this step's history
       update (RGB-D code order). The pairs (i, roll(i, -1)) are formed over the *global* batch
       (:func:`qmf_global_rank_loss`: confidences and histories gathered from every process), so
       several processes pair exactly as one process does on the same global batch.
    4. History: per modality, a tensor over the training split (sized ``len(train)``) to which
       every step adds the detached per-sample CE(z_m), keyed by ``batch["index"]``
       (distributed: the dense increments are all-reduced so every rank holds the global history).

    Inference (``predict``): the confidence-weighted fusion ``sum_m w_m z_m``.

    Options:
        temperature: T of the energy confidence (10).
        lambda_rank: weight of the ranking loss (0.1, RGB-D; the text-image code uses 1).
        detach_weights: detach w_m in the fused logits (False).

    Decisions: the history normalisation is min-max over the stored history, as the official
    ``RGBD-scene-recognition/utils/crl_utils.py`` (its ``max_correctness`` counter is an unused
    leftover of CRL); a flat history (e.g. the first step) gives zeros where the official code
    divides by zero; the official history also stores the last confidence, which nothing reads,
    so it is not kept.

    Diagnostics: ``conf_<m>`` (mean confidence), ``rank_loss_<m>``, ``rank_loss`` (sum over
    modalities). Cost: ~1.0x joint training plus an O(N) history.
    """

    def __init__(self, temperature: Annotated[float, Interval(0, None, closed="neither")] = 10.0,
                 lambda_rank: Annotated[float, Interval(0, None)] = 0.1, detach_weights: bool = False):
        super().__init__()
        self.temperature = float(temperature)
        self.lambda_rank = float(lambda_rank)
        self.detach_weights = bool(detach_weights)
        self.history: LossHistory | None = None

    def build_model(self, spec):
        if spec.fusion in HEAD_FUSIONS:
            return build_standard_model(spec)
        if spec.fusion == "concat":
            return build_standard_model(spec, fusion="late")
        raise ConfigError(f"qmf needs per-modality classifiers: use --fusion late (default), sum or "
                          f"shared_head, not '{spec.fusion}'")

    def setup(self, trainer):
        super().setup(trainer)
        self.history = LossHistory(self.model.modalities, len(trainer.data.train), trainer.device)

    def fused(self, out: Output) -> tuple[Tensor, dict[str, Tensor]]:
        return qmf_fuse(out.unimodal_logits, self.temperature, self.detach_weights)

    def training_step(self, batch):
        tr = self.trainer
        with tr.autocast():
            out = self.model(batch["inputs"], batch["present"])
        y, idx = batch["label"], batch["index"]
        z, w = self.fused(out)
        loss = self.ce(z, y)
        rank_total = 0.0
        per_sample = {}
        for m in self.model.modalities:
            zm = out.unimodal_logits[m]
            per_sample[m] = F.cross_entropy(zm.float(), y, reduction="none")
            rank = qmf_global_rank_loss(w[m], self.history.normalised(m, idx), tr.rank, tr.world_size,
                                        tr.all_reduce_sum)
            loss = loss + per_sample[m].mean() + self.lambda_rank * rank
            rank_total = rank_total + rank.detach().double()  # device tensors: no host synchronisation
            self.log(f"conf_{m}", tr.all_reduce_mean(w[m].detach().float().mean()))
            self.log(f"rank_loss_{m}", rank.detach())
        self.log("rank_loss", rank_total)
        tr.step(loss)
        for m in self.model.modalities:  # several processes: every rank adds every rank's samples
            self.history.update(m, idx, per_sample[m], tr.all_reduce_sum if tr.world_size > 1 else None)
        return {"loss": loss.detach(), "rank_loss": rank_total}

    def predict(self, batch):
        out = self.model(batch["inputs"], batch["present"])
        z, _ = self.fused(out)
        return Output(z, out.unimodal_logits, out.features)

    def state_dict(self):
        return {"history": self.history.state_dict()} if self.history is not None else {}

    def load_state_dict(self, state):
        if self.history is not None and "history" in state:
            self.history.load_state_dict(state["history"])
