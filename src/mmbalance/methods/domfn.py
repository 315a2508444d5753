"""DOMFN: divergence-orientated multimodal fusion (Yang, Zhang, Gao, Gao, Zhu, "DOMFN: A
Divergence-Orientated Multi-Modal Fusion Network for Resume Assessment", ACM MM 2022).

Fusion can be worse than the best single modality when the modalities disagree. DOMFN keeps a
network per modality and a fusion network, measures per sample how far each modality's
prediction lies from the fused one (a penalty score), and fuses only where every penalty is
small; elsewhere it trusts the most confident modality. The penalty also enters an amended
training loss. Pure math: :func:`domfn_predictions`, :func:`domfn_penalties`,
:func:`domfn_fuse_mask`, :func:`domfn_select`; :class:`DOMFNHeads` is the model head and
:class:`DOMFN` the method.
"""
from __future__ import annotations

import logging
from typing import Annotated, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Fusion, MultimodalModel, Output
from ..options import Interval
from ..registry import ConfigError
from . import register_method
from .base import Method, ModelSpec

log = logging.getLogger("mmbalance")


def domfn_predictions(logits: Tensor, sigmoid_outputs: bool = False) -> Tensor:
    """The prediction vector a penalty compares: ``softmax(z)``, or with ``sigmoid_outputs`` the
    public code's sigmoid output layer ``sigmoid(z)`` (per class, not normalised)."""
    return torch.sigmoid(logits.float()) if sigmoid_outputs else F.softmax(logits.float(), dim=-1)


def domfn_penalties(unimodal: Tensor, reference: Tensor) -> Tensor:
    """Penalty scores ``pi_{m,b} = max_c (p_{m,b,c} - r_{b,c})^2``: (M, B) from the modalities'
    predictions (M, B, C) and the reference prediction (B, C) (the fused one, or the mean of the
    modalities').

    >>> p = torch.tensor([[[0.9, 0.1]], [[0.5, 0.5]]]); r = torch.tensor([[0.6, 0.4]])
    >>> [round(v, 4) for v in domfn_penalties(p, r).flatten().tolist()]
    [0.09, 0.01]
    """
    return (unimodal - reference.unsqueeze(0)).pow(2).amax(dim=-1)


def domfn_fuse_mask(penalties: Tensor, tau: float, gamma: float, present: Tensor | None = None) -> Tensor:
    """Per sample (B,) bool: fuse when every present modality's scaled penalty is below the
    threshold, ``pi_{m,b} / tau < gamma`` for all m present in sample b.

    >>> domfn_fuse_mask(torch.tensor([[0.09, 0.2], [0.01, 0.01]]), tau=0.2, gamma=0.8).tolist()
    [True, False]
    """
    small = penalties / tau < gamma
    if present is not None:
        small = small | ~present.bool()
    return small.all(dim=0)


def domfn_select(fused: Tensor, unimodal: Tensor, confidence: Tensor, fuse: Tensor,
                 present: Tensor | None = None) -> Tensor:
    """The prediction DOMFN outputs per sample (B, C): the fused logits where ``fuse``, elsewhere
    the logits of the present modality with the highest confidence ``max_c p_m`` (first on ties).

    ``unimodal`` (M, B, C), ``confidence`` (M, B), ``fuse`` (B,), ``present`` (M, B) or None.
    """
    conf = confidence.float()
    if present is not None:
        conf = conf.masked_fill(~present.bool(), float("-inf"))
    best = conf.argmax(dim=0)  # (B,)
    chosen = unimodal.gather(0, best.view(1, -1, 1).expand(1, *unimodal.shape[1:])).squeeze(0)
    return torch.where(fuse.view(-1, 1), fused, chosen.to(fused.dtype))


class DOMFNHeads(Fusion):
    """DOMFN's heads: a linear classifier per modality on its encoder feature (the unimodal
    logits z_m) and a fusion network on the concatenated features, ``Linear(sum d_m, hidden) ->
    ReLU -> Linear(hidden, C)`` (the public code's ``multi_encoder``, hidden 64; ``hidden=0``: one
    linear layer). Built by the ``domfn`` method only (not in the fusion registry)."""

    name = "domfn"

    def __init__(self, feature_dims: dict[str, int], num_classes: int, hidden: int = 64):
        super().__init__(feature_dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})
        total = sum(feature_dims.values())
        self.fusion_net = (nn.Sequential(nn.Linear(total, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
                           if hidden else nn.Linear(total, num_classes))

    def forward(self, features):
        zm = {m: self.heads[m](features[m]) for m in self.modalities}
        z = self.fusion_net(torch.cat([features[m] for m in self.modalities], dim=1))
        return z, zm


@register_method("domfn", summary="DOMFN: per-sample divergence gates fusion; amended unimodal losses with the penalty",
                 paper='Yang et al., "DOMFN: A Divergence-Orientated Multi-Modal Fusion Network for Resume Assessment"',
                 venue="ACM MM", year=2022, category="feed-forward")
class DOMFN(Method):
    """Divergence-Orientated Multi-Modal Fusion Network (Yang et al., ACM MM 2022; the
    compared "DOMFN" of MIE's tables; public code ``njustkmg/MM22_DOMFN`` (Paddle, resumes:
    ``models/encoder.py``, ``engines/resume_trainer.py``) and a PyTorch port for CMU-MOSI,
    ``njustkmg/DOMFN`` ``engines/mosi_trainer.py``).

    Model (:class:`DOMFNHeads`): the run's encoders; a linear classifier per modality (z_m) and a
    fusion network on the concatenated features (z). Per sample b and modality m, with
    predictions ``p = softmax(logits)`` (:func:`domfn_predictions`):

    * penalty ``pi_{m,b} = max_c (p_{m,b} - r_b)_c^2`` (:func:`domfn_penalties`), ``r`` the fused
      prediction (``reference=fused``) or the mean of the modalities' (``reference=mean``);
    * fuse ``f_b = 1`` when ``pi_{m,b} / tau < gamma`` for every present m
      (:func:`domfn_fuse_mask`).

    Training loss (amended; every term per sample, ``CE_m`` / ``CE_f`` the per-sample
    cross-entropies of z_m / z):
    ``L = sum_m mean_{b: m present}[0.5 CE_{m,b}^2 - eta pi_{m,b} + f_b CE_{m,b}]
    + mean_b[f_b CE_{f,b}]``. For a sample that is fused every term's gradient flows everywhere
    (the code's joint step of all networks on ``text_loss + image_loss + multi_loss``); for a
    sample that is not fused only ``0.5 CE_m^2 - eta pi_m`` acts, with the reference prediction a
    constant, so it trains modality m's encoder and classifier only (the code's per-modality
    steps) and the fusion network not at all. The first ``pretrain_epochs`` epochs train
    ``sum_m CE_m`` only (the code's unimodal pre-training).
    Inference (:func:`domfn_select`): z where f_b, else the z_m of the present modality with the
    highest confidence ``max_c p_m``.

    Options:
        eta: weight of the penalty in the amended unimodal loss (0.5, both public configs).
        tau: penalty scale; fuse when ``penalty / tau < gamma`` (0.2, the resume config; 0.5 MOSI).
        gamma: the divergence threshold (0.8, both public configs).
        reference: ``fused`` (penalties against the fused prediction: the paper's resume code)
            or ``mean`` (against the mean of the modalities' predictions: the MOSI port).
        sigmoid_outputs: pass every output layer through a sigmoid before the loss, the
            penalties and the selection, as the public code's ``nn.Sigmoid()`` output layers do
            (its cross-entropy then reads the sigmoid outputs as logits).
        pretrain_epochs: epochs of unimodal pre-training (``sum_m CE_m``) first (0; the public
            configs use 15 (resumes) and 30 (MOSI)).
        hidden: hidden width of the fusion network (64, the public code; 0 = one linear layer).

    Decisions:
        * The public code trains one instance per step (batch size 1, its "instance-specific
          training"), so its fuse-or-not decision picks which networks step. Here the decision
          is made per sample inside a batch and routes each sample's gradient as above, so a
          batch step is the mean of the per-instance steps' gradients.
        * In the code's non-fused branch the gradient of ``pi_m`` also reaches encoder m through
          the fused prediction (only the other networks' gradients are discarded); here the
          reference is a constant there, so the branch updates modality m's network from its
          own prediction only.
        * The code uses separate Adam optimizers (learning rates 1e-3 / 1e-4 for the unimodal /
          fusion networks, lower rates after pre-training); here the run's single optimizer.
        * ``-eta * pi`` lowers the loss when a modality's prediction moves away from the
          reference: the sign of both public codes, kept.
        * Any number of modalities (the MOSI port has three). Missing modalities: a sample's
          absent modality takes no part in its terms, its gate, or its selection; sums are
          normalised by the global batch's counts (one collective per step), so several
          processes apply the update of one process on the global batch.

    Diagnostics per epoch: ``fused_fraction`` (share of training samples fused), ``penalty_<m>``
    (mean penalty over present samples), ``loss_<m>``, ``loss_fused`` (mean CE), ``pretraining``
    (1 in the pre-training epochs). Cost: ~1.0x joint training.
    """

    def __init__(self, eta: Annotated[float, Interval(0, None)] = 0.5,
                 tau: Annotated[float, Interval(0, None, closed="neither")] = 0.2,
                 gamma: Annotated[float, Interval(0, None, closed="neither")] = 0.8,
                 reference: Literal["fused", "mean"] = "fused",
                 sigmoid_outputs: bool = False,
                 pretrain_epochs: Annotated[int, Interval(0, None)] = 0,
                 hidden: Annotated[int, Interval(0, None)] = 64):
        super().__init__()
        self.eta = float(eta)
        self.tau = float(tau)
        self.gamma = float(gamma)
        self.reference = reference
        self.sigmoid_outputs = bool(sigmoid_outputs)
        self.pretrain_epochs = int(pretrain_epochs)
        self.hidden = int(hidden)

    def modalities(self, available):
        if len(available) < 2:
            raise ConfigError(f"domfn compares modalities with each other and needs at least two; got "
                              f"{len(available)}: {', '.join(available)}")
        return list(available)

    def build_model(self, spec: ModelSpec) -> MultimodalModel:
        if spec.fusion != "concat":
            log.warning("domfn uses its own heads (a classifier per modality + a fusion network on the "
                        "concatenated features); fusion '%s' is ignored", spec.fusion)
        encoders = spec.build_encoders()
        dims = {m: int(e.out_dim) for m, e in encoders.items()}
        return MultimodalModel(encoders, DOMFNHeads(dims, spec.num_classes, self.hidden), spec.input_shapes,
                               spec.absent_policy)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if not isinstance(self.model.fusion, DOMFNHeads):
            raise ConfigError("domfn needs its own heads (build_model was replaced)")

    # -- the rule ------------------------------------------------------------------------------
    def outputs(self, logits: Tensor) -> Tensor:
        """What enters the cross-entropy: the logits, or their sigmoid (``sigmoid_outputs``)."""
        return torch.sigmoid(logits.float()) if self.sigmoid_outputs else logits.float()

    def divergence(self, out: Output, present: Mapping[str, Tensor]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(p_m (M, B, C), reference (B, C), penalties (M, B), present (M, B))`` of a model
        output; penalties detached."""
        mods = self.model.modalities
        pm = torch.stack([domfn_predictions(out.unimodal_logits[m], self.sigmoid_outputs) for m in mods])
        pres = torch.stack([present[m].bool() for m in mods])
        if self.reference == "fused":
            ref = domfn_predictions(out.logits, self.sigmoid_outputs)
        else:
            w = pres.to(pm.dtype).unsqueeze(-1)
            ref = (pm * w).sum(0) / w.sum(0).clamp_min(1.0)
        return pm, ref, domfn_penalties(pm.detach(), ref.detach()), pres

    def losses(self, batch) -> tuple[Tensor, dict[str, float | Tensor | tuple[Tensor, Tensor]]]:
        """``(L, diagnostics)`` for one batch; ``L.backward()`` gives DOMFN's gradients. The
        diagnostics are device tensors (no host synchronisation); a per-modality one is a pair
        ``(value, weight)`` whose weight is 0 when the modality is absent from the global batch."""
        tr, model = self.trainer, self.model
        mods = model.modalities
        M = len(mods)
        y = batch["label"]
        present = batch["present"]
        with tr.autocast():
            out = model(batch["inputs"], present)
        pm, ref, pen, pres = self.divergence(out, present)
        pretraining = tr.epoch < self.pretrain_epochs
        fuse = torch.zeros_like(y, dtype=torch.bool) if pretraining else domfn_fuse_mask(pen, self.tau, self.gamma, pres)
        ce_m = torch.stack([F.cross_entropy(self.outputs(out.unimodal_logits[m]), y, reduction="none") for m in mods])
        ce_f = F.cross_entropy(self.outputs(out.logits), y, reduction="none")
        presf = pres.to(ce_m.dtype)
        fusef = fuse.to(ce_m.dtype)
        with torch.no_grad():  # global counts and sums: one collective per step, whatever the data
            local = torch.cat([presf.sum(1), (pen * presf).sum(1), (ce_m.detach() * presf).sum(1),
                               torch.stack([torch.full((), float(y.numel()), device=y.device), fusef.sum(),
                                            ce_f.detach().sum()])]).to(torch.float64)
            glob = tr.all_reduce_sum(local)
        counts, pen_sums, ce_sums = glob[:M], glob[M:2 * M], glob[2 * M:3 * M]
        n_all, n_fused, ce_f_sum = glob[3 * M], glob[3 * M + 1], glob[3 * M + 2]
        world = float(tr.world_size)

        def norm(count: Tensor) -> Tensor:  # world / max(count, 1) in float64 (a true division, as
            # Python's; ``float / tensor`` would multiply by a reciprocal), applied in the loss's dtype
            return (count.new_full((), world) / count.clamp(min=1.0)).to(ce_m.dtype)

        if pretraining:
            per_sample = ce_m
        else:
            ref_g = torch.where(fuse.view(-1, 1), ref, ref.detach())  # non-fused samples: a constant
            pen_g = domfn_penalties(pm, ref_g)
            per_sample = 0.5 * ce_m * ce_m - self.eta * pen_g + fusef * ce_m
        loss = sum((per_sample[i] * presf[i]).sum() * norm(counts[i]) for i in range(M))
        if not pretraining:
            loss = loss + (fusef * ce_f).sum() * norm(n_all)
        diag: dict[str, float | Tensor | tuple[Tensor, Tensor]] = {
            "fused_fraction": n_fused / n_all.clamp(min=1), "pretraining": float(pretraining),
            "loss_fused": ce_f_sum / n_all.clamp(min=1)}
        for i, m in enumerate(mods):
            diag[f"penalty_{m}"] = (pen_sums[i] / counts[i], counts[i] > 0)
            diag[f"loss_{m}"] = (ce_sums[i] / counts[i], counts[i] > 0)
        return loss, diag

    def training_step(self, batch):
        loss, diag = self.losses(batch)
        self.trainer.step(loss)
        for k, v in diag.items():
            if isinstance(v, tuple):
                self.log(k, v[0], weight=v[1])
            else:
                self.log(k, v)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, batch):
        out = self.model(batch["inputs"], batch["present"])
        pm, _, pen, pres = self.divergence(out, batch["present"])
        fuse = domfn_fuse_mask(pen, self.tau, self.gamma, pres)
        mods = self.model.modalities
        zm = torch.stack([out.unimodal_logits[m] for m in mods])
        logits = domfn_select(out.logits, zm, pm.amax(dim=-1), fuse, pres)
        return Output(logits, out.unimodal_logits, out.features)


__all__ = ["DOMFN", "DOMFNHeads", "domfn_fuse_mask", "domfn_penalties", "domfn_predictions", "domfn_select"]
