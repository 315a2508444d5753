"""DGL: disentangled gradient learning (Wei, Luo, Luo, "Boosting Multimodal Learning via
Disentangled Gradient Learning", ICCV 2025).

The fusion module shrinks the gradient the fused loss sends back to each encoder, so even the
dominant modality ends up worse than when trained alone. DGL decouples the two: the gradient of
the fused loss is cut before the encoders (the fusion head still learns from it), and each
encoder learns from its own unimodal loss instead, whose gradient in turn never reaches the
fusion head. Pure functions: :func:`frozen_unimodal_logits`, :func:`absent_masked`;
:class:`DGL` wires them into a training step (one forward, one backward).
"""
from __future__ import annotations

from typing import Annotated, Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from ..models import MultimodalModel
from ..options import Interval
from . import register_method
from .base import Method, build_standard_model, masked_cross_entropy


def absent_masked(model: MultimodalModel, features: Mapping[str, Tensor],
                  present: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """``features`` as the model's fusion sees them: under the ``feature`` absent policy the
    features of absent samples are zero (what :meth:`MultimodalModel.fuse` does before its head);
    under ``input`` unchanged (the encoder already saw a zero input)."""
    feats = dict(features)
    if present and model.absent_policy == "feature":
        for m, p in present.items():
            if m in feats and not bool(p.all()):
                feats[m] = feats[m] * p.view(-1, 1).to(feats[m].dtype)
    return feats


def frozen_unimodal_logits(model: MultimodalModel, features: Mapping[str, Tensor],
                           present: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The fusion's unimodal logits ``z_m`` of ``features``, computed with the fusion's
    parameters *detached*: a loss on them sends gradient to the features (hence the encoders)
    and never to the fusion head. Same values as ``model.fuse(features, present)``."""
    fusion = model.fusion
    frozen = {n: p.detach() for n, p in fusion.named_parameters()}
    _, zm = functional_call(fusion, frozen, (absent_masked(model, features, present),), strict=False)
    return zm


@register_method("dgl", summary="DGL: encoders learn from unimodal losses only, the fusion head from the fused loss only",
                 paper='Wei et al., "Boosting Multimodal Learning via Disentangled Gradient Learning"',
                 venue="ICCV", year=2025, category="optimisation")
class DGL(Method):
    """Disentangled Gradient Learning (Wei, Luo, Luo, ICCV 2025; public code
    ``shicaiwei123/ICCV2025-GDL``, ``main_dgl.py`` and ``models/fusion_modules.py``).

    Per step, one encoder forward per modality, two evaluations of the fusion head, one
    backward:

    1. ``h_m`` = encoder outputs; fused logits ``z = fusion(sg(h))`` on *detached* features;
       ``L_fused = CE(z, y)`` — its gradient reaches the fusion head only.
    2. Unimodal logits ``z_m`` = the fusion's own unimodal rule on the live ``h_m`` with the
       fusion's parameters detached (:func:`frozen_unimodal_logits`); ``CE_m`` = mean of
       ``CE(z_m, y)`` over the samples where m is present — its gradient reaches encoder m only.
    3. ``L = L_fused + alpha * sum_m CE_m``; backward; engine clip; optimizer step.

    So the encoders learn from ``alpha * sum_m CE_m`` alone and the fusion head from ``CE(z)``
    alone — exactly the gradients of the public code's two backward passes (the unimodal loss
    with the fusion module's gradients then discarded, and the fused loss on detached
    features). Any number of modalities, any fusion. Inference: the fused logits z.

    Options:
        alpha: weight of the unimodal losses (4, the public code's CREMA-D value; its
            Kinetics-Sounds script uses 2-3). Only the encoders see it.

    Decisions:
        * Unimodal logits: the public code computes them with the fusion head itself, the other
          modality's feature set to zero. That is what the run's fusion does for ``film`` and
          ``gated`` (zero the others); for ``concat`` the model is built with
          ``unimodal_bias="full"`` (``W_m h_m + b``, the zero-the-others value) unless
          ``model.fusion_options`` sets ``unimodal_bias``; for ``gated`` with the public code's
          self-gating unimodal logits (``unimodal="self"``, its ``GatedFusion_DGL``) unless
          ``model.fusion_options`` sets ``unimodal``.
        * The public code clips the gradient norm at 40 after both backward passes: use
          ``--optim.grad_clip 40``. It selects its best epoch on the test loader, and that
          loader drops the last partial batch; here the checkpoint is selected on validation
          and every test sample is scored. It also steps its learning-rate schedule at the start
          of each epoch (one epoch early); the engine's schedule is used.
        * Missing modalities: ``CE_m`` leaves out samples without m (their z_m is only the
          absent-policy prediction); the count is summed over processes (one collective per
          step on every process, whatever its data), so several processes apply the update of
          one process on the global batch.

    Diagnostics per epoch: ``loss_fused``, ``loss_<m>`` (CE_m). Cost: ~1.0x joint training (one
    extra evaluation of the fusion head).
    """

    def __init__(self, alpha: Annotated[float, Interval(0, None)] = 4.0):
        super().__init__()
        self.alpha = float(alpha)

    def build_model(self, spec):
        if spec.fusion == "concat" and "unimodal_bias" not in spec.fusion_options:
            return build_standard_model(spec, unimodal_bias="full")
        if spec.fusion == "gated" and "unimodal" not in spec.fusion_options:
            return build_standard_model(spec, unimodal="self")
        return build_standard_model(spec)

    def losses(self, batch) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        """``(L, L_fused, {m: CE_m}, stats)`` for one batch; ``L.backward()`` gives DGL's
        gradients. ``stats`` (M + 1, 2): the global batch's sums of CE and sample counts per
        modality (present samples) and for the fused output (for the diagnostics)."""
        tr, model = self.trainer, self.model
        mods = model.modalities
        y = batch["label"]
        present = batch["present"]
        with tr.autocast():
            feats = model.encode_all(batch["inputs"], present)
            fused = model.fuse({m: f.detach() for m, f in feats.items()}, present)
            zm = frozen_unimodal_logits(model, feats, present)
        loss_fused = self.ce(fused.logits, y)
        with torch.no_grad():
            rows = []
            for m in mods:
                p = present[m].to(torch.float64)
                ce = torch.nn.functional.cross_entropy(zm[m].float(), y, reduction="none").double()
                rows.append(torch.stack([(ce * p).sum(), p.sum()]))
            rows.append(torch.stack([loss_fused.detach().double() * y.numel(),
                                     torch.full((), float(y.numel()), dtype=torch.float64, device=y.device)]))
            stats = tr.all_reduce_sum(torch.stack(rows))  # one collective per step, whatever the data
        uni = {m: masked_cross_entropy(zm[m], y, present[m], stats[i, 1], tr.world_size) for i, m in enumerate(mods)}
        loss = loss_fused + self.alpha * sum(uni.values())
        return loss, loss_fused, uni, stats

    def training_step(self, batch):
        loss, loss_fused, uni, stats = self.losses(batch)
        self.trainer.step(loss)
        means = stats[:, 0] / stats[:, 1].clamp(min=1)  # on the device: no host synchronisation
        for i, m in enumerate(self.model.modalities):
            self.log(f"loss_{m}", means[i], weight=stats[i, 1] > 0)
        self.log("loss_fused", means[-1])
        return {"loss": loss.detach(), "loss_fused": loss_fused.detach()}


__all__ = ["DGL", "absent_masked", "frozen_unimodal_logits"]
