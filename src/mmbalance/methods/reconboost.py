"""ReconBoost: alternating-modality boosting with reconcilement (Hua, Xu, Bao, Yang, Huang,
"ReconBoost: Boosting Can Achieve Modality Reconcilement", ICML 2024).

Pure math: :func:`reconboost_schedule` (which stage, phase and learner an epoch belongs to),
:func:`boosting_weights` / :func:`boosting_loss` (the per-sample targets of the learner being
boosted) and :func:`consolidation_loss`; :class:`BoostEnsemble` is the model's head (one learner
per modality through a shared head, ensemble ``beta * sum_m f_m``); :class:`ReconBoost` wires them
into the engine's epochs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MultimodalModel
from ..models.fusions import Fusion
from ..options import Interval
from ..registry import ConfigError
from . import register_method
from .base import Method, ModelSpec

log = logging.getLogger("mmbalance")


@dataclass(frozen=True)
class StagePosition:
    """Where an epoch lies in ReconBoost's schedule."""

    stage: int  # 0-based stage
    phase: int  # 1 = boost the stage's learner alone, 2 = global rectification of every learner
    learner: int  # index of the stage's modality (cyclic: stage mod M)
    phase_start: bool  # the first epoch of its phase (a fresh optimizer state in the public code)


def reconboost_schedule(epoch: int, epochs_per_stage: int, correct_epochs: int, num_modalities: int) -> StagePosition:
    """Stage ``t`` spans ``epochs_per_stage + correct_epochs`` epochs: first ``epochs_per_stage``
    epochs of phase 1 (learner ``t mod M`` alone), then ``correct_epochs`` of phase 2.

    >>> [(p.stage, p.phase, p.learner) for p in (reconboost_schedule(e, 2, 1, 2) for e in range(7))]
    [(0, 1, 0), (0, 1, 0), (0, 2, 0), (1, 1, 1), (1, 1, 1), (1, 2, 1), (2, 1, 0)]
    """
    if epochs_per_stage < 1 or correct_epochs < 0 or num_modalities < 1:
        raise ConfigError("reconboost: epochs_per_stage >= 1, correct_epochs >= 0 and a modality are needed")
    length = epochs_per_stage + correct_epochs
    stage, k = divmod(int(epoch), length)
    phase = 1 if k < epochs_per_stage else 2
    return StagePosition(stage, phase, stage % num_modalities, k in (0, epochs_per_stage))


def boosting_weights(others_logits: Tensor | None, labels: Tensor, weight1: float, weight2: float,
                     num_classes: int) -> Tensor:
    """Per-sample weight of the boosted learner's cross-entropy:
    ``(weight1 - weight2 * p_{F_-m}(y)) / C``, where ``p_{F_-m}(y)`` is the true-class probability
    of the other learners' ensemble ``F_-m = beta * sum_{j != m} f_j`` (uniform ``1/C`` when there
    is no other learner). Samples the others already get right weigh less; the ``1/C`` is the
    public code's mean over the class axis of a one-hot product. Detached, float32.

    >>> z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])   # p(y=0): 0.5 and 0.881
    >>> [round(w, 4) for w in boosting_weights(z, torch.tensor([0, 0]), 5.0, 1.0, 2).tolist()]
    [2.25, 2.0596]
    """
    with torch.no_grad():
        if others_logits is None:
            p = torch.full(labels.shape, 1.0 / num_classes, device=labels.device)
        else:
            p = others_logits.float().softmax(1).gather(1, labels.view(-1, 1)).squeeze(1)
        return (float(weight1) - float(weight2) * p) / float(num_classes)


def boosting_loss(logits: Tensor, others_logits: Tensor | None, labels: Tensor, weight1: float,
                  weight2: float) -> Tensor:
    """Per-sample boosting loss of learner m (shape ``(B,)``):
    ``-(weight1 - weight2 * p_{F_-m}(y)) / C * log softmax(f_m)_y`` (the weights detached: the
    other learners are fixed during the stage). Its gradient with respect to ``f_m`` is the
    cross-entropy's, down-weighted where the ensemble of the others is already right: the
    learner fits what the others miss (ReconBoost's KL-based reconcilement, equivalent to a
    gradient-boosting step)."""
    w = boosting_weights(others_logits, labels, weight1, weight2, logits.shape[1])
    return w * F.cross_entropy(logits.float(), labels, reduction="none")


def consolidation_loss(logits: Tensor, previous_logits: Tensor, detach_current: bool = False) -> Tensor:
    """Per-sample ``mean_c (softmax(f_m)_c - softmax(f_prev)_c)^2`` (shape ``(B,)``; its batch mean
    is ``MSELoss`` of the two probability vectors). ``softmax(f) - onehot(y)`` is the gradient of
    the cross-entropy with respect to the logits, so this is also the squared distance between
    the two learners' functional gradients (``ga`` = gradient alignment in the public code).
    ``f_prev`` is always detached; ``detach_current`` detaches ``f_m`` too (the public code:
    the term then has no gradient)."""
    p = (logits.detach() if detach_current else logits).float().softmax(1)
    q = previous_logits.detach().float().softmax(1)
    return (p - q).pow(2).mean(1)


class BoostEnsemble(Fusion):
    """ReconBoost's head: learner ``f_m = g(P_m h_m)`` per modality through one shared head g
    (the public code's ``Head``: Linear(d, hidden) -> ReLU -> Linear(hidden, C); ``hidden = 0``: a
    linear head), ensemble ``z = beta * sum_m f_m`` with a learnable ``beta`` (the boost rate).
    ``P_m`` projects encoders of unequal width to the largest (identity when widths are equal).
    Built by the ``reconboost`` method only (not in the fusion registry)."""

    name = "reconboost_ensemble"

    def __init__(self, feature_dims: dict[str, int], num_classes: int, head_hidden: int = 256,
                 boost_rate: float = 1.0):
        super().__init__(feature_dims, num_classes)
        self.common_dim = max(feature_dims.values())
        self.proj = nn.ModuleDict({m: (nn.Identity() if d == self.common_dim else nn.Linear(d, self.common_dim))
                                   for m, d in feature_dims.items()})
        if head_hidden:
            self.head: nn.Module = nn.Sequential(nn.Linear(self.common_dim, head_hidden), nn.ReLU(),
                                                 nn.Linear(head_hidden, num_classes))
        else:
            self.head = nn.Linear(self.common_dim, num_classes)
        self.beta = nn.Parameter(torch.tensor(float(boost_rate)))

    def learner(self, m: str, h: Tensor) -> Tensor:
        return self.head(self.proj[m](h))

    def forward(self, features):
        zm = {m: self.learner(m, features[m]) for m in self.modalities}
        return self.beta * torch.stack(list(zm.values())).sum(0), zm


@register_method("reconboost", summary="ReconBoost: one modality's learner boosted per stage against the others' "
                 "ensemble, then all learners rectified (Hua et al. 2024)",
                 paper='Hua et al., "ReconBoost: Boosting Can Achieve Modality Reconcilement"',
                 venue="ICML", year=2024, category="optimisation")
class ReconBoost(Method):
    """ReconBoost (Hua, Xu, Bao, Yang, Huang, ICML 2024; public code ``huacong/ReconBoost``,
    ``train.py``, ``models/dynamic_net.py``, ``schedule.py``).

    Model (:class:`BoostEnsemble`): learner ``f_m = g(h_m)`` per modality through one shared
    head g; prediction ``F = beta * sum_m f_m`` (beta learnable, initial ``boost_rate``).

    Schedule (:func:`reconboost_schedule`): stage t = ``epochs_per_stage`` epochs of phase 1
    then ``correct_epochs`` epochs of phase 2; the stage's modality is ``m = t mod M`` (a, v, a,
    ...; the public code's fixed schedule).

    Phase 1 (modality-alternating boosting): only learner m trains (encoder m and the shared
    head). Per sample, with ``F_-m = beta * sum_{j != m} f_j`` the others' ensemble (no
    gradient) and ``f_prev`` the previous stage's learner (modality ``(t - 1) mod M``, no
    gradient)::

        loss = -(weight1 - weight2 * p_{F_-m}(y)) / C * log p_{f_m}(y)              (boosting, reconcilement)
               + alpha * mean_c (softmax(f_m) - softmax(f_prev))_c^2               (memory consolidation)

    the first a mean over the samples where m is present, the second over those where m and the
    previous modality are present (stage 0 has no previous learner and no second term).
    Phase 2 (global rectification): every encoder, the head and beta with ``CE(F, y)``.
    Inference: ``F``; the per-modality logits are the learners ``f_m``.

    Options:
        epochs_per_stage: epochs of phase 1 per stage (4; CREMA-D and AVE in the public code).
        correct_epochs: epochs of phase 2 (global rectification) per stage (4; 0 = no
            rectification).
        weight1: weight of a learner's cross-entropy (5 CREMA-D, 4 AVE; the paper has no
            Kinetics-Sounds setting, the shipped KS config uses the CREMA-D values).
        weight2: how much the others' true-class probability lowers that weight (1); at most
            ``weight1`` so every sample's weight stays >= 0.
        alpha: weight of the memory-consolidation term (0.5).
        reconcile_grad: gradient of the alpha (consolidation) term: ``real`` (it reaches f_m, as
            the paper intends) or ``detached`` (the public code detaches both softmaxes, so the term has no gradient).
        boost_rate: initial value of the learnable ensemble weight beta (1.0).
        head_hidden: hidden width of the shared head (256, the public code; 0 = linear head).
        reset_optimizer: clear the optimizer's state (momentum) at the start of every phase,
            as the public code builds a new SGD optimizer per phase (true).

    Settings of the public code: CREMA-D — batch 64, SGD lr 0.01 for both phases, momentum 0.9,
    weight decay 5e-4, ``epochs_per_stage`` 4, ``correct_epochs`` 4, ``weight1`` 5, ``weight2``
    1, ``alpha`` 0.5, ``boost_rate`` 1.0, unimodal-pretrained encoders recommended, lr x0.1
    every 30 stages, up to 1000 stages (its best CREMA-D checkpoint is stage 99). AVE: ``weight1``
    4 (lr x0.5 at stage 40). Kinetics-Sounds: not in the paper.

    Decisions:
        * The engine's optimizer and learning rate serve both phases (the public code uses one
          lr, 0.01, for both); a parameter without a gradient (the frozen learners in phase 1,
          beta) is not stepped, so the frozen learners get no weight decay either.
        * The other learners run in train mode under ``no_grad`` in phase 1, as the public code
          (BatchNorm running statistics keep updating).
        * Every learner is in the ensemble from the start (the public code with
          ``--use_pretrain``); without it the public code starts from a random constant.
          Unimodal pretraining is not built in.
        * Missing modalities: a sample without m is left out of m's boosting loss; ``F_-m`` and
          phase 2 follow the model's absent policy. A global batch with no sample of m makes no
          step (every process alike: the counts are all-reduced).
        * More than two modalities: cyclic schedule; ``f_prev`` is the previous stage's learner
          (BalanceBenchmark's ``pre_modality``).

    Diagnostics per epoch: ``stage``, ``phase``, ``learner_<m>`` (1 while m is boosted),
    ``boost_loss``, ``consolidation_loss``, ``p_others`` (mean ``p_{F_-m}(y)``), ``beta``,
    ``rectify_loss``. Cost: phase 1 ~ one encoder's forward/backward plus the others' forward;
    phase 2 = joint training.
    """

    def __init__(self, epochs_per_stage: Annotated[int, Interval(1, None)] = 4,
                 correct_epochs: Annotated[int, Interval(0, None)] = 4,
                 weight1: Annotated[float, Interval(0, None, closed="neither")] = 5.0,
                 weight2: Annotated[float, Interval(0, None)] = 1.0,
                 alpha: Annotated[float, Interval(0, None)] = 0.5,
                 reconcile_grad: Literal["real", "detached"] = "real",
                 boost_rate: float = 1.0,
                 head_hidden: Annotated[int, Interval(0, None)] = 256,
                 reset_optimizer: bool = True):
        super().__init__()
        if float(weight2) > float(weight1):
            raise ConfigError(f"reconboost: weight2 ({weight2}) must not exceed weight1 ({weight1}): a sample "
                              "the others predict well would get a negative weight")
        self.epochs_per_stage = int(epochs_per_stage)
        self.correct_epochs = int(correct_epochs)
        self.weight1 = float(weight1)
        self.weight2 = float(weight2)
        self.alpha = float(alpha)
        self.reconcile_grad = reconcile_grad
        self.boost_rate = float(boost_rate)
        self.head_hidden = int(head_hidden)
        self.reset_optimizer = bool(reset_optimizer)

    # ------------------------------------------------------------------ construction
    def build_model(self, spec: ModelSpec) -> MultimodalModel:
        if spec.fusion != "concat":  # concat is the engine's default: not a user choice
            log.warning("reconboost builds its own ensemble head; --fusion %s is ignored", spec.fusion)
        encoders = spec.build_encoders()
        head = BoostEnsemble({m: int(e.out_dim) for m, e in encoders.items()}, spec.num_classes,
                             self.head_hidden, self.boost_rate)
        return MultimodalModel(encoders, head, spec.input_shapes, spec.absent_policy)

    def setup(self, trainer):
        super().setup(trainer)
        if not isinstance(self.model.fusion, BoostEnsemble):
            raise ConfigError("reconboost needs its own BoostEnsemble head (build_model was replaced)")

    def position(self, epoch: int) -> StagePosition:
        return reconboost_schedule(epoch, self.epochs_per_stage, self.correct_epochs, len(self.model.modalities))

    def on_epoch_start(self, epoch):
        pos = self.position(epoch)
        if self.reset_optimizer and pos.phase_start:
            self.trainer.optimizer.state.clear()

    # ------------------------------------------------------------------ training
    def training_step(self, batch):
        pos = self.position(self.trainer.epoch)
        self.log("stage", pos.stage)
        self.log("phase", pos.phase)
        for i, m in enumerate(self.model.modalities):
            self.log(f"learner_{m}", float(pos.phase == 1 and i == pos.learner))
        self.log("beta", self.model.fusion.beta.detach().clone())
        return self._boost(batch, pos) if pos.phase == 1 else self._rectify(batch)

    def _rectify(self, batch):
        out, loss = self.fused_forward(batch)
        self.trainer.step(loss)
        self.log("rectify_loss", loss)
        return {"loss": loss.detach()}

    def _boost(self, batch, pos: StagePosition):
        tr, model = self.trainer, self.model
        mods = model.modalities
        m = mods[pos.learner]
        prev = mods[(pos.stage - 1) % len(mods)] if pos.stage > 0 and len(mods) > 1 else None
        x, present, y = batch["inputs"], batch["present"], batch["label"]
        with tr.autocast():
            with torch.no_grad():  # the other learners are fixed during the stage
                feats = {j: model.encode(j, x[j], present[j]) for j in mods if j != m}
            feats[m] = model.encode(m, x[m], present[m])
            out = model.fuse({j: feats[j] for j in mods}, present)
        zm = out.unimodal_logits
        others = [zm[j] for j in mods if j != m]
        ens = (model.fusion.beta * torch.stack(others).sum(0)).detach() if others else None
        has_m = present[m].view(-1)
        has_both = has_m & present[prev].view(-1) if prev is not None else torch.zeros_like(has_m)
        counts = tr.all_reduce_sum(torch.stack([has_m.sum(), has_both.sum()]).to(torch.float64))
        n_m, n_both = counts.tolist()  # the step's one host read: whether any process has m
        if n_m == 0.0:  # no process has a sample of m: every process skips alike
            return {}
        W = float(tr.world_size)
        per = boosting_loss(zm[m], ens, y, self.weight1, self.weight2)
        boost = (per * has_m.to(per.dtype)).sum() * (W / n_m)
        loss = boost
        if prev is not None and self.alpha > 0.0:
            ga = consolidation_loss(zm[m], zm[prev], detach_current=self.reconcile_grad == "detached")
            cons = (ga * has_both.to(ga.dtype)).sum() * (W / max(n_both, 1.0))
            loss = loss + self.alpha * cons
            self.log("consolidation_loss", cons)
        tr.step(loss)
        self.log("boost_loss", boost)
        if ens is not None:
            with torch.no_grad():
                p = ens.float().softmax(1).gather(1, y.view(-1, 1)).squeeze(1)
                self.log("p_others", (p * has_m).sum() / has_m.sum().clamp(min=1))
        return {"loss": loss.detach()}


__all__ = ["BoostEnsemble", "ReconBoost", "StagePosition", "boosting_loss", "boosting_weights",
           "consolidation_loss", "reconboost_schedule"]
