"""InfoReg: information acquisition regulation (Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation
for Balanced Multimodal Information Acquisition", CVPR 2025).

Early in training ("the prime learning window") information-rich modalities acquire information
fast and suppress the others. InfoReg detects the window from the change rate of each encoder's
Fisher-information trace and, inside it, pulls the dominant encoder back toward its weights at
the start of the epoch (a proximal term), so the other modalities can catch up.
Pure math: :func:`fisher_trace`, :func:`prime_window_rate`, :func:`inforeg_betas`,
:func:`proximal_pull_`; :class:`InfoReg` wires them into a training step.
"""
from __future__ import annotations

from typing import Annotated, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from ..options import Interval
from ..registry import ConfigError
from . import register_method
from .base import Method

TRACE_REDUCTIONS = ("sum", "layer_mean")


def fisher_trace(grads: Iterable[Tensor | None], reduction: str = "sum") -> Tensor:
    """Trace of the empirical Fisher information from gradients: ``sum_i g_i^2`` over every
    entry of every tensor (``sum``; the paper's definition), or ``sum_tensors mean(g^2)``
    (``layer_mean``; the public code, which averages each layer's squared gradients before
    summing the layers). A float64 scalar; None gradients count 0.

    >>> fisher_trace([torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]).item()
    14.0
    >>> fisher_trace([torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], "layer_mean").item()
    11.5
    """
    if reduction not in TRACE_REDUCTIONS:
        raise ConfigError(f"inforeg: unknown trace reduction '{reduction}'; valid: {', '.join(TRACE_REDUCTIONS)}")
    gs = [g.detach() for g in grads if g is not None]
    if not gs:
        return torch.zeros((), dtype=torch.float64)
    # one dot product per tensor (no float64 copy of the gradients; no host round trip)
    sq = [torch.dot(g.reshape(-1).float(), g.reshape(-1).float()).double() for g in gs]
    if reduction == "layer_mean":
        sq = [v / g.numel() for v, g in zip(sq, gs)]
    return torch.stack(sq).sum()


def prime_window_rate(history: Sequence[float], window: int = 10) -> float:
    """Relative change of the ``window``-epoch mean of the Fisher trace, from the traces of the
    epochs so far: ``(mean(h[-w:]) - mean(h[-w-1:-1])) / mean(h[-w:])`` with the history padded
    in front by ``w`` zeros (the public code's start); 1.0 before any epoch (epoch 0 lies in
    the window), 0.0 when the recent mean is not positive.

    >>> prime_window_rate([])
    1.0
    >>> prime_window_rate([5.0]), prime_window_rate([5.0, 5.0]), prime_window_rate([5.0] * 12)
    (1.0, 0.5, 0.0)
    """
    w = int(window)
    h = [0.0] * w + [float(x) for x in history]
    if not history:
        return 1.0
    recent = sum(h[-w:]) / w
    before = sum(h[-w - 1:-1]) / w
    if not recent > 0:
        return 0.0
    return (recent - before) / recent


def inforeg_betas(scores: Tensor, beta: float, in_window: Sequence[bool], counts: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Proximal coefficients ``beta_m`` (M,) and score gaps (M,), float32, computed on the
    scores' device (float64 arithmetic; no host synchronisation).

    ``gap_m = s_m - mean_{n != m} s_n``; a modality ahead of the others (``gap_m > 0``) and in its
    prime learning window gets ``beta_m = beta * exp(tanh(gap_m))``, every other modality 0. For two
    modalities this is the public code's ``beta * exp(tanh(s_a - s_v))`` when ``s_a > s_v``.

    ``counts`` (M,): how many samples each score sums over (missing modalities). Scores are then
    put on the scale of the fullest modality, ``s_m * max(n) / n_m``, and a modality with no
    sample takes no part (gap and beta 0); equal counts give the plain rule.

    >>> b, gap = inforeg_betas(torch.tensor([3.0, 2.0]), 0.95, [True, True])
    >>> round(float(b[0]), 4), float(b[1]), gap.tolist()
    (2.0346, 0.0, [1.0, -1.0])
    """
    s = scores.detach().reshape(-1).double()
    M = s.numel()
    if M < 2:
        raise ConfigError("inforeg needs at least two modalities")
    if counts is not None:
        n = counts.detach().reshape(-1).to(s)
        on = n > 0
        s = torch.where(on, s * n.max() / n, 0.0)
    else:
        on = torch.ones(M, dtype=torch.bool, device=s.device)
    k = on.sum().to(s.dtype)
    total = s[0]
    for i in range(1, M):  # left to right, as a Python sum (absent modalities add an exact 0)
        total = total + s[i]
    gap = torch.where(on & (k >= 2), s - (total - s) / (k - 1.0), 0.0)
    b = torch.where(gap > 0, float(beta) * torch.exp(torch.tanh(gap)), 0.0)
    b = torch.stack([bi if bool(w) else torch.zeros_like(bi) for bi, w in zip(b.unbind(), in_window)])
    return b.float(), gap.float()


@torch.no_grad()
def proximal_pull_(params: Sequence[nn.Parameter], anchors: Sequence[Tensor], beta: float | Tensor) -> None:
    """In place: ``grad <- grad + beta * (theta - theta_anchor)`` for every parameter with a
    gradient (the gradient of ``beta/2 * ||theta - theta_anchor||^2``). ``beta`` may be a 0-d
    device tensor (0 leaves the gradients exactly unchanged)."""
    pairs = [(p, a) for p, a in zip(params, anchors) if p.grad is not None]
    if not pairs:
        return
    grads = [p.grad for p, _ in pairs]
    diffs = torch._foreach_sub([p.detach() for p, _ in pairs], [a.to(p.dtype) for p, a in pairs])
    if isinstance(beta, Tensor):  # g + beta * diff with one rounding, as add_(alpha=beta)
        torch._foreach_addcmul_(grads, diffs, [beta.to(g.device, g.dtype) for g in grads])
    else:
        torch._foreach_add_(grads, diffs, alpha=float(beta))


def trace_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters whose squared gradients make an encoder's Fisher trace: conv and linear
    weights (tensors with ``dim >= 2``), as the public code (``Conv2d``/``Linear`` weights)."""
    return [p for p in module.parameters() if p.dim() >= 2]


@register_method("inforeg", summary="InfoReg: proximal pull on the dominant encoder in its Fisher-trace prime learning window",
                 paper='Huang, Wei, Yang, Hu, "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition"',
                 venue='CVPR', year=2025, category='optimisation')
class InfoReg(Method):
    """Information Acquisition Regulation (Huang et al., CVPR 2025; public code
    ``GeWu-Lab/InfoReg_CVPR2025``, ``main.py``).

    Per epoch (at its start): for every modality m, the change rate ``k_m`` of the ``window``-epoch
    mean of its encoder's Fisher trace (:func:`prime_window_rate`; traces of the epochs so far);
    m is in its prime learning window when ``k_m > threshold``. The encoder weights at the start
    of the epoch are kept as the anchor ``theta_m^0``.

    Per step:

    1. One forward; ``L = CE(z, y)`` (+ ``unimodal_weight * sum_m CE(z_m, y)``, over the samples
       where m is present); backward (gradients averaged over processes).
    2. Scores ``s_m = sum_b softmax(z_m)_{b, y_b}`` over the batch's present samples, summed over
       processes; ``beta_m = beta * exp(tanh(s_m - mean_{n != m} s_n))`` for a modality ahead of
       the others and in its window, else 0 (:func:`inforeg_betas`).
    3. The Fisher trace of the step, ``sum g^2`` over the conv/linear weights of each encoder
       (:func:`fisher_trace`, from the loss gradient), is added to the epoch's trace.
    4. Proximal pull: for every parameter of encoder m, ``g <- g + beta_m (theta - theta_m^0)``
       (:func:`proximal_pull_`); the fusion head is never touched. Optimizer step.

    Any modality can be regulated, and any number of modalities. Inference: the fused logits.

    Options:
        beta: base strength of the proximal pull (0.95: the public code's value for audio; its
            branch for the visual modality, with 0.1, can never run).
        threshold: the prime-learning-window threshold K on the change rate of the trace (0.04).
        window: epochs in each of the two means whose relative change is the rate (10).
        unimodal_weight: weight of the unimodal CE terms (0 = one multimodal loss, the paper's
            main table; 1 = the public code, which back-propagates CE(z) + CE(z_a) + CE(z_v)).
        trace_reduction: ``sum`` (``sum g^2`` over every weight entry, the paper's trace) or
            ``layer_mean`` (the public code: each layer's mean of ``g^2``, summed over layers).
        window_modality: null = each modality's window from its own trace; a modality name =
            every modality uses that one's trace (the public code decides from the audio trace).

    Decisions:
        * The public code can only ever regulate audio (its visual branch repeats the audio
          condition), runs six backward passes per step (three retained, for logging), matches
          parameters with an O(P^2) Python loop, and keeps the Fisher matrices of every layer in
          memory. Here any modality is regulated and a step is one forward and one backward, plus
          a squared-gradient sum and an in-place add per encoder tensor (~1.1x joint).
        * The trace is the squared *mini-batch* gradient (as the public code), summed over the
          epoch's steps, not per-sample gradients; it is taken before the proximal term is added
          (the public code accumulates after adding it), so it measures what the data teaches.
          With several processes it is computed from the averaged gradient, the same on every
          process.
        * For more than two modalities ``gap_m = s_m - mean_{n != m} s_n`` (the two-modality
          difference otherwise), so every modality ahead of the others' mean may be regulated.
        * Scores are batch *sums* as in the code (with batch 64 the ``tanh`` of a sum difference
          is close to 1 once one modality leads). With missing modalities s_m sums over the
          samples where m is present and is rescaled to the fullest modality's count
          (``s_m max(n) / n_m``), so an often-missing modality does not look weak for it.
        * Unimodal logits come from the model's fusion (for ``concat``: ``W_m h_m + b/M``); the
          public code has separate unimodal heads.

    Diagnostics per epoch: ``trace_<m>`` (the epoch's Fisher trace), ``rate_<m>`` (change rate at
    the epoch start), ``window_<m>`` (1 in the prime learning window), ``beta_<m>`` (mean applied
    coefficient over steps), ``score_<m>`` (mean true-class probability).
    """

    def __init__(self, beta: Annotated[float, Interval(0, None)] = 0.95,
                 threshold: float = 0.04,
                 window: Annotated[int, Interval(1, None)] = 10,
                 unimodal_weight: Annotated[float, Interval(0, None)] = 0.0,
                 trace_reduction: Literal["sum", "layer_mean"] = "sum",
                 window_modality: str | None = None):
        super().__init__()
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.window = int(window)
        self.unimodal_weight = float(unimodal_weight)
        self.trace_reduction = trace_reduction
        self.window_modality = window_modality
        self.history: dict[str, list[float]] = {}
        self._trace: dict[str, Tensor | None] = {}
        self._anchors: dict[str, list[Tensor]] = {}
        self._in_window: dict[str, bool] = {}

    def setup(self, trainer):
        super().setup(trainer)
        mods = self.model.modalities
        if len(mods) < 2:
            raise ConfigError("inforeg needs at least two modalities")
        if self.window_modality is not None and self.window_modality not in mods:
            raise ConfigError(f"inforeg: window_modality '{self.window_modality}' is not a modality; "
                              f"modalities: {', '.join(mods)}")
        self._params = {m: list(self.model.encoders[m].parameters()) for m in mods}
        self._trace_params = {m: trace_parameters(self.model.encoders[m]) for m in mods}
        for m in mods:
            self.history.setdefault(m, [])

    # -- per epoch -------------------------------------------------------------------------
    def window_rates(self) -> dict[str, float]:
        """``k_m`` for the coming epoch, from the traces of the epochs so far."""
        return {m: prime_window_rate(self.history.get(m, []), self.window) for m in self.model.modalities}

    def on_epoch_start(self, epoch):
        mods = self.model.modalities
        rates = self.window_rates()
        source = {m: (self.window_modality or m) for m in mods}
        self._in_window = {m: rates[source[m]] > self.threshold for m in mods}
        # the anchor theta^0: encoder weights at the start of the epoch (only where a pull may act)
        self._anchors = {m: [p.detach().clone() for p in self._params[m]] for m in mods if self._in_window[m]}
        self._trace = {}
        for m in mods:
            self.log(f"rate_{m}", rates[m])
            self.log(f"window_{m}", float(self._in_window[m]))

    def on_epoch_end(self, epoch):
        for m in self.model.modalities:
            t = self._trace.get(m)
            value = 0.0 if t is None else float(t)
            self.history.setdefault(m, []).append(value)
            self.log(f"trace_{m}", value)
        self._anchors = {}

    # -- per step ----------------------------------------------------------------------------
    def training_step(self, batch):
        tr, model = self.trainer, self.model
        mods = model.modalities
        y = batch["label"]
        present = batch["present"]
        with tr.autocast():
            out = model(batch["inputs"], present)
        loss = self.ce(out.logits, y)
        if self.unimodal_weight > 0:
            loss = loss + self.unimodal_weight * sum(
                self.present_ce(out.unimodal_logits[m], y, present[m]) for m in mods)
        stats = torch.stack([torch.stack([
            out.unimodal_logits[m].detach().double().softmax(1).gather(1, y.view(-1, 1)).squeeze(1)
            .mul(present[m].double()).sum(), present[m].sum().double()]) for m in mods])
        stats = tr.all_reduce_sum(stats)  # one collective per step, on every process
        scores, counts = stats[:, 0], stats[:, 1]
        if not self._in_window:  # a step before any epoch start (a direct call): start the epoch
            self.on_epoch_start(tr.epoch)
        betas, _ = inforeg_betas(scores, self.beta, [self._in_window[m] for m in mods], counts)
        tr.zero_grad()
        tr.backward(loss)
        for i, m in enumerate(mods):
            t = fisher_trace([p.grad for p in self._trace_params[m]], self.trace_reduction)
            prev = self._trace.get(m)
            self._trace[m] = t if prev is None else prev.to(t.device) + t
            if self._in_window[m]:  # beta_m (a device tensor) may be 0 here: an exact no-op
                proximal_pull_(self._params[m], self._anchors[m], betas[i])
            self.log(f"beta_{m}", betas[i])
            self.log(f"score_{m}", scores[i] / counts[i], weight=counts[i] > 0)
        tr.optimizer_step()
        return {"loss": loss.detach()}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self):
        return {"history": {m: list(h) for m, h in self.history.items()}}

    def load_state_dict(self, state):
        self.history = {m: [float(x) for x in h] for m, h in state.get("history", {}).items()}


__all__ = ["InfoReg", "fisher_trace", "inforeg_betas", "prime_window_rate", "proximal_pull_", "trace_parameters"]
