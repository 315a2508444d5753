"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Pure math: :func:`ogm_scores`, :func:`ogm_coefficients`, :func:`ogm_modulate_`; the method
class only wires them into a training step.
"""
from __future__ import annotations

from typing import Iterable, Sequence, get_args

import torch
from torch import Tensor, nn

from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from . import register_method
from .base import Method

Scope = Literal["conv_linear_weights", "all"]
SCOPES: tuple[str, ...] = get_args(Scope)


def ogm_scores(unimodal_logits: Sequence[Tensor], labels: Tensor) -> Tensor:
    """s_m = sum over the batch of softmax(z_m)_{y_i} ; shape (M,), detached.

    >>> z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, -10.0]])]
    >>> ogm_scores(z, torch.tensor([0])).round(decimals=3).tolist()
    [0.5, 1.0]
    """
    with torch.no_grad():
        return torch.stack([z.float().softmax(1).gather(1, labels.view(-1, 1)).sum() for z in unimodal_logits])


def ogm_coefficients(scores: Tensor, alpha: float, ratio_offset: bool = False,
                     eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Modulation coefficients k (M,) and ratios rho (M,) from the scores s (M,).

    rho_m = s_m / mean_{n != m} s_n (for M = 2: s_v / s_a and its inverse).
    For every m with rho_m > 1: k_m = 1 - tanh(alpha * rho_m) (official code), or with
    ``ratio_offset`` k_m = 1 - tanh(alpha * (rho_m - 1)) (the smooth form); all others k = 1.

    >>> k, rho = ogm_coefficients(torch.tensor([2.0, 1.0]), alpha=0.8)
    >>> round(float(k[0]), 4), float(k[1]), rho.tolist()
    (0.0783, 1.0, [2.0, 0.5])
    """
    s = scores.detach().double()
    M = s.numel()
    if M < 2:
        raise ValueError("ogm_ge needs at least two modalities")
    others = (s.sum() - s) / (M - 1)
    rho = s / others.clamp_min(eps)
    arg = rho - 1.0 if ratio_offset else rho
    k = torch.where(rho > 1.0, 1.0 - torch.tanh(alpha * arg), torch.ones_like(rho))
    return k.float(), rho.float()


def select_parameters(module: nn.Module, scope: str) -> list[nn.Parameter]:
    """Parameters owned by ``module`` that OGM modulates.

    ``conv_linear_weights``: tensors with ``dim >= 2`` (conv and linear weights; biases and
    norm parameters excluded) — the official code scales 4-D conv weights, which for MLP
    encoders means their Linear weights. ``all``: every parameter.
    """
    if scope not in SCOPES:  # a direct call (the method's option is validated by the config layer)
        raise ValueError(f"ogm_ge: unknown scope '{scope}'; valid: {', '.join(SCOPES)}")
    return [p for p in module.parameters() if scope == "all" or p.dim() >= 2]


@torch.no_grad()
def ogm_modulate_(params: Iterable[nn.Parameter], k: float | Tensor, ge: bool = True,
                  generator: torch.Generator | None = None) -> None:
    """In place: g <- k * g (+ N(0, std(g)^2) noise per tensor with GE; std of the *original*
    gradient, plus 1e-8, as the official code). ``k`` may be a 0-d device tensor: nothing is
    read back to the host."""
    for p in params:
        g = p.grad
        if g is None:
            continue
        if ge:  # float64 sum with 1e-8, then float32: the value a Python float would give
            std = (g.float().std().double() + 1e-8).float() if g.numel() > 1 else torch.full((), 1e-8, device=g.device)
        g.mul_(k.to(g.dtype) if isinstance(k, Tensor) else k)
        if ge:
            noise = torch.randn(g.shape, generator=generator, device=g.device, dtype=torch.float32)
            g.addcmul_(noise.to(g.dtype), std.to(g.dtype))  # g + std * noise, as add_(alpha=std)


@register_method("ogm_ge", summary="OGM-GE: damp the dominant modality's encoder gradients + Gaussian noise (Peng 2022)",
                 paper='Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation"',
                 venue='CVPR', year=2022, category='optimisation')
class OGMGE(Method):
    """On-the-fly Gradient Modulation with Generalisation Enhancement (Peng et al. 2022).

    Rule (the coefficient is paper Eq. 10, as quoted in the official GeWu-Lab/OGM-GE_CVPR2022
    ``main.py``; the other details follow that file), per step:

    1. Forward; loss ``L = CE(z, y)`` (fused loss only); backward.
    2. Scores ``s_m = sum_i softmax(z_m)_{i, y_i}`` over the batch (all-reduced *sum*).
    3. ``rho_m = s_m / mean_{n != m} s_n``; for ``rho_m > 1``: ``k_m = 1 - tanh(alpha * rho_m)``
       (official; no "-1"), else ``k_m = 1``. For M = 2 this is the paper's rule; for M > 2 it is
       the ratio-to-the-others rule (BalanceBenchmark "OGM_GE3").
    4. For epochs in ``[modulation_start, modulation_end]`` (0-based, inclusive): the gradient
       of every selected parameter of ``model.encoders[m]`` (module ownership) becomes
       ``k_m * g`` and, with GE, ``+ N(0, std(g)^2)`` per tensor — on *every* modality's
       tensors, including those with ``k = 1`` (as the official code). The fusion head is
       never touched. Outside the window: plain joint training.

    Options:
        alpha: modulation strength (0.8, the CREMA-D value; 0.1 for VGGSound).
        ratio_offset: use ``1 - tanh(alpha * (rho - 1))`` (smooth at rho = 1) instead of the
            official ``1 - tanh(alpha * rho)`` (jumps from 1 to ``1 - tanh(alpha)`` at rho = 1).
        ge: add the Gaussian generalisation-enhancement noise (True = OGM-GE; False = OGM).
        modulation_start: first epoch of the modulation window (0-based, inclusive; default 0).
        modulation_end: last epoch of the window (inclusive; default 50).
        scope: ``conv_linear_weights`` (official: weights with dim >= 2 — conv kernels, and the
            Linear weights of MLP encoders) or ``all`` (every encoder parameter).

    Decisions: (i) at an exact tie (rho = 1) nobody is modulated — the official two-modality
    code damps the audio branch in that case (its ``else``). (ii) The GE noise is drawn from a
    generator seeded by ``(train.seed, global_step)``, so distributed replicas add identical
    noise and a resumed run replays it. (iii) Any fusion works (film/gated use their
    zero-the-others unimodal logits for the scores).

    Diagnostics: ``k_<m>`` (the applied coefficient, 1 outside the window), ``rho_<m>``,
    ``score_<m>`` (batch-mean true-class probability). Cost: ~1.0x joint training.
    """

    def __init__(self, alpha: Annotated[float, Interval(0, None)] = 0.8, ratio_offset: bool = False, ge: bool = True,
                 modulation_start: Annotated[int, Interval(0, None)] = 0,
                 modulation_end: Annotated[int, Interval(0, None)] = 50,
                 scope: Scope = "conv_linear_weights"):
        super().__init__()
        self.alpha = float(alpha)
        self.ratio_offset = bool(ratio_offset)
        self.ge = bool(ge)
        self.modulation_start = int(modulation_start)
        self.modulation_end = int(modulation_end)
        self.scope = scope

    def setup(self, trainer):
        super().setup(trainer)
        if len(self.model.modalities) < 2:
            raise ConfigError("ogm_ge needs at least two modalities")
        self._params = {m: select_parameters(self.model.encoders[m], self.scope) for m in self.model.modalities}

    def training_step(self, batch):
        tr = self.trainer
        mods = self.model.modalities
        out, loss = self.fused_forward(batch)
        y = batch["label"]
        n = tr.all_reduce_sum(torch.full((), float(y.numel()), device=y.device))
        scores = tr.all_reduce_sum(ogm_scores([out.unimodal_logits[m] for m in mods], y))
        k, rho = ogm_coefficients(scores, self.alpha, self.ratio_offset)  # device tensors: no host sync
        tr.zero_grad()
        tr.backward(loss)
        active = self.in_window(tr.epoch)
        if active:
            gen = torch.Generator(device=y.device)
            gen.manual_seed(int(tr.cfg.train.seed) * 1_000_003 + int(tr.global_step))
            for i, m in enumerate(mods):
                ogm_modulate_(self._params[m], k[i], self.ge, gen)
        tr.optimizer_step()
        for i, m in enumerate(mods):
            self.log(f"k_{m}", k[i] if active else 1.0)
            self.log(f"rho_{m}", rho[i])
            self.log(f"score_{m}", scores[i] / n)
        return {"loss": loss.detach()}
