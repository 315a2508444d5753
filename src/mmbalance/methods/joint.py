"""Joint training: cross-entropy of the fused logits, any fusion (the standard baseline)."""
from __future__ import annotations

from ..options import Annotated, Interval
from . import register_method
from .base import Method


@register_method("joint", summary="plain joint training of the fused loss CE(z, y), any fusion", category='baseline')
class Joint(Method):
    """Minimise CE(z, y) on the fused logits; unimodal logits are only evaluated.

    Options:
        unimodal_weight: add ``unimodal_weight * sum_m CE(z_m, y)`` (0 = plain joint training),
            each term the mean over the samples where modality m is present.
    """

    def __init__(self, unimodal_weight: Annotated[float, Interval(0, None)] = 0.0):
        super().__init__()
        self.unimodal_weight = float(unimodal_weight)

    def training_step(self, batch):
        out, loss = self.fused_forward(batch)
        y = batch["label"]
        if self.unimodal_weight:
            loss = loss + self.unimodal_weight * sum(self.present_ce(z, y, batch["present"][m])
                                                     for m, z in out.unimodal_logits.items())
        self.trainer.step(loss)
        return {"loss": loss.detach()}
