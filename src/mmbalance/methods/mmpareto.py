"""MMPareto: Pareto integration of the multimodal and unimodal gradients of every encoder (Wei &
Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024).

Pure math: :func:`min_norm_weight` (the two-task MGDA weight), :func:`gram`,
:func:`mmpareto_coefficients` (direction and magnitude of the final encoder gradient) and
:func:`rescale_per_tensor` (the public code's per-tensor magnitude rule); the method class only
wires them into a training step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Sequence

import torch
from torch import Tensor

from ..options import Interval
from ..registry import ConfigError
from . import register_method
from .base import Method, ModelSpec, build_standard_model, masked_cross_entropy
from .gblending import BlendingHeads

GAMMA_SCOPES = ("conflict", "always")
RESCALES = ("encoder", "tensor")
GRADIENT_SPACES = ("parameters", "features")


def min_norm_weight(g11: Tensor | float, g12: Tensor | float, g22: Tensor | float) -> Tensor:
    """The weight ``a`` in [0, 1] of ``g1`` that minimises ``||a g1 + (1 - a) g2||^2`` (two-task
    MGDA, Sener & Koltun 2018), from the Gram entries ``g11 = g1.g1``, ``g12 = g1.g2``,
    ``g22 = g2.g2``: ``a = clip((g2 - g1).g2 / ||g1 - g2||^2, 0, 1)``. When ``g1 = g2`` every ``a``
    gives the same point and 1/2 is returned. Float64 scalar tensor on the entries' device
    (no host synchronisation).

    >>> round(float(min_norm_weight(1.0, -1.0, 4.0)), 6)   # g1 = (1, 0), g2 = (-1, sqrt(3)): a = 5/7
    0.714286
    """
    g11, g12, g22 = (torch.as_tensor(v, dtype=torch.float64) for v in (g11, g12, g22))
    denom = g11 + g22 - 2.0 * g12  # ||g1 - g2||^2
    degenerate = denom <= 1e-30 * (g11 + g22).clamp_min(1e-300)
    return torch.where(degenerate, 0.5, ((g22 - g12) / denom).clamp(0.0, 1.0))


def gram(g1: Sequence[Tensor | None], g2: Sequence[Tensor | None]) -> tuple[Tensor, Tensor, Tensor]:
    """``(g1.g1, g1.g2, g2.g2)`` in float64 of two gradients given as aligned lists of tensors
    (one per parameter; None = zero), i.e. of the concatenated flat vectors."""
    dev = next((t.device for t in (*g1, *g2) if t is not None), torch.device("cpu"))
    acc = torch.zeros(3, dtype=torch.float64, device=dev)
    for a, b in zip(g1, g2):
        a64 = a.detach().double() if a is not None else None
        b64 = b.detach().double() if b is not None else None
        if a64 is not None:
            acc[0] += (a64 * a64).sum()
        if b64 is not None:
            acc[2] += (b64 * b64).sum()
        if a64 is not None and b64 is not None:
            acc[1] += (a64 * b64).sum()
    return acc[0], acc[1], acc[2]


@dataclass
class Integration:
    """How one encoder's two gradients are combined: ``final = c_mm g_mm + c_uni g_uni``. Every
    field is a 0-d tensor (float64; ``conflict`` bool) on the Gram entries' device, so the
    rule never waits for the device."""

    c_mm: Tensor
    c_uni: Tensor
    cos: Tensor  # cosine of g_mm and g_uni (0 when either is zero)
    alpha: Tensor  # weight of g_mm in the direction 2(alpha g_mm + (1 - alpha) g_uni); 1/2 without conflict
    conflict: Tensor  # cos < 0
    gamma: Tensor  # the magnitude factor applied (gamma, or 1 where gamma_scope leaves it out)
    scale: Tensor  # ||final|| / ||g_mm + g_uni|| (0 when g_mm + g_uni = 0)


def mmpareto_coefficients(g11: Tensor | float, g12: Tensor | float, g22: Tensor | float, gamma: float = 1.5,
                          gamma_scope: str = "conflict") -> Integration:
    """MMPareto's rule for one encoder, from the Gram entries of its multimodal gradient ``g1``
    and unimodal gradient ``g2`` (whole-encoder vectors); entries of shape (M,) give the rule of
    M encoders at once (the fields of the result then have that shape).

    * No conflict (``cos(g1, g2) >= 0``): the sum ``g1 + g2`` (times ``gamma`` with
      ``gamma_scope="always"``, as the public code).
    * Conflict (``cos < 0``): direction ``h = 2 (a g1 + (1 - a) g2)`` with the MGDA weight
      ``a`` (:func:`min_norm_weight`), magnitude rescaled to ``gamma * ||g1 + g2||``:
      ``final = gamma * ||g1 + g2|| / ||h|| * h``.

    Both branches are evaluated on the device in float64 and the conflict selects one
    (``torch.where``): the same numbers as the branching rule, without reading the cosine on
    the host.

    >>> r = mmpareto_coefficients(1.0, -0.5, 4.0, gamma=1.5)   # conflict
    >>> bool(r.conflict), round(float(r.alpha), 4), round(float(r.scale), 4)
    (True, 0.75, 1.5)
    """
    if gamma_scope not in GAMMA_SCOPES:
        raise ConfigError(f"mmpareto: unknown gamma_scope '{gamma_scope}'; valid: {', '.join(GAMMA_SCOPES)}")
    g11, g12, g22 = (torch.as_tensor(v, dtype=torch.float64) for v in (g11, g12, g22))
    denom = torch.sqrt(g11.clamp_min(0.0) * g22.clamp_min(0.0))
    cos = torch.where(denom > 0.0, g12 / denom, 0.0)
    sum_norm = torch.sqrt((g11 + 2.0 * g12 + g22).clamp_min(0.0))
    conflict = cos < 0.0
    # conflict branch: MGDA direction, magnitude gamma * ||g1 + g2||
    a = min_norm_weight(g11, g12, g22)
    h_norm = 2.0 * torch.sqrt((a * a * g11 + 2.0 * a * (1.0 - a) * g12 + (1.0 - a) ** 2 * g22).clamp_min(0.0))
    s = torch.where(h_norm > 0.0, gamma * sum_norm / h_norm, 0.0)
    scale_conflict = torch.where((h_norm > 0.0) & (sum_norm > 0.0), gamma, 0.0)
    # no conflict: the sum (times gamma with gamma_scope "always")
    g = gamma if gamma_scope == "always" else 1.0
    return Integration(c_mm=torch.where(conflict, 2.0 * a * s, g), c_uni=torch.where(conflict, 2.0 * (1.0 - a) * s, g),
                       cos=cos, alpha=torch.where(conflict, a, 0.5), conflict=conflict,
                       gamma=torch.where(conflict, gamma, g),
                       scale=torch.where(conflict, scale_conflict, torch.where(sum_norm > 0.0, g, 0.0)))


def _combine(a: Tensor | None, b: Tensor | None, ca: float | Tensor, cb: float | Tensor) -> Tensor | None:
    """``ca * a + cb * b`` with None standing for a zero gradient (None when both are)."""
    if a is None:
        return None if b is None else cb * b
    return ca * a if b is None else ca * a + cb * b


@torch.no_grad()
def rescale_per_tensor(g1: Sequence[Tensor | None], g2: Sequence[Tensor | None], alpha: float | Tensor,
                       gamma: float | Tensor) -> list[Tensor | None]:
    """The public code's magnitude rule (``code/MMPareto.py``), tensor by tensor: with
    ``new_t = 2 (alpha g1_t + (1 - alpha) g2_t)`` and ``r_t = ||g1_t + g2_t|| / ||new_t||``, the
    tensor's gradient becomes ``gamma * max(1, r_t) * new_t`` (``r_t = 1`` when ``new_t = 0``).
    Without conflict (``alpha = 1/2``) this is ``gamma * (g1_t + g2_t)``. ``alpha`` and ``gamma``
    may be 0-d device tensors; the norms stay on the device."""
    pairs: list[tuple[Tensor, Tensor] | None] = []
    for a, b in zip(g1, g2):
        if a is None and b is None:
            pairs.append(None)
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        pairs.append((2.0 * (alpha * a + (1.0 - alpha) * b), a + b))
    live = [p for p in pairs if p is not None]
    if not live:
        return [None] * len(pairs)
    # every tensor's two norms at once (an elementwise division, as a Python one: no host sync)
    norms = torch.stack([torch.stack([new.double().norm(), ab.double().norm()]) for new, ab in live])
    r = torch.where(norms[:, 0] > 0.0, norms[:, 1] / norms[:, 0], 1.0)
    factors = iter((gamma * r.clamp_min(1.0)).unbind())
    return [None if p is None else p[0] * next(factors) for p in pairs]


@register_method("mmpareto", summary="MMPareto: per-encoder MGDA of multimodal vs unimodal gradients on conflict, "
                 "magnitude kept at gamma * ||g_mm + g_uni|| (Wei & Hu 2024)",
                 paper='Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance"',
                 venue="ICML", year=2024, category="optimisation")
class MMPareto(Method):
    """MMPareto (Wei & Hu, ICML 2024; public code ``GeWu-Lab/MMPareto_ICML2024``,
    ``code/MMPareto.py`` and ``code/min_norm_solvers.py``).

    Losses: the multimodal loss ``L_mm = CE(z, y)`` and one unimodal loss per modality
    ``L_m = CE(z_m, y)`` (mean over the samples where m is present). Per step, for every encoder
    m, with ``g_mm`` = gradient of ``L_mm`` and ``g_uni`` = gradient of ``L_m`` with respect to
    the encoder's parameters (whole-encoder vectors):

    1. ``cos(g_mm, g_uni) >= 0`` (no conflict): the encoder's gradient is ``g_mm + g_uni``.
    2. ``cos < 0`` (conflict): direction ``h = 2 (a g_mm + (1 - a) g_uni)`` with the two-task MGDA
       (min-norm) weight ``a = clip((g_uni - g_mm).g_uni / ||g_mm - g_uni||^2, 0, 1)``;
       magnitude ``gamma * ||g_mm + g_uni||``: the gradient is
       ``gamma * ||g_mm + g_uni|| / ||h|| * h``.
    3. Every other parameter (fused head, unimodal heads) gets its summed gradient; optimizer
       step (engine clipping applies).

    The rule needs each loss's gradient on the *encoder parameters* (the cosine and the MGDA
    weight are computed on those vectors), so the default costs two backward passes (``L_mm``,
    then ``sum_m L_m``: a unimodal loss reaches only its own encoder, so one pass gives every
    ``g_uni``) instead of the public code's four. ``gradient_space="features"`` is the cheap
    approximation (one backward, ~1.0x joint): the same rule on the gradients with respect to
    the encoder outputs ``h_m`` (the MGDA-UB bound of Sener & Koltun 2018), applied to the
    encoders by back-propagating the combined feature gradient.

    Options:
        gamma: magnitude factor of the final gradient (1.5, the public code's value, hard-coded
            for every dataset).
        gamma_scope: where gamma applies: ``conflict`` (conflicting steps only; without conflict
            the plain sum) or ``always`` (the public code: every encoder gradient times gamma).
        rescale: how the magnitude is restored: ``encoder`` (one factor for the whole encoder
            vector) or ``tensor`` (the
            public code: each parameter tensor rescaled to ``gamma * max(1, ||g_mm,t + g_uni,t|| /
            ||h_t||) * h_t``).
        gradient_space: which gradients the rule reads: ``parameters`` (exact: cosine and MGDA on the encoder-parameter
            gradients, two backward passes) or ``features`` (approximation on the gradients with
            respect to the encoder outputs, one backward pass).
        unimodal_heads: where z_m comes from: ``separate`` (one linear classifier per modality on its feature next to
            the run's fusion, as the public code's ``head_audio`` / ``head_video``) or
            ``fusion`` (the fusion's own unimodal logits, e.g. ``W_m h_m + b/M`` for concat).

    Decisions:
        * Conflict is ``cos < 0`` (the paper's negative cosine); the public code runs MGDA
          whenever ``cos <= 0`` (they differ only at exactly 0). Its solver clips the weight to
          [0.001, 0.999] in degenerate cases (a zero gradient); here ``a`` is the exact min-norm
          weight in [0, 1], 1/2 when the two gradients are equal.
        * BalanceBenchmark's version (``MMPareto_trainer.py``) accumulates gradients across its
          separate backward passes (its "multimodal" gradient is multimodal + unimodal) and
          assigns the MGDA result to a loop variable (the weights stay 0): neither is copied.
        * A modality absent from the whole global batch has ``g_uni = 0``: no conflict, its
          encoder gets ``g_mm``.
        * Several processes: the engine averages the gradients after each backward, so the
          cosine, the weight and the magnitude come from the global-batch gradients on every
          rank (parameters); with ``features`` the three Gram entries per modality are summed
          over processes (one all-reduce).

    Diagnostics per epoch: ``cos_<m>``, ``conflict_<m>`` (fraction of conflicting steps),
    ``alpha_<m>`` (weight of ``g_mm``, 1/2 without conflict), ``scale_<m>`` (``||final|| /
    ||g_mm + g_uni||``), ``loss_mm``, ``loss_<m>``. Cost: one forward and two backward passes
    per step (~1.6x joint); ``features``: ~1.0x.
    """

    def __init__(self, gamma: Annotated[float, Interval(0, None, closed="neither")] = 1.5,
                 gamma_scope: Literal["conflict", "always"] = "conflict",
                 rescale: Literal["encoder", "tensor"] = "encoder",
                 gradient_space: Literal["parameters", "features"] = "parameters",
                 unimodal_heads: Literal["separate", "fusion"] = "separate"):
        super().__init__()
        if gradient_space == "features" and rescale == "tensor":
            raise ConfigError("mmpareto: rescale 'tensor' needs gradient_space 'parameters' "
                              "(feature gradients have no parameter tensors)")
        self.gamma = float(gamma)
        self.gamma_scope = gamma_scope
        self.rescale = rescale
        self.gradient_space = gradient_space
        self.unimodal_heads = unimodal_heads

    def build_model(self, spec: ModelSpec):
        model = build_standard_model(spec)
        if self.unimodal_heads == "separate":
            model.fusion = BlendingHeads(model.fusion, spec.fusion)
        return model

    def setup(self, trainer):
        super().setup(trainer)
        self._encoder_params = {m: list(self.model.encoders[m].parameters()) for m in self.model.modalities}
        enc = {id(p) for ps in self._encoder_params.values() for p in ps}
        self._other_params = [p for p in self.model.parameters() if id(p) not in enc]

    # ------------------------------------------------------------------ training
    def losses(self, batch) -> tuple[object, Tensor, list[Tensor]]:
        """Forward; ``L_mm`` and the unimodal losses (means over the global batch's present
        samples: one all-reduce of the present counts)."""
        tr, mods = self.trainer, self.model.modalities
        y, present = batch["label"], batch["present"]
        with tr.autocast():
            out = self.model(batch["inputs"], present)
        counts = tr.all_reduce_sum(torch.stack([present[m].sum() for m in mods]).to(torch.float64))
        uni = [masked_cross_entropy(out.unimodal_logits[m], y, present[m], counts[i], tr.world_size)
               for i, m in enumerate(mods)]
        return out, self.ce(out.logits, y), uni

    def training_step(self, batch):
        tr, mods = self.trainer, self.model.modalities
        out, loss_mm, uni = self.losses(batch)
        loss_uni = torch.stack(uni).sum()
        if self.gradient_space == "parameters":
            r = self._integrate_parameters(loss_mm, loss_uni)
        else:
            r = self._integrate_features(out, loss_mm, loss_uni)
        tr.optimizer_step()
        for i, m in enumerate(mods):
            self.log(f"cos_{m}", r.cos[i])
            self.log(f"conflict_{m}", r.conflict[i])
            self.log(f"alpha_{m}", r.alpha[i])
            self.log(f"scale_{m}", r.scale[i])
        self.log("loss_mm", loss_mm)
        for m, l in zip(mods, uni):
            self.log(f"loss_{m}", l)
        return {"loss": (loss_mm + loss_uni).detach()}

    def _integrate_parameters(self, loss_mm: Tensor, loss_uni: Tensor) -> Integration:
        """Two backward passes (global gradients on every rank after the engine's averaging);
        each encoder's gradient replaced by MMPareto's combination, the rest summed. The rule
        runs once for all encoders on their (M,) Gram entries, on the device."""
        tr, model = self.trainer, self.model
        mods = model.modalities
        params = list(model.parameters())
        tr.zero_grad()
        tr.backward(loss_mm, retain_graph=True)
        g_mm = {id(p): p.grad.detach().clone() for p in params if p.grad is not None}
        tr.zero_grad()
        tr.backward(loss_uni)
        with torch.no_grad():
            g1 = {m: [g_mm.get(id(p)) for p in self._encoder_params[m]] for m in mods}
            g2 = {m: [p.grad for p in self._encoder_params[m]] for m in mods}
            G = torch.stack([torch.stack(gram(g1[m], g2[m])) for m in mods])  # (M, 3)
            r = mmpareto_coefficients(G[:, 0], G[:, 1], G[:, 2], gamma=self.gamma, gamma_scope=self.gamma_scope)
            sums = []
            for i, m in enumerate(mods):
                if self.rescale == "encoder":
                    new = [_combine(a, b, r.c_mm[i], r.c_uni[i]) for a, b in zip(g1[m], g2[m])]
                else:
                    new = rescale_per_tensor(g1[m], g2[m], r.alpha[i], r.gamma[i])
                    s1, _, s2 = gram([_combine(a, b, 1.0, 1.0) for a, b in zip(g1[m], g2[m])], new)
                    sums.append(torch.stack([s1, s2]))
                for p, g in zip(self._encoder_params[m], new):
                    p.grad = g
            if sums:  # ||final|| / ||g_mm + g_uni|| of the per-tensor rule
                s12 = torch.stack(sums)
                r.scale = torch.where(s12[:, 0] > 0, torch.sqrt(s12[:, 1] / s12[:, 0]), 0.0)
            for p in self._other_params:
                a = g_mm.get(id(p))
                if a is not None:
                    p.grad = a if p.grad is None else p.grad.add_(a)
        return r

    def _integrate_features(self, out, loss_mm: Tensor, loss_uni: Tensor) -> Integration:
        """The rule on the gradients with respect to the encoder outputs (head-only autograd.grad),
        then one backward of ``L_mm + sum_m L_m`` whose gradient into each encoder is replaced by
        the combination (the heads get their summed gradient)."""
        tr, mods = self.trainer, self.model.modalities
        feats = [out.features[m] for m in mods]
        d_mm = torch.autograd.grad(loss_mm, feats, retain_graph=True, allow_unused=True)
        d_uni = torch.autograd.grad(loss_uni, feats, retain_graph=True, allow_unused=True)
        d_mm = [torch.zeros_like(f) if d is None else d for f, d in zip(feats, d_mm)]
        d_uni = [torch.zeros_like(f) if d is None else d for f, d in zip(feats, d_uni)]
        local = torch.stack([torch.stack(gram([a], [b])) for a, b in zip(d_mm, d_uni)])  # (M, 3)
        g = tr.all_reduce_sum(local)  # sums over the global batch (a common scale cancels)
        r = mmpareto_coefficients(g[:, 0], g[:, 1], g[:, 2], gamma=self.gamma, gamma_scope=self.gamma_scope)
        for i, f in enumerate(feats):
            combined = (r.c_mm[i] * d_mm[i] + r.c_uni[i] * d_uni[i]).detach()
            f.register_hook(lambda _grad, c=combined: c)
        tr.zero_grad()
        tr.backward(loss_mm + loss_uni)
        return r


__all__ = ["Integration", "MMPareto", "gram", "min_norm_weight", "mmpareto_coefficients", "rescale_per_tensor"]
