"""Fusion registry: concat, sum, late, shared_head, film, gated.

Every fusion maps ``{modality: features (B, d_m)}`` to fused logits ``(B, C)`` **and** unimodal
logits ``{modality: (B, C)}`` for every modality, because methods (ARL, OGM-GE, ...) and the
per-modality evaluation need them. The rule each fusion uses for its unimodal logits:

============  ==========================================  =============================================
fusion        fused logits z                              unimodal logits z_m
============  ==========================================  =============================================
concat        W [h_1; ...; h_M] + b                       W_m h_m + b/M  (``unimodal_bias="full"``: + b)
sum           sum_m (W_m h_m + b_m)                       W_m h_m + b_m
late          mean_m (W_m h_m + b_m)                      W_m h_m + b_m
shared_head   mean_m g(P_m h_m)  (``combine="sum"``)      g(P_m h_m); P_m projects to a common width
film          W_out [gamma_x(h_c) * h_x + beta_x(h_c)]_x  the fusion with every other modality's
gated         W_out [sigmoid(U_x h_c) * V_x h_x]_x        feature set to zero ("zero the others")
============  ==========================================  =============================================

film / gated with more than two modalities: one *conditioning* modality c (option
``condition``, default the first) modulates (film) or gates (gated) every other modality x;
the modulated vectors are concatenated before the output layer. With two modalities this is
exactly FiLM (Perez et al. 2018) and the gated fusion of Kiela et al. 2018 as used by OGM-GE.
Their unimodal logits use the *zero-the-others* rule by default: they pass through the same
parameters as the fused logits (so unimodal losses train the encoders, as ARL needs) at the
cost of M extra fusion-head evaluations (cheap: no encoder runs again). Caveat, measured: with
zero-the-others, gated's conditioning modality and film's modulated modality get nearly
constant unimodal logits (gate x bias, or bias-only scale), which stay near chance under
joint training; gated offers ``unimodal="self"`` (the ARL public code's self-gating) instead.
For film the per-modality *probe* accuracy is the meaningful per-modality measure.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..options import Annotated, Interval, Literal
from ..registry import ConfigError, Registry, check_options

FUSIONS: Registry[Callable[..., "Fusion"]] = Registry("fusion")
register_fusion = FUSIONS.register


def list_fusions() -> list[str]:
    return FUSIONS.names()


def create_fusion(name: str, feature_dims: dict[str, int], num_classes: int, **options: Any) -> "Fusion":
    cls = FUSIONS.get(name)
    options = check_options("fusion", name, cls, options, skip=("feature_dims", "num_classes"))
    return cls(feature_dims=dict(feature_dims), num_classes=num_classes, **options)


class Fusion(nn.Module):
    """Base class: ``forward(features) -> (fused_logits, {modality: unimodal_logits})``."""

    min_modalities = 1

    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__()
        if len(feature_dims) < self.min_modalities:
            raise ConfigError(f"fusion '{type(self).__name__}' needs at least {self.min_modalities} "
                              f"modalities, got {len(feature_dims)}")
        self.modalities = list(feature_dims)
        self.feature_dims = dict(feature_dims)
        self.num_classes = num_classes

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def _zero_others(self, features: dict[str, Tensor], keep: str) -> dict[str, Tensor]:
        return {m: (f if m == keep else torch.zeros_like(f)) for m, f in features.items()}


@register_fusion("concat", summary="concatenate features, one linear layer; z_m = W_m h_m + b/M")
class ConcatFusion(Fusion):
    """``z = W [h_1; ...; h_M] + b``; the unimodal logits are the blocks of W, ``W_m h_m`` plus a bias.

    Options:
        unimodal_bias: the bias of each z_m: ``share`` (default, b/M, so the z_m sum to z) or ``full`` (b).
    """

    def __init__(self, feature_dims: dict[str, int], num_classes: int,
                 unimodal_bias: Literal["share", "full"] = "share"):
        super().__init__(feature_dims, num_classes)
        self.unimodal_bias = unimodal_bias
        self.fc = nn.Linear(sum(feature_dims.values()), num_classes)
        starts, s = {}, 0
        for m, d in feature_dims.items():
            starts[m] = (s, s + d)
            s += d
        self.blocks = starts

    def forward(self, features):
        z = self.fc(torch.cat([features[m] for m in self.modalities], dim=1))
        bias = self.fc.bias / len(self.modalities) if self.unimodal_bias == "share" else self.fc.bias
        zm = {m: F.linear(features[m], self.fc.weight[:, a:b], bias) for m, (a, b) in self.blocks.items()}
        return z, zm


class _PerModalityHeads(Fusion):
    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})

    def unimodal(self, features):
        return {m: self.heads[m](features[m]) for m in self.modalities}


@register_fusion("sum", summary="one linear head per modality, logits summed")
class SumFusion(_PerModalityHeads):
    def forward(self, features):
        zm = self.unimodal(features)
        return torch.stack(list(zm.values())).sum(0), zm


@register_fusion("late", summary="late (decision) fusion: per-modality heads, logits averaged")
class LateFusion(_PerModalityHeads):
    def forward(self, features):
        zm = self.unimodal(features)
        return torch.stack(list(zm.values())).mean(0), zm


@register_fusion("shared_head", summary="one head shared by all modalities (MLA/MIE style), logits averaged")
class SharedHeadFusion(Fusion):
    """One linear head g shared by every modality.

    Encoders of unequal width are projected to ``common_dim`` (default: the largest width) by a
    per-modality linear map before the head; encoders of equal width are used as they are.

    Options:
        common_dim: input width of the shared head (default None = the largest encoder width).
        combine: fused logits as the ``mean`` (default) or the ``sum`` of the unimodal logits.
    """

    def __init__(self, feature_dims: dict[str, int], num_classes: int,
                 common_dim: Annotated[int, Interval(1, None)] | None = None,
                 combine: Literal["mean", "sum"] = "mean"):
        super().__init__(feature_dims, num_classes)
        dims = set(feature_dims.values())
        self.common_dim = common_dim or max(dims)
        self.proj = nn.ModuleDict({
            m: (nn.Identity() if d == self.common_dim else nn.Linear(d, self.common_dim))
            for m, d in feature_dims.items()})
        self.head = nn.Linear(self.common_dim, num_classes)
        self.combine = combine

    def head_input(self, m: str, h: Tensor) -> Tensor:
        return self.proj[m](h)

    def forward(self, features):
        zm = {m: self.head(self.head_input(m, features[m])) for m in self.modalities}
        stacked = torch.stack(list(zm.values()))
        return (stacked.mean(0) if self.combine == "mean" else stacked.sum(0)), zm


class _ConditionedFusion(Fusion):
    min_modalities = 2

    def __init__(self, feature_dims, num_classes, condition: str | None = None):
        super().__init__(feature_dims, num_classes)
        self.condition = condition or self.modalities[0]
        if self.condition not in feature_dims:
            raise ConfigError(f"condition '{self.condition}' is not a modality; modalities: "
                              f"{', '.join(self.modalities)}")
        self.targets = [m for m in self.modalities if m != self.condition]

    def fuse(self, features: dict[str, Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, features):
        z = self.fuse(features)
        zm = {m: self.fuse(self._zero_others(features, m)) for m in self.modalities}
        return z, zm


@register_fusion("film", summary="FiLM: one modality scales and shifts the others (Perez et al. 2018)")
class FiLMFusion(_ConditionedFusion):
    """``z = W_out [gamma_x(h_c) * h_x + beta_x(h_c)]_x``: the conditioning modality c scales and
    shifts every other modality x.

    Options:
        condition: the conditioning modality (default None = the first modality).
    """

    def __init__(self, feature_dims: dict[str, int], num_classes: int, condition: str | None = None):
        super().__init__(feature_dims, num_classes, condition)
        dc = feature_dims[self.condition]
        self.film = nn.ModuleDict({x: nn.Linear(dc, 2 * feature_dims[x]) for x in self.targets})
        self.out = nn.Linear(sum(feature_dims[x] for x in self.targets), num_classes)

    def fuse(self, features):
        hc = features[self.condition]
        parts = []
        for x in self.targets:
            gamma, beta = self.film[x](hc).chunk(2, dim=1)
            parts.append(gamma * features[x] + beta)
        return self.out(torch.cat(parts, dim=1))


@register_fusion("gated", summary="gated fusion: sigmoid gate from one modality on the others (Kiela et al. 2018)")
class GatedFusion(_ConditionedFusion):
    """``z = W_out [sigmoid(U_x h_c) * V_x h_x]_x + b``.

    Unimodal logits: ``zero_others`` (default, shared rule of film/gated) or ``self`` — the ARL
    public code's self-gating, ``z_c = W_out [sigmoid(U_x h_c) * U_x h_c]_x`` and
    ``z_x = W_out [.., sigmoid(V_x h_x) * V_x h_x, ..]`` (other blocks zero). Zeroing the others
    leaves the conditioning modality's logits a function of the gate only
    (``sigmoid(U h_c) * b_V``), which barely learns; self-gating gives each modality a real
    path to the output, at no extra parameters.

    Options:
        condition: the gating modality (default None = the first modality).
        hidden_dim: width of the gated vectors (default None = the gating modality's feature width).
        unimodal: the rule of the unimodal logits, ``zero_others`` (default) or ``self`` (self-gating).
    """

    def __init__(self, feature_dims: dict[str, int], num_classes: int, condition: str | None = None,
                 hidden_dim: Annotated[int, Interval(1, None)] | None = None,
                 unimodal: Literal["zero_others", "self"] = "zero_others"):
        super().__init__(feature_dims, num_classes, condition)
        dc = feature_dims[self.condition]
        hid = hidden_dim or dc
        self.hidden = hid
        self.unimodal = unimodal
        self.gate = nn.ModuleDict({x: nn.Linear(dc, hid) for x in self.targets})
        self.value = nn.ModuleDict({x: nn.Linear(feature_dims[x], hid) for x in self.targets})
        self.out = nn.Linear(hid * len(self.targets), num_classes)

    def fuse(self, features):
        hc = features[self.condition]
        parts = [torch.sigmoid(self.gate[x](hc)) * self.value[x](features[x]) for x in self.targets]
        return self.out(torch.cat(parts, dim=1))

    def forward(self, features):
        if self.unimodal == "zero_others":
            return super().forward(features)
        hc = features[self.condition]
        zm = {}
        parts = []
        for x in self.targets:
            u = self.gate[x](hc)
            parts.append(torch.sigmoid(u) * u)
        zm[self.condition] = self.out(torch.cat(parts, dim=1))
        for x in self.targets:
            v = self.value[x](features[x])
            blocks = [torch.sigmoid(v) * v if t == x else v.new_zeros(v.shape[0], self.hidden) for t in self.targets]
            zm[x] = self.out(torch.cat(blocks, dim=1))
        return self.fuse(features), zm
