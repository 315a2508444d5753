"""LFM: learning the modality gap dynamically (Yang, Wan, Jiang, Xu, "Facilitating Multimodal
Classification via Dynamically Learning Modality Gap", NeurIPS 2024).

Modalities fit the category labels at different speeds, which is what makes one of them dominate.
An unsupervised cross-modal contrastive objective has no labels to fit, so no such imbalance;
LFM integrates it with the supervised multimodal loss and changes the balance between the two
over training: early epochs are dominated by the contrastive (alignment) term, later ones by the
supervised term. Pure math: :func:`alignment_weight`, :func:`fitted_supervised_weight`,
:func:`cross_modal_infonce`, :func:`prediction_js`; :class:`LFM` wires them into a step.
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Annotated, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..options import Interval
from ..registry import ConfigError
from . import register_method
from .base import Method, build_standard_model
from .qmf import gather_global_batch

#: the released code's polynomial (``Crema_epoch.py``, ``getAlpha_Learnable_Fitted``): the weight
#: of the supervised loss as a function of the epoch, fitted to the curve its learned strategy
#: produced on CREMA-D over 200 epochs
FITTED_SUPERVISED_COEFFICIENTS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06,
                                  2.23835486e-08, -5.39717505e-11)


def fitted_supervised_weight(epoch: int) -> float:
    """The released code's fitted supervised weight at 0-based ``epoch`` (polynomial of degree 5,
    :data:`FITTED_SUPERVISED_COEFFICIENTS`), clamped to [0, 1]: about 0.20 at epoch 0, 0.54 at
    100, 0.92 at 199; outside the 200 fitted epochs the polynomial soon leaves [0, 1].

    >>> round(fitted_supervised_weight(0), 4), round(fitted_supervised_weight(100), 4)
    (0.2046, 0.5392)
    """
    t = float(epoch)
    w = sum(c * t ** i for i, c in enumerate(FITTED_SUPERVISED_COEFFICIENTS))
    return min(max(w, 0.0), 1.0)


def alignment_weight(epoch: int, schedule: str = "heuristic", decay: float = 0.3, alpha_min: float = 0.05,
                     alpha_max: float = 0.95, alpha: float = 0.5) -> float:
    """The weight ``a_t`` of the alignment (unsupervised) loss at 0-based ``epoch``; the
    supervised loss gets ``1 - a_t``.

    ``heuristic``: ``a_t = clip(exp(-decay * t), alpha_min, alpha_max)`` (the released code's
    ``getAlpha_heritic``: alignment first, supervision later). ``fitted``: ``1 -``
    :func:`fitted_supervised_weight`. ``constant``: ``alpha`` every epoch (static integration).

    >>> [round(alignment_weight(t), 4) for t in (0, 1, 5, 20)]
    [0.95, 0.7408, 0.2231, 0.05]
    """
    if schedule == "heuristic":
        return min(max(math.exp(-decay * float(epoch)), alpha_min), alpha_max)
    if schedule == "fitted":
        return 1.0 - fitted_supervised_weight(epoch)
    if schedule == "constant":
        return float(alpha)
    raise ConfigError(f"lfm: unknown schedule '{schedule}'; valid: heuristic, fitted, constant")


def cross_modal_infonce(a: Tensor, b: Tensor, temperature: float = 0.07, valid: Tensor | None = None) -> Tensor:
    """Symmetric cross-modal InfoNCE between paired features a, b (N, d) (CLIP's loss):
    similarities ``S = norm(a) norm(b)^T / temperature``; sample i's partner is the positive and
    the other samples of the batch are negatives, in both directions;
    ``(CE(S, diag) + CE(S^T, diag)) / 2``, averaged over the anchors.

    ``valid`` (N,) bool restricts the loss to the pairs where both modalities are present:
    other samples are neither anchors nor negatives. 0 (with a gradient graph) when no pair is
    valid.

    >>> x = torch.eye(3)
    >>> round(float(cross_modal_infonce(x, x, 1.0)), 4)   # -log(e / (e + 2))
    0.5514
    """
    an = F.normalize(a.float(), dim=1)
    bn = F.normalize(b.float(), dim=1)
    if valid is not None:
        idx = torch.nonzero(valid.view(-1)).flatten()
        an, bn = an[idx], bn[idx]
    n = an.shape[0]
    if n == 0:
        return (a.float().sum() + b.float().sum()) * 0.0
    s = an @ bn.t() / temperature
    target = torch.arange(n, device=s.device)
    return 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target))


def prediction_js(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Per-sample divergence (B,) between two modalities' predictions, as the released code's
    ``Alignment`` computes it: with ``p = softmax(z_p)``, ``q = softmax(z_q)``, ``m = (p + q)/2``,
    ``0.5 * [KL(m || p) + KL(m || q)]`` (its ``F.kl_div(p.log(), m)`` is ``KL(m || p)``, so this is
    not the textbook Jensen-Shannon divergence ``0.5 [KL(p || m) + KL(q || m)]``); its loss is the
    batch mean. 0 when the predictions agree.

    >>> round(float(prediction_js(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]))[0]), 4)
    0.0348
    """
    lp = F.log_softmax(p_logits.float(), dim=1)
    lq = F.log_softmax(q_logits.float(), dim=1)
    m = 0.5 * (lp.exp() + lq.exp())
    lm = m.clamp_min(1e-30).log()
    return 0.5 * ((m * (lm - lp)).sum(1) + (m * (lm - lq)).sum(1))


def modality_gap(a: Tensor, b: Tensor, valid: Tensor | None = None) -> Tensor:
    """The modality gap (Liang et al. 2022): the distance between the centroids of the
    L2-normalised features of two modalities, over the pairs in ``valid``; 0 when none. A 0-d
    tensor computed on the device (masked sums, no host synchronisation)."""
    an, bn = F.normalize(a.detach().float(), dim=1), F.normalize(b.detach().float(), dim=1)
    if valid is None:
        return (an.mean(0) - bn.mean(0)).norm()
    w = valid.view(-1, 1).to(an.dtype)
    n = w.sum()
    gap = ((an * w).sum(0) / n.clamp(min=1.0) - (bn * w).sum(0) / n.clamp(min=1.0)).norm()
    return torch.where(n > 0, gap, torch.zeros_like(gap))


@register_method("lfm", summary="LFM: supervised + cross-modal alignment losses, integrated by an epoch-dependent weight",
                 paper='Yang et al., "Facilitating Multimodal Classification via Dynamically Learning Modality Gap"',
                 venue="NeurIPS", year=2024, category="objective")
class LFM(Method):
    """Dynamically learning the modality gap (Yang, Wan, Jiang, Xu, NeurIPS 2024; public code
    ``njustkmg/NeurIPS24-LFM``, ``Crema_epoch.py`` and its history).

    Per step (epoch t, 0-based), one forward and one backward:

    1. ``L_sup = CE(z, y)`` on the fused logits.
    2. ``L_align``: with ``alignment="contrastive"`` (the paper's unsupervised cross-modal
       contrastive learning) the symmetric InfoNCE between the L2-normalised encoder features of
       every pair of modalities over the *global* batch (:func:`cross_modal_infonce`), averaged
       over the pairs; with ``alignment="js"`` (the released code) the divergence between the
       pair's unimodal predictions (:func:`prediction_js`), averaged over samples and pairs.
    3. ``L = loss_scale * [(1 - a_t) L_sup + a_t L_align]`` with ``a_t`` from ``schedule``
       (:func:`alignment_weight`); backward; optimizer step.

    Model: with the engine's default ``--fusion concat`` the model is built with the ``late``
    fusion — one linear classifier per modality, fused logits their mean — the network of the
    released code (``cls_a``, ``cls_v``, prediction ``0.5 o_a + 0.5 o_v``); any other fusion is
    used as given. Inference: the fused logits.

    Options:
        alignment: ``contrastive`` (cross-modal InfoNCE on encoder features; needs equal feature
            widths) or ``js`` (the released code's divergence between unimodal predictions).
        temperature: InfoNCE temperature (0.07, the contrastive version of the released code).
        schedule: ``heuristic`` (``a_t = clip(exp(-decay t), alpha_min, alpha_max)``), ``fitted``
            (the released code's polynomial, CREMA-D, 200 epochs) or ``constant`` (``alpha``).
        decay: decay rate of the heuristic schedule (0.3, the released code).
        alpha_min: lower bound of the heuristic alignment weight (0.05).
        alpha_max: upper bound of the heuristic alignment weight (0.95).
        alpha: the alignment weight of the ``constant`` schedule (0.5).
        loss_scale: factor on the whole loss (1; the released code's final version multiplies
            by 2, which with plain SGD is a doubled learning rate).

    Decisions:
        * The paper integrates an unsupervised contrastive loss; the released code went through a
          feature InfoNCE (temperature 0.07) with the exponential "heuristic" weight, then
          settled on the prediction divergence with a polynomial "learned" weight. Default: the
          contrastive loss with the heuristic schedule; ``alignment=js`` with
          ``schedule=fitted`` and ``loss_scale=2`` reproduces the final released code.
        * The paper's learning-based integration (a bilevel update of the weight on held-out
          data) is not implemented: the released estimator updates the weight with the mean of
          the first parameter tensor's Hessian-vector product, which is not the hypergradient of
          the weight, on a batch of training samples; its resulting curve is offered as
          ``schedule=fitted``. The released code also selects epochs on the test set; here the
          checkpoint is selected on validation.
        * More than two modalities: the alignment term is the mean over all pairs.
        * Missing modalities: a pair's alignment uses only the samples where both are present
          (the others are neither anchors nor negatives). With several processes the InfoNCE
          runs on the features gathered from every process (one collective; each process's
          gradient reaches its own samples and is scaled by the number of processes, as the
          engine averages), and the divergence's sample counts are summed (one collective); so
          several processes apply one process's update on the global batch.

    Diagnostics per epoch: ``alpha`` (the alignment weight a_t), ``loss_sup``, ``loss_align`` and
    with ``contrastive`` ``gap`` (distance between the centroids of the normalised features of the
    modalities, averaged over pairs: the modality gap). Cost: ~1.0x joint training (a B x B
    similarity per pair).
    """

    def __init__(self, alignment: Literal["contrastive", "js"] = "contrastive",
                 temperature: Annotated[float, Interval(0, None, closed="neither")] = 0.07,
                 schedule: Literal["heuristic", "fitted", "constant"] = "heuristic",
                 decay: Annotated[float, Interval(0, None)] = 0.3,
                 alpha_min: Annotated[float, Interval(0, 1)] = 0.05,
                 alpha_max: Annotated[float, Interval(0, 1)] = 0.95,
                 alpha: Annotated[float, Interval(0, 1)] = 0.5,
                 loss_scale: Annotated[float, Interval(0, None, closed="neither")] = 1.0):
        super().__init__()
        if float(alpha_min) > float(alpha_max):
            raise ConfigError(f"lfm: alpha_min ({alpha_min}) must not exceed alpha_max ({alpha_max})")
        self.alignment = alignment
        self.temperature = float(temperature)
        self.schedule = schedule
        self.decay = float(decay)
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.alpha = float(alpha)
        self.loss_scale = float(loss_scale)

    def modalities(self, available):
        if len(available) < 2:
            raise ConfigError(f"lfm aligns modalities with each other and needs at least two; got "
                              f"{len(available)}: {', '.join(available)}")
        return list(available)

    def build_model(self, spec):
        if spec.fusion == "concat":  # the engine's default: build the released code's late-fusion network
            return build_standard_model(spec, fusion="late")
        return build_standard_model(spec)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        mods = self.model.modalities
        if len(mods) < 2:
            self.modalities(mods)
        dims = {m: self.model.feature_dim(m) for m in mods}
        if self.alignment == "contrastive" and len(set(dims.values())) > 1:
            raise ConfigError("lfm alignment 'contrastive' compares encoder features and needs equal widths; got "
                              + ", ".join(f"{m} {d}" for m, d in dims.items())
                              + " (give the encoders the same output width, or use --method.alignment js)")
        self.pairs = list(combinations(range(len(mods)), 2))

    def weight(self, epoch: int) -> float:
        """The alignment weight a_t of 0-based ``epoch``."""
        return alignment_weight(epoch, self.schedule, self.decay, self.alpha_min, self.alpha_max, self.alpha)

    # -- the alignment term over the global batch ---------------------------------------------
    def contrastive_term(self, feats: Sequence[Tensor], present: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Mean over pairs of :func:`cross_modal_infonce` of the global batch, and the mean
        modality gap (diagnostic)."""
        tr = self.trainer
        world = tr.world_size
        x = torch.stack([f.float() for f in feats])  # (M, B, d)
        p = torch.stack([q.float() for q in present]).unsqueeze(2)  # (M, B, 1)
        glob = gather_global_batch(torch.cat([x, p], dim=2).transpose(1, 2), tr.rank, world, tr.all_reduce_sum)
        gx, gp = glob[:, :-1, :].transpose(1, 2), glob[:, -1, :].detach() > 0.5  # (M, N, d), (M, N)
        terms, gaps = [], []
        for i, j in self.pairs:
            valid = gp[i] & gp[j]
            terms.append(cross_modal_infonce(gx[i], gx[j], self.temperature, valid))
            gaps.append(modality_gap(gx[i], gx[j], valid))
        loss = torch.stack(terms).mean()
        if world > 1:  # each process's gradient reaches its own samples only; the engine averages
            loss = loss + (world - 1) * (loss - loss.detach())
        return loss, sum(gaps) / len(gaps)

    def js_term(self, unimodal_logits: Sequence[Tensor], present: Sequence[Tensor]) -> Tensor:
        """Mean over pairs of the mean of :func:`prediction_js` over the global batch's samples
        where both modalities are present."""
        tr = self.trainer
        sums, masks = [], []
        for i, j in self.pairs:
            masks.append((present[i] & present[j]).to(torch.float32))
            sums.append((prediction_js(unimodal_logits[i], unimodal_logits[j]) * masks[-1]).sum())
        counts = tr.all_reduce_sum(torch.stack([m.sum() for m in masks]).to(torch.float64))  # one collective
        # world / max(count, 1) in float64 on the device, applied in the sums' dtype (no host read)
        world = counts.new_full((), float(tr.world_size))
        terms = [s * (world / c.clamp(min=1.0)).to(s.dtype) for s, c in zip(sums, counts)]
        return torch.stack(terms).mean()

    def losses(self, batch) -> tuple[Tensor, dict[str, float | Tensor]]:
        """``(L, diagnostics)`` of one batch; ``L.backward()`` gives LFM's gradients."""
        tr, model = self.trainer, self.model
        mods = model.modalities
        y = batch["label"]
        present = [batch["present"][m] for m in mods]
        with tr.autocast():
            feats = model.encode_all(batch["inputs"], batch["present"])
            out = model.fuse(feats, batch["present"])
        loss_sup = self.ce(out.logits, y)
        diag: dict[str, float | Tensor] = {}
        if self.alignment == "contrastive":
            loss_align, diag["gap"] = self.contrastive_term([feats[m] for m in mods], present)
        else:
            loss_align = self.js_term([out.unimodal_logits[m] for m in mods], present)
        a = self.weight(tr.epoch)
        loss = self.loss_scale * ((1.0 - a) * loss_sup + a * loss_align)
        diag.update(alpha=a, loss_sup=loss_sup.detach(), loss_align=loss_align.detach())  # device tensors
        return loss, diag

    def training_step(self, batch):
        loss, diag = self.losses(batch)
        self.trainer.step(loss)
        for k, v in diag.items():
            self.log(k, v)
        return {"loss": loss.detach(), "loss_sup": diag["loss_sup"], "loss_align": diag["loss_align"]}


__all__ = ["FITTED_SUPERVISED_COEFFICIENTS", "LFM", "alignment_weight", "cross_modal_infonce",
           "fitted_supervised_weight", "modality_gap", "prediction_js"]
