"""AGM: adaptive gradient modulation (Li et al., ICCV 2023).

Pure math: :func:`agm_subset_logits`, :func:`agm_responses`, :func:`agm_scores`,
:func:`agm_ratios`, :func:`agm_coefficients`, :func:`running_mean_update`, :func:`agm_output`,
:func:`clip_grad_norm_where_`; the method class wires them into a training step (no host
synchronisation: coefficients, the conditional clip and the diagnostics stay on the device).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from ..evaluation.shapley import shapley_values, subset_members
from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from ._grad import scale_grad
from . import register_method
from .base import Method


def agm_subset_logits(model, features: Mapping[str, Tensor], absent: Mapping[str, Tensor] | None = None,
                      include_empty: bool = True, full: Tensor | None = None) -> Tensor:
    """Fused logits f(S) of every modality subset S (bit masks 0 .. 2^M - 1, bit i = the model's
    i-th modality present): shape (2^M, B, C), at head-only cost — the encoders' features are
    reused and an absent modality's feature is ``model.absent_features`` (policy ``input``: the
    encoder's output for a zero input in eval mode; ``feature``: zeros).

    ``include_empty=False`` leaves f(empty) as zeros (not evaluated); ``full`` may pass f(all)
    when it is already computed.
    """
    mods = model.modalities
    M = len(mods)
    absent = absent if absent is not None else model.absent_features(features)
    out = []
    for S in range(2**M):
        if S == 2**M - 1 and full is not None:
            out.append(full)
            continue
        keep = [mods[i] for i in subset_members(S, M)]
        z = model.fuse_subset(features, keep, absent).logits
        out.append(torch.zeros_like(z) if (S == 0 and not include_empty) else z)
    return torch.stack(out)


def agm_responses(subset_logits: Tensor, include_empty: bool = False) -> Tensor:
    """Mono-modal responses m_i (M, B, C): exact Shapley values of the logit-valued game S -> f(S).

    ``include_empty=False`` (official) sets v(empty) = 0 instead of f(empty): for M = 2,
    m_a = 1/2 [f(a,v) - f(0,v) + f(a,0)] (official ``GradMod``), for M = 3 the weights
    1/3, 1/6, 1/6, 1/3 of the MOSEI code. By efficiency the responses then sum to f(all)
    exactly; with ``include_empty=True`` they sum to f(all) - f(empty).
    """
    values = subset_logits
    if not include_empty:
        values = torch.cat([torch.zeros_like(values[:1]), values[1:]])
    return shapley_values(values)


def agm_scores(responses: Tensor, labels: Tensor, floor: float = 1e-8) -> Tensor:
    """s_m = mean_i -log(max(softmax(m_m)_{i, y_i}, 1e-8)): shape (M,), detached."""
    with torch.no_grad():
        p = responses.float().softmax(-1)
        py = p.gather(-1, labels.view(1, -1, 1).expand(p.shape[0], -1, 1)).squeeze(-1)
        return -torch.log(py.clamp_min(floor)).mean(-1)


def agm_ratios(scores: Tensor) -> Tensor:
    """r_m = exp(M / (M - 1) * (mean_k s_k - s_m)) — the official sign (MOSEI code; for M = 2,
    r_a = exp(s_v - s_a)): the modality with the *lower* loss score has r > 1."""
    M = scores.numel()
    if M < 2:
        raise ValueError("agm needs at least two modalities")
    return torch.exp(M / (M - 1) * (scores.mean() - scores))


def agm_coefficients(r: Tensor, r_ref: Tensor, alpha: float, cap: float = 10.0) -> Tensor:
    """k_m = exp(alpha * min(rbar_m - r_m, cap)): a modality whose instant ratio is above its
    running reference is damped (k < 1), one below it is boosted (k > 1)."""
    return torch.exp(alpha * torch.clamp(r_ref - r, max=cap))


def running_mean_update(mean: Tensor, value: Tensor, t: int) -> Tensor:
    """Running mean over all iterations: S_t = S_{t-1} (t - 1) / t + s_t / t (t >= 1)."""
    return mean * (t - 1) / t + value / t


def agm_output(responses: Tensor, k: Sequence[float] | Tensor, empty: Tensor | None = None) -> Tensor:
    """Training logits sum_m scale_grad(m_m, k_m) (+ f(empty), unscaled, when the responses
    were computed with it), so the value is f(all) and the gradient through m_m is scaled by k_m."""
    z = sum(scale_grad(responses[i], k[i]) for i in range(responses.shape[0]))
    return z if empty is None else z + empty


@torch.no_grad()
def clip_grad_norm_where_(parameters, max_norm: float, condition: Tensor) -> None:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` where the 0-d bool tensor
    ``condition`` is True, nothing where it is False, without reading it on the host: the clip
    factor ``min(1, max_norm / (norm + 1e-6))`` becomes 1 (an exact no-op) when the condition
    is False. Same arithmetic as ``clip_grad_norm_``."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    grads = [p.grad for p in params]
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:  # torch >= 2.6: the pieces clip_grad_norm_ is made of
        total = get_total_norm(grads)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.where(condition.to(total.device), total, 0.0))
        return
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = torch.where(condition.to(total.device), torch.clamp(max_norm / (total + 1e-6), max=1.0), 1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))


@register_method("agm", summary="AGM: Shapley mono-modal responses, gradient scaled toward a running reference (Li 2023)",
                 paper='Li et al., "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation"',
                 venue='ICCV', year=2023, category='optimisation')
class AGM(Method):
    """Adaptive Gradient Modulation (Li et al. 2023; official ``GradMod`` / ``CREMAD_main.py``).

    Rule, per step:

    1. Encoder features once (train mode); fused logits f(S) of every subset S of modalities via
       ``model.fuse_subset`` with the absent features of ``model.absent_features`` (head-only
       cost: 2^M head evaluations). Mono-modal responses m_m = exact Shapley values of S -> f(S)
       (:func:`agm_responses`); default ``include_empty=False`` (official: f(empty) dropped,
       v(empty) = 0), so sum_m m_m = f(all) exactly. With ``include_empty=True`` the responses
       are the exact Shapley values (sum f(all) - f(empty)) and the training output adds
       f(empty) back, unscaled.
    2. Scores s_m = mean_i -log(max(softmax(m_m)_{y_i}, 1e-8)) (all-reduced mean).
    3. r_m = exp(M/(M-1) (mean_k s_k - s_m)) (official sign; BalanceBenchmark inverts it);
       rbar_m the same formula on S_m, the running mean of s_m over *all* iterations so far
       (never reset; 0 before the first step); k_m = exp(alpha * min(rbar_m - r_m, 10)); then S
       is updated with this step's s.
    4. In the window [modulation_start, modulation_end] the gradient through m_m is multiplied
       by k_m (``scale_grad``; identity in forward); L = CE(sum_m m_m, y). Outside: k = 1 (or, after
       the window with ``hold_after_window``, the last in-window k).
    5. If any element of a fusion-head weight gradient (fusion parameters with dim >= 2) lies
       outside [-1, 1], clip the total gradient norm of the model to ``fusion_grad_clip`` (1.0,
       official; None = off). Then the engine's own ``optim.grad_clip`` (if set) and the step.

    Inference: f(all) (the model's ordinary forward; per-modality metrics use the fusion's z_m).

    Options:
        alpha: modulation strength (1.0, the official CLI default; a tunable, 0.1-2.5 in use).
        include_empty: keep f(empty) in the Shapley responses (False = official).
        modulation_start: first epoch of the modulation window (inclusive, counted from ``epoch_origin``).
        modulation_end: last epoch of the window (inclusive); ``None`` = until the end of training
            (the official CLI window 0-20 with 10 epochs and BalanceBenchmark's 0-80 with 30 both
            cover the whole run).
        epoch_origin: the number the window gives the first epoch: 0 (default, the toolkit's
            0-based epochs, as every other method's window) or 1 (the official code,
            lihong2303/AGM_ICCV2023 ``run/CREMAD_main.py``, counts epochs from 1 and tests
            ``modulation_starts <= epoch <= modulation_ends``, so its window "0-20" modulates the
            first 20 epochs, 0-based 0-19).
        hold_after_window: after the window, keep applying the last in-window coefficients
            (official: the backward hooks keep the last ``update_scale`` value) instead of
            k = 1 (default; a window that ends turns the modulation off). Before the window
            k = 1 either way (the official scales start at 1).
        fusion_grad_clip: the conditional clip norm (1.0, official) or None (off).

    Departure from the official code (by design): the subset logits reuse the train-mode
    features of the present modalities (the official padded passes re-run the encoders in eval
    mode, so dropout/BN differ between f(a,v) and f(a,0)); only the absent modality's constant
    feature comes from an eval-mode pass, which leaves BatchNorm statistics and the train mode
    untouched.

    Diagnostics: ``k_<m>``, ``r_<m>``, ``rbar_<m>``, ``s_<m>``. Cost: one encoder pass plus 2^M - 1
    extra head evaluations per step (the official code: 4 full forwards, ~2.5-3x).
    """

    def __init__(self, alpha: Annotated[float, Interval(0, None)] = 1.0, include_empty: bool = False,
                 modulation_start: Annotated[int, Interval(0, None)] = 0,
                 modulation_end: Annotated[int, Interval(0, None)] | None = None,
                 epoch_origin: Literal[0, 1] = 0, hold_after_window: bool = False,
                 fusion_grad_clip: Annotated[float, Interval(0, None, closed="neither")] | None = 1.0):
        super().__init__()
        self.alpha = float(alpha)
        self.include_empty = bool(include_empty)
        self.modulation_start = int(modulation_start)
        self.modulation_end = None if modulation_end is None else int(modulation_end)
        self.epoch_origin = int(epoch_origin)
        self.hold_after_window = bool(hold_after_window)
        self.fusion_grad_clip = None if fusion_grad_clip is None else float(fusion_grad_clip)
        self.score_mean: Tensor | None = None  # S_m, running mean over all iterations
        self.last_k: Tensor | None = None  # the last in-window coefficients (hold_after_window)
        self.iteration = 0

    def in_window(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` is modulated, counting the window from ``epoch_origin``."""
        return super().in_window(epoch + self.epoch_origin)

    def setup(self, trainer):
        super().setup(trainer)
        M = len(self.model.modalities)
        if M < 2:
            raise ConfigError("agm needs at least two modalities")
        if self.score_mean is None:
            self.score_mean = torch.zeros(M, device=trainer.device)

    def _clip_if_large_fusion_grad(self) -> None:
        if self.fusion_grad_clip is None:
            return
        big = [(p.grad.abs() > 1.0).any() for p in self.model.fusion.parameters()
               if p.dim() >= 2 and p.grad is not None]
        big = torch.stack(big).any() if big else torch.zeros((), dtype=torch.bool, device=self.trainer.device)
        clip_grad_norm_where_(self.model.parameters(), self.fusion_grad_clip, big)
        self.log("clipped", big)

    def training_step(self, batch):
        tr = self.trainer
        mods = self.model.modalities
        y = batch["label"]
        with tr.autocast():
            out = self.model(batch["inputs"], batch["present"])
            subset = agm_subset_logits(self.model, out.features, include_empty=self.include_empty,
                                       full=out.logits)
        subset = subset.float()
        responses = agm_responses(subset, self.include_empty)
        s = tr.all_reduce_mean(agm_scores(responses, y))
        r = agm_ratios(s)
        r_ref = agm_ratios(self.score_mean)
        k = agm_coefficients(r, r_ref, self.alpha)
        self.iteration += 1
        self.score_mean = running_mean_update(self.score_mean, s, self.iteration)
        active = self.in_window(tr.epoch)
        if active:
            self.last_k = k.detach().clone()
        held = self.hold_after_window and self.last_k is not None
        k_used = k if active else (self.last_k.to(k) if held else torch.ones_like(k))
        z = agm_output(responses, k_used, subset[0] if self.include_empty else None)
        loss = self.ce(z, y)
        tr.zero_grad()
        tr.backward(loss)
        self._clip_if_large_fusion_grad()
        tr.optimizer_step()
        for i, m in enumerate(mods):
            self.log(f"k_{m}", k_used[i])
            self.log(f"r_{m}", r[i])
            self.log(f"rbar_{m}", r_ref[i])
            self.log(f"s_{m}", s[i])
        return {"loss": loss.detach()}

    def state_dict(self):
        def cpu(t):
            return None if t is None else t.detach().cpu().clone()

        return {"score_mean": cpu(self.score_mean), "iteration": self.iteration, "last_k": cpu(self.last_k)}

    def load_state_dict(self, state):
        dev = self.trainer.device if self.trainer is not None else "cpu"
        if state.get("score_mean") is not None:
            self.score_mean = state["score_mean"].to(dev)
        if state.get("last_k") is not None:
            self.last_k = state["last_k"].to(dev)
        self.iteration = int(state.get("iteration", self.iteration))
