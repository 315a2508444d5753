"""MMCosine: multi-modal cosine loss (Xu, Feng, Zhang, Hu, "MMCosine: Multi-Modal Cosine Loss
Towards Balanced Audio-Visual Fine-Grained Learning", ICASSP 2023).

Each modality's logits are cosines between its L2-normalised feature and its L2-normalised class
weights, times a scale s; the fused logits are their sum, trained with cross-entropy. No
modality can dominate the fused logits through the norm of its features or weights.
Pure math: :func:`cosine_logits`; :class:`CosineHeads` is the model head, :class:`MMCosine`
the method.
"""
from __future__ import annotations

import logging
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Fusion, MultimodalModel
from ..options import Interval
from ..registry import ConfigError
from . import register_method
from .base import Method, ModelSpec

log = logging.getLogger("mmbalance")


def cosine_logits(features: Tensor, weight: Tensor, scale: float, eps: float = 1e-12) -> Tensor:
    """``s * cos(h_b, w_c)``: (B, C) from features (B, d), class weights (C, d) and the scale s.

    Both the features (per sample) and the class weights (per class row) are L2-normalised; no
    bias. A zero feature gives zero logits.

    >>> h = torch.tensor([[3.0, 4.0]]); w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> cosine_logits(h, w, 10.0).tolist()
    [[6.0, 8.0]]
    """
    return scale * F.normalize(features, dim=1, eps=eps) @ F.normalize(weight, dim=1, eps=eps).t()


class CosineHeads(Fusion):
    """One bias-free class-weight matrix ``W_m`` (C x d_m) per modality:
    ``z_m = s * cos(h_m, W_m)`` (:func:`cosine_logits`), fused ``z = sum_m z_m``.

    Built by the ``mmcosine`` method only (not in the fusion registry). With two modalities this
    is the public code's cosine treatment of the concat head ``fc_out``: its weight split into the
    audio and visual column blocks, each block's class rows normalised separately, no bias.
    """

    name = "cosine"

    def __init__(self, feature_dims: dict[str, int], num_classes: int, scale: float = 10.0):
        super().__init__(feature_dims, num_classes)
        self.scale = float(scale)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes, bias=False) for m, d in feature_dims.items()})

    def forward(self, features):
        zm = {m: cosine_logits(features[m], self.heads[m].weight, self.scale) for m in self.modalities}
        return torch.stack(list(zm.values())).sum(0), zm


@register_method("mmcosine", summary="MMCosine: per-modality cosine logits (features and class weights L2-normalised, scale s), summed",
                 paper='Xu et al., "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained Learning"',
                 venue="ICASSP", year=2023, category="objective")
class MMCosine(Method):
    """Multi-Modal Cosine loss (Xu, Feng, Zhang, Hu, ICASSP 2023; public code
    ``GeWu-Lab/MMCosine_ICASSP23``, ``main_CD.py``).

    Model: the run's encoders and a cosine head (:class:`CosineHeads`): per modality a bias-free
    weight ``W_m`` (C x d_m); ``z_m = s * cos(h_m, W_m)`` — every feature ``h_m`` and every class
    row of ``W_m`` L2-normalised — and ``z = sum_m z_m`` (any number of modalities).
    Per step: ``L = CE(z, y)``, one backward, optimizer step. Inference: argmax z; the
    per-modality metrics use ``z_m``.

    Options:
        scale: the scale s multiplying every cosine (10, the public code's default and its
            README's CREMA-D command; each z_m lies in [-s, s]).

    Decisions:
        * The head replaces the run's fusion (``--fusion concat``, ``sum`` and ``late`` all give
          this head; the logits of ``concat`` with per-block normalisation equal those of
          per-modality heads). The public code also applies the rule to "mid-concat" variants of
          FiLM and gated fusion (the inputs of their last layer, one block per modality); here
          ``film`` and ``gated`` are ignored with a warning.
        * The supplementary NCE term of the public code (``--lam``, 0 by default) is not
          included.
        * Missing modalities: with ``model.absent_policy=feature`` an absent modality's feature
          is zero, so its cosine logits are zero and it adds nothing to z; with ``input`` its
          encoder sees a zero input (the shared policy).

    Diagnostics per epoch: ``cos_y_<m>`` (mean cosine between h_m and its true class's weight,
    over the samples where m is present, summed over processes), ``feature_norm_<m>`` (mean
    ``||h_m||`` before normalisation), ``weight_norm_<m>`` (mean norm of the class rows of W_m
    before normalisation: the quantity the paper shows growing for the dominant modality under
    plain training). Cost: ~1.0x joint training.
    """

    def __init__(self, scale: Annotated[float, Interval(0, None, closed="neither")] = 10.0):
        super().__init__()
        self.scale = float(scale)

    def build_model(self, spec: ModelSpec) -> MultimodalModel:
        if spec.fusion not in ("concat", "sum", "late"):
            log.warning("mmcosine uses its own cosine head (per-modality cosine logits, summed); "
                        "fusion '%s' is ignored", spec.fusion)
        encoders = spec.build_encoders()
        dims = {m: int(e.out_dim) for m, e in encoders.items()}
        return MultimodalModel(encoders, CosineHeads(dims, spec.num_classes, self.scale), spec.input_shapes,
                               spec.absent_policy)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if not isinstance(self.model.fusion, CosineHeads):
            raise ConfigError("mmcosine needs its own cosine head (build_model was replaced)")

    def training_step(self, batch):
        out, loss = self.fused_forward(batch)
        self._log_statistics(out, batch)  # the weights this forward used (before the step)
        self.trainer.step(loss)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def _log_statistics(self, out, batch) -> None:
        mods = self.model.modalities
        y = batch["label"]
        present = batch["present"]
        rows = []
        for m in mods:
            h = out.features[m].detach().float()
            w = self.model.fusion.heads[m].weight
            cos_y = cosine_logits(h, w.float(), 1.0).gather(1, y.view(-1, 1)).squeeze(1)
            p = present[m].to(torch.float64)
            rows.append(torch.stack([(cos_y.double() * p).sum(), (h.norm(dim=1).double() * p).sum(), p.sum()]))
        sums = self.trainer.all_reduce_sum(torch.stack(rows))  # one collective per step
        for i, m in enumerate(mods):  # device tensors (the mean over present samples when there are some)
            n = sums[i, 2]
            self.log(f"cos_y_{m}", sums[i, 0] / n, weight=n > 0)
            self.log(f"feature_norm_{m}", sums[i, 1] / n, weight=n > 0)
            self.log(f"weight_norm_{m}", self.model.fusion.heads[m].weight.detach().norm(dim=1).mean())


__all__ = ["CosineHeads", "MMCosine", "cosine_logits"]
