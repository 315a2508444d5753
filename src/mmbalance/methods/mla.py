"""MLA: multimodal learning with alternating unimodal adaptation (Zhang, Yoon, Bansal, Yao,
CVPR 2024).

Each iteration trains one modality through its own encoder and a **shared head** g; the head's
weight gradient is projected with one orthogonal-weight-modification matrix P so that learning
the current modality does not overwrite what the head learned from the others; at test time
the unimodal predictions are fused per sample with entropy weights. The math is in the pure
functions :func:`owm_update`, :func:`project_head_grad`, :func:`mla_alpha` and
:func:`mla_fusion_weights`; :class:`MLA` only wires them in.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Output
from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from . import register_method
from .base import Method, build_standard_model

log = logging.getLogger("mmbalance")

Schedule = Literal["all", "alternate"]
UpdateOrder = Literal["before", "after"]
AlphaSchedule = Literal["constant", "official"]
FusionRule = Literal["entropy", "mean", "fixed"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
UPDATE_ORDERS: tuple[str, ...] = get_args(UpdateOrder)
ALPHA_SCHEDULES: tuple[str, ...] = get_args(AlphaSchedule)
FUSION_RULES: tuple[str, ...] = get_args(FusionRule)


def owm_update(P: Tensor, x: Tensor, alpha: float, normalize: bool = False) -> Tensor:
    """One recursive-least-squares step of the OWM projector (paper Eq. 3, Algorithm 1).

    ``k = P x``; ``P <- P - k k^T / (alpha + x^T k)``; optionally ``P <- P / ||P||_F`` (the
    public code). For small ``alpha`` the result annihilates ``x``: ``x^T P ~ 0``.

    >>> P = owm_update(torch.eye(3), torch.tensor([1.0, 0.0, 0.0]), alpha=1e-6)
    >>> [round(float(v), 4) for v in torch.tensor([1.0, 0.0, 0.0]) @ P]
    [0.0, 0.0, 0.0]
    """
    x = x.to(P.dtype).reshape(-1)
    k = P @ x
    P = P - torch.outer(k, k) / (float(alpha) + torch.dot(x, k))
    if normalize:
        P = P / P.norm().clamp_min(1e-12)
    return P


def project_head_grad(grad_W: Tensor, P: Tensor) -> Tensor:
    """The modified head-weight gradient ``grad_W P`` (``grad_W``: classes x d)."""
    return grad_W @ P.to(grad_W.dtype)


def mla_alpha(alpha: float, schedule: str = "constant", batch_idx: int = 0, batches_per_epoch: int = 1) -> float:
    """``alpha`` (``constant``) or the public code's ``alpha * 0.1^(batch_idx / batches_per_epoch)``
    (``official``; with alpha = 0.1 exactly ``0.1^(1 + batch_idx / len(loader))``)."""
    if schedule == "constant":
        return float(alpha)
    if schedule == "official":
        return float(alpha) * 0.1 ** (batch_idx / max(int(batches_per_epoch), 1))
    raise ValueError(f"mla: unknown alpha_schedule '{schedule}'; valid: {', '.join(ALPHA_SCHEDULES)}")


def mla_fusion_weights(unimodal_logits: Sequence[Tensor], rule: str = "entropy",
                       fixed_weights: Sequence[float] | None = None,
                       present: Sequence[Tensor] | None = None) -> Tensor:
    """Per-sample fusion weights ``(B, M)`` summing to 1 over the modalities (paper Eq. 5-7).

    ``entropy``: ``lambda_m = softmax_m(-e_m)`` with ``e_m`` the entropy of softmax(z_m) of each
    sample (equal to the paper's ``exp(max_n e_n - e_m) / sum_j exp(max_n e_n - e_j)``);
    ``mean``: ``1/M``; ``fixed``: ``fixed_weights`` normalised to sum 1. Modalities marked absent
    in ``present`` (list of bool ``(B,)``) get weight 0 and the rest are renormalised.
    """
    Z = torch.stack([z.float() for z in unimodal_logits], dim=1)  # (B, M, C)
    B, M, _ = Z.shape
    if rule == "entropy":
        logp = torch.log_softmax(Z, dim=2)
        ent = -(logp.exp() * logp).sum(2)  # (B, M)
        scores = -ent
    elif rule == "mean":
        scores = Z.new_zeros(B, M)
    elif rule == "fixed":
        if fixed_weights is None or len(fixed_weights) != M:
            raise ValueError(f"mla: fusion 'fixed' needs fixed_weights with one weight per modality ({M})")
        fw = torch.as_tensor(list(fixed_weights), dtype=Z.dtype, device=Z.device)
        if bool((fw < 0).any()) or float(fw.sum()) <= 0:
            raise ValueError("mla: fixed_weights must be non-negative with a positive sum")
        scores = fw.clamp_min(1e-30).log().expand(B, M)
    else:
        raise ValueError(f"mla: unknown fusion '{rule}'; valid: {', '.join(FUSION_RULES)}")
    if present is not None:
        pres = torch.stack([p.to(Z.device).bool() for p in present], dim=1)
        pres = pres | ~pres.any(1, keepdim=True)  # a sample with nothing present: use all
        scores = scores.masked_fill(~pres, float("-inf"))
    return torch.softmax(scores, dim=1)


def mla_fuse(unimodal_logits: Sequence[Tensor], rule: str = "entropy", fixed_weights: Sequence[float] | None = None,
             present: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Fused logits ``sum_m lambda_m z_m`` (per sample) and the weights ``(B, M)``."""
    lam = mla_fusion_weights(unimodal_logits, rule, fixed_weights, present)
    Z = torch.stack([z.float() for z in unimodal_logits], dim=1)
    return (lam.unsqueeze(2) * Z).sum(1), lam


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside the block, each restored to its own mode
    after (dropout off, BatchNorm uses and keeps its running statistics)."""
    saved = [(mod, mod.training) for root in modules for mod in root.modules()]
    for mod, _ in saved:
        mod.training = False
    try:
        yield
    finally:
        for mod, flag in saved:
            mod.training = flag


def present_rows(x: Tensor, y: Tensor, present: Tensor) -> tuple[Tensor, Tensor, int, bool]:
    """This rank's rows of a unimodal step: ``(x, y, n_present, placeholder)``.

    The rows where the modality is present; when there are none, a *placeholder*: the whole
    local batch with a zero input, to be run in eval mode (:func:`eval_mode`) and weighted 0.
    The placeholder builds the same graph as a real step, so backward reaches the same
    parameters and every rank makes the same collective calls (the gradient all-reduce needs
    the same tensors on every rank) while contributing nothing.
    """
    present = present.to(torch.bool)
    n = int(present.sum())
    if n == 0:
        return torch.zeros_like(x), y, 0, True
    if n < present.numel():
        return x[present], y[present], n, False
    return x, y, n, False


def unimodal_forward_mode(modules: Sequence[nn.Module], n_present: int, placeholder: bool):
    """The mode for a unimodal step's forward through ``modules``: eval mode for a placeholder
    (:func:`present_rows`); BatchNorm layers in eval mode when a single sample is present
    (batch statistics of one sample are undefined, and BatchNorm1d refuses them); else as is."""
    if placeholder:
        return eval_mode(modules)
    if n_present == 1:
        return eval_mode([mod for root in modules for mod in root.modules()
                          if isinstance(mod, nn.modules.batchnorm._BatchNorm)])
    return contextlib.nullcontext()


@register_method("mla", summary="MLA: alternating unimodal training, shared head with OWM gradient projection, entropy fusion",
                 paper='Zhang et al., "Multimodal Representation Learning by Alternating Unimodal Adaptation"',
                 venue="CVPR", year=2024, category="optimisation")
class MLA(Method):
    """Multimodal Learning with Alternating Unimodal Adaptation (MLA, CVPR 2024).

    Model: an encoder per modality and one shared linear head g (the ``shared_head`` fusion,
    always built by this method; encoders of unequal width go through the fusion's
    per-modality projection to a common width first, and that projection trains with its
    encoder).

    Training (paper Eq. 1-4, Algorithm 1), one *modality step* at a time:

    1. Which modality: ``schedule="all"`` (default) steps through every modality in turn on each
       batch, one optimizer step each (public code, ``main.py`` ``train_epoch`` with
       ``--gs_flag``), so E epochs train every encoder for E epochs, as joint training does;
       ``schedule="alternate"`` uses one modality per batch, ``m_t = t mod M`` (Algorithm 1
       read literally), which gives each encoder 1/M of the updates per epoch.
    2. ``L = CE(g(h_m), y)`` (Eq. 1-2), the mean over the samples of the *global* batch where m
       is present (samples with m absent are skipped); backward reaches only encoder m
       (+ its projection) and g.
    3. Head gradient modification (Eq. 3-4) with one matrix P (d x d, P_1 = I, shared by all
       modalities), on the head **weight** only (the bias is never projected):
       ``hbar`` = batch mean of the head input ``u = proj_m(h_m)`` over the global batch's
       present samples; ``k = P hbar``; ``P <- P - k k^T / (alpha + hbar^T k)``;
       ``grad_W <- grad_W P``. The very first modality step is not projected and does not enter
       P (Eq. 4 starts from P_1 = I; the public code's ``GSPlugin.before_update`` in
       ``utils/utils.py`` returns while ``exp_count == 0``).
    4. Optimizer step (gradients zeroed with ``set_to_none``, so no other encoder moves).

    Several processes: each rank runs its present rows; ``hbar``, the loss sum and the
    present count are all-reduced before backward and the loss is scaled to the global mean.
    A rank without a present sample runs a zero-weight placeholder (:func:`present_rows`), so
    every rank makes the same collective calls; when no rank has one the step is skipped on
    all ranks alike (no P update, no optimizer step).

    Inference (Eq. 5-7): per-sample entropy ``e_m`` of softmax(g(h_m)); ``lambda = softmax_m(-e)``;
    fused logits ``sum_m lambda_m g(h_m)``. ``predict``'s unimodal logits are g(h_m).

    Options:
        schedule: ``all`` (default: every modality in turn on each batch) or ``alternate``
            (one modality per batch, t mod M).
        update_order: ``before`` (default, Algorithm 1 and the public code: update P with the
            current batch, then project) or ``after`` (classic OWM: project with the P built
            from earlier steps, then update P with the current batch).
        project_first_step: False (default, paper and public code: the first modality step
            uses P = I and its features do not enter P) or True (the first step is treated like
            every other: P is updated with its features and, with ``before``, projects it).
        alpha: OWM regulariser (default 0.1).
        alpha_schedule: ``constant`` (default) or ``official``:
            ``alpha * 0.1^(batch_idx / batches_per_epoch)``, reset every epoch (public code).
        normalize_P: divide P by its Frobenius norm after each update (public code; default
            False; it shrinks the head gradient ~sqrt(d)x at the first update).
        gradient_modification: True (default) / False (ablation: plain alternating training,
            P is not updated).
        fusion: test-time rule, ``entropy`` (default, dynamic fusion), ``mean`` (ablation:
            dynamic fusion off) or ``fixed`` (``fixed_weights``, normalised to sum 1; the
            public code uses 0.55/0.45 for audio/visual). One option covers the paper's
            "dynamic fusion on/off" switch: on = ``entropy``, off = ``mean``.
        fixed_weights: one weight per modality (model order) for ``fusion="fixed"``.

    Decisions: the ``official`` alpha schedule generalises to ``alpha * 0.1^(i/n)`` (identical to
    the code for alpha = 0.1). P is kept in float32 and goes into ``state_dict`` (resume), with
    the iteration counter t and the number of modality steps taken, so a resumed run continues
    the alternation and the projection where it stopped. Modalities absent for a test sample
    get fusion weight 0 (the others are renormalised).

    Diagnostics per epoch: ``P_fro`` (||P||_F after the step), ``grad_ratio`` and
    ``grad_ratio_<m>`` (``||grad_W P|| / ||grad_W||`` of projected steps: near 0 means the head
    has stopped learning), ``loss_<m>``, ``alpha``.
    Cost: each encoder one forward/backward per batch (``all``) or per M batches
    (``alternate``); one optimizer step per modality step; an O(d^2) P update.
    """

    required_fusion = "shared_head"

    def __init__(self, schedule: Schedule = "all", update_order: UpdateOrder = "before",
                 project_first_step: bool = False, alpha: Annotated[float, Interval(0, None, closed="neither")] = 0.1,
                 alpha_schedule: AlphaSchedule = "constant", normalize_P: bool = False,
                 gradient_modification: bool = True, fusion: FusionRule = "entropy",
                 fixed_weights: list[Annotated[float, Interval(0, None)]] | None = None):
        super().__init__()
        if fusion == "fixed" and not fixed_weights:
            raise ConfigError("mla: fusion 'fixed' needs fixed_weights, e.g. --method.fixed_weights [0.55,0.45]")
        if fixed_weights is not None and not sum(float(w) for w in fixed_weights) > 0:
            raise ConfigError(f"mla option fixed_weights needs a positive sum, got {list(fixed_weights)}")
        self.schedule = schedule
        self.update_order = update_order
        self.project_first_step = bool(project_first_step)
        self.alpha = float(alpha)
        self.alpha_schedule = alpha_schedule
        self.normalize_P = bool(normalize_P)
        self.gradient_modification = bool(gradient_modification)
        self.fusion = fusion
        self.fixed_weights = None if fixed_weights is None else [float(w) for w in fixed_weights]
        self.P: Tensor | None = None
        self._t = 0
        self._steps = 0  # modality steps taken (optimizer steps), for the first-step rule
        self._batch_idx = 0
        self._batches_per_epoch = 1

    # -- construction ----------------------------------------------------------------------
    def build_model(self, spec):
        if spec.fusion == "shared_head":
            return build_standard_model(spec, fusion="shared_head", **spec.fusion_options)
        if spec.fusion != "concat":  # concat is the engine's default: not a user choice
            log.warning("mla uses the shared_head fusion; --fusion %s is ignored", spec.fusion)
        return build_standard_model(spec, fusion="shared_head")

    def setup(self, trainer):
        super().setup(trainer)
        fusion = self.model.fusion
        if not (hasattr(fusion, "head") and hasattr(fusion, "head_input")):
            raise ConfigError("mla needs the shared_head fusion (one linear head shared by all modalities)")
        M = len(self.model.modalities)
        if self.fixed_weights is not None and len(self.fixed_weights) != M:
            raise ConfigError(f"mla: fixed_weights has {len(self.fixed_weights)} entries for {M} modalities "
                              f"({', '.join(self.model.modalities)})")
        if self.P is None:
            self.P = torch.eye(int(fusion.head.in_features), device=trainer.device)
        else:
            self.P = self.P.to(trainer.device)

    # -- training --------------------------------------------------------------------------
    def on_epoch_start(self, epoch):
        self._batch_idx = 0

    def train_dataset(self, epoch, dataset):
        n, bs = len(dataset), self.trainer.cfg.train.batch_size
        self._batches_per_epoch = max(1, n // bs if self.trainer.cfg.train.drop_last else math.ceil(n / bs))
        return dataset

    def scheduled_modalities(self) -> list[str]:
        """The modalities trained at the current iteration, in order."""
        mods = self.model.modalities
        return [mods[self._t % len(mods)]] if self.schedule == "alternate" else list(mods)

    def training_step(self, batch):
        alpha = mla_alpha(self.alpha, self.alpha_schedule, self._batch_idx, self._batches_per_epoch)
        losses = []
        for m in self.scheduled_modalities():
            loss = self.modality_step(batch, m, alpha)
            if loss is not None:
                losses.append(loss)
        self._t += 1
        self._batch_idx += 1
        self.log("alpha", alpha)
        return {"loss": sum(losses) / len(losses)} if losses else {}

    def modality_step(self, batch, m: str, alpha: float) -> float | None:
        """One unimodal step on modality ``m``: CE through the shared head (mean over the global
        batch's present samples), projected head-weight gradient, optimizer step. Returns the
        loss, or None when no sample of the global batch has ``m`` (then nothing changes)."""
        tr, model = self.trainer, self.model
        fusion = model.fusion
        x, y, n_local, placeholder = present_rows(batch["inputs"][m], batch["label"], batch["present"][m])
        with unimodal_forward_mode([model.encoders[m], fusion], n_local, placeholder):
            with tr.autocast():
                u = fusion.head_input(m, model.encode(m, x))
                z = fusion.head(u)
        ce_sum = F.cross_entropy(z.float(), y, reduction="sum")
        u = u.detach().float()
        if placeholder:  # weight 0: same graph, nothing learned
            ce_sum, u = ce_sum * 0.0, torch.zeros_like(u)
        # one all-reduce: sum of head inputs (for hbar), loss sum and present count of the global batch
        s = tr.all_reduce_sum(torch.cat([u.sum(0), torch.stack([ce_sum.detach(), ce_sum.new_tensor(float(n_local))])]))
        n_global = float(s[-1])
        if n_global == 0:  # no rank has m: every rank skips alike
            return None
        tr.zero_grad()
        tr.backward(ce_sum * (tr.world_size / n_global))  # averaged over ranks: the global mean
        first = self._steps == 0 and not self.project_first_step
        if self.gradient_modification and not first:
            hbar = s[:-2] / n_global
            W = fusion.head.weight
            if self.update_order == "before":
                self.P = owm_update(self.P, hbar, alpha, self.normalize_P)
            if W.grad is not None:
                g = W.grad.float()
                g_new = project_head_grad(g, self.P)
                ratio = float(g_new.norm() / g.norm().clamp_min(1e-30))
                W.grad.copy_(g_new.to(W.grad.dtype))
                self.log("grad_ratio", ratio)
                self.log(f"grad_ratio_{m}", ratio)
            if self.update_order == "after":
                self.P = owm_update(self.P, hbar, alpha, self.normalize_P)
        if self.gradient_modification:
            self.log("P_fro", float(self.P.norm()))
        tr.optimizer_step()
        self._steps += 1
        value = float(s[-2]) / n_global
        self.log(f"loss_{m}", value)
        return value

    # -- inference ---------------------------------------------------------------------------
    def predict(self, batch):
        model = self.model
        mods = model.modalities
        out = model(batch["inputs"], batch["present"])
        zm = out.unimodal_logits
        fused, _ = mla_fuse([zm[m] for m in mods], self.fusion, self.fixed_weights,
                            [batch["present"][m] for m in mods])
        return Output(fused.to(out.logits.dtype), zm, out.features)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self):
        return {"P": None if self.P is None else self.P.detach().cpu().clone(), "t": self._t, "steps": self._steps}

    def load_state_dict(self, state: Mapping):
        if state.get("P") is not None:
            device = self.trainer.device if self.trainer is not None else "cpu"
            self.P = state["P"].to(device=device, dtype=torch.float32).clone()
        self._t = int(state.get("t", self._t))
        self._steps = int(state.get("steps", self._steps))


__all__ = ["MLA", "eval_mode", "mla_alpha", "mla_fuse", "mla_fusion_weights", "owm_update", "present_rows",
           "project_head_grad", "unimodal_forward_mode"]
