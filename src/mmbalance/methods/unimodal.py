"""Unimodal training: one modality alone — the reference for how well it can be learned."""
from __future__ import annotations

from ..registry import ConfigError
from . import register_method
from .base import Method


@register_method("unimodal", summary="train one chosen modality alone (its encoder + a linear head)", category='baseline')
class Unimodal(Method):
    """Train ``modality``'s encoder with a linear head on CE; the other modalities are dropped
    from the model and the data, so the run's fused metrics are that modality's.

    Options:
        modality: the modality to train, by name or 0-based position (default: the dataset's first).
    """

    def __init__(self, modality: str | None = None):
        super().__init__()
        self.modality = modality

    def modalities(self, available):
        m = self.modality or available[0]
        if m not in available and str(m).isdigit() and int(m) < len(available):
            m = available[int(m)]  # by position: recipes that run on any dataset
        if m not in available:
            raise ConfigError(f"unimodal: unknown modality '{m}'; modalities: {', '.join(available)}")
        self.modality = m
        return [m]

    def build_model(self, spec):
        from .base import build_standard_model

        return build_standard_model(spec, fusion="concat")

    def training_step(self, batch):
        _, loss = self.fused_forward(batch)
        self.trainer.step(loss)
        return {"loss": loss.detach()}
