"""MultimodalModel: one encoder per modality plus a fusion.

``model(inputs, present) -> Output(logits, unimodal_logits, features)``.

Absent modalities (missing data, valuation subsets, AGM responses) follow ``absent_policy``:

* ``input`` — the modality's input is zeros; the encoder still runs (the valuation paper).
* ``feature`` — the modality's encoder feature is zeros (the official valuation code).

In eval mode the encoder output for a zero input is one constant vector per modality, so
:meth:`absent_feature` computes it once and :meth:`fuse_subset` substitutes it: valuation-style
computations cost extra *head* evaluations only, never extra encoder passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, get_args

import torch
from torch import Tensor, nn

from .fusions import Fusion

#: how an absent modality is represented (``model.absent_policy``)
AbsentPolicy = Literal["input", "feature"]
ABSENT_POLICIES: tuple[str, ...] = get_args(AbsentPolicy)


@dataclass
class Output:
    """Fused logits, unimodal logits per modality, and the encoder features they came from."""

    logits: Tensor
    unimodal_logits: dict[str, Tensor]
    features: dict[str, Tensor] = field(default_factory=dict)


class MultimodalModel(nn.Module):
    def __init__(self, encoders: Mapping[str, nn.Module], fusion: Fusion,
                 input_shapes: Mapping[str, tuple[int, ...]], absent_policy: AbsentPolicy = "input"):
        super().__init__()
        if absent_policy not in ABSENT_POLICIES:  # a direct call (model.absent_policy is checked with the config)
            raise ValueError(f"unknown absent_policy '{absent_policy}'; valid: {', '.join(ABSENT_POLICIES)}")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.input_shapes = {m: tuple(s) for m, s in input_shapes.items()}
        self.absent_policy = absent_policy

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders.keys())

    def feature_dim(self, m: str) -> int:
        return int(self.encoders[m].out_dim)

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, m: str, x: Tensor, present: Tensor | None = None) -> Tensor:
        """Encode one modality; with the ``input`` policy absent samples get a zero input (the
        mask is applied whatever it holds: times 1 leaves a present input exactly as it is, and
        the host never waits to read it)."""
        if present is not None and self.absent_policy == "input":
            x = x * present.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return self.encoders[m](x)

    def encode_all(self, inputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
                   ) -> dict[str, Tensor]:
        present = present or {}
        return {m: self.encode(m, inputs[m], present.get(m)) for m in self.modalities}

    # -- fusion -----------------------------------------------------------------------------
    def fuse(self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None) -> Output:
        """Fuse features; with the ``feature`` policy absent samples' features are zeroed."""
        feats = dict(features)
        if present and self.absent_policy == "feature":
            for m, p in present.items():
                if m in feats:
                    feats[m] = feats[m] * p.view(-1, 1).to(feats[m].dtype)
        z, zm = self.fusion(feats)
        return Output(z, zm, feats)

    def forward(self, inputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None) -> Output:
        return self.fuse(self.encode_all(inputs, present), present)

    # -- absent modalities at head-only cost --------------------------------------------------
    def absent_feature(self, m: str, reference: Tensor) -> Tensor:
        """The feature (1, d_m) that stands for modality ``m`` being absent.

        ``feature`` policy: zeros. ``input`` policy: the encoder's output for a zero input,
        computed in eval mode (BatchNorm running statistics, no dropout), so it is one constant
        vector; the encoder's train/eval mode is restored afterwards.
        """
        d = reference.shape[-1]
        if self.absent_policy == "feature":
            return reference.new_zeros(1, d)
        enc = self.encoders[m]
        was_training = enc.training
        enc.eval()
        try:
            w = next((p for p in enc.parameters() if p.is_floating_point()), None)  # the encoder's dtype
            x = torch.zeros((1, *self.input_shapes[m]), device=reference.device,
                            dtype=w.dtype if w is not None else torch.get_default_dtype())
            out = enc(x).to(reference.dtype)
        finally:
            enc.train(was_training)
        return out

    def absent_features(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.absent_feature(m, f) for m, f in features.items()}

    def fuse_subset(self, features: Mapping[str, Tensor], keep: Iterable[str],
                    absent: Mapping[str, Tensor] | None = None) -> Output:
        """Fused output with only the modalities in ``keep`` present (head-only cost).

        ``absent`` may hold precomputed :meth:`absent_features` to reuse across subsets.
        """
        keep = set(keep)
        absent = absent if absent is not None else self.absent_features(
            {m: f for m, f in features.items() if m not in keep})
        feats = {m: (f if m in keep else absent[m].expand_as(f)) for m, f in features.items()}
        z, zm = self.fusion(feats)
        return Output(z, zm, feats)
