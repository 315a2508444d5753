"""MIE — modal-aware interactive enhancement (Jiang, Chi, Yang, arXiv 2407.04587).

Per-modality networks (encoder + 3-layer head), trained one modality at a time (in turn on
every batch by default, or in stages). Each step is a sharpness-aware (SAM) step on that
modality's parameters whose head weight gradients are damped along the dominant input
directions of the previously trained modality (``grad_W <- grad_W T``). The pure math lives in small functions below
(:func:`sam_perturbation`, :func:`batch_mean_outer`, :func:`flat_gm_matrix`,
:func:`modify_weight_gradient`, :func:`select_gm_layers`, :func:`average_fusion`,
:func:`entropy_weights`, :func:`entropy_fusion`, :func:`stage_of_epoch`); :class:`MIE` wires
them into the engine's hooks.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MultimodalModel, Output
from ..models.fusions import Fusion
from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from .mla import eval_mode, mla_fuse, mla_fusion_weights, unimodal_forward_mode
from . import register_method
from .base import Method, ModelSpec

log = logging.getLogger("mmbalance")

FusionRule = Literal["average", "entropy"]
Variant = Literal["paper", "official"]
Schedule = Literal["batch", "epochs", "steps"]
FUSION_RULES: tuple[str, ...] = get_args(FusionRule)
VARIANTS: tuple[str, ...] = get_args(Variant)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
PositiveInt = Annotated[int, Interval(1, None)]
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ---------------------------------------------------------------------------------------- math
def sam_perturbation(grads: Sequence[Tensor], rho: float) -> tuple[list[Tensor], Tensor]:
    """SAM ascent step (Foret et al. 2021): ``eps = rho * g / ||g||_2``, one *global* norm over
    all tensors in ``grads``. Returns the per-tensor perturbations and ``||g||`` (a 0-d device
    tensor: nothing is read back to the host).

    A zero gradient gives a zero perturbation.

    >>> eps, n = sam_perturbation([torch.tensor([3.0]), torch.tensor([4.0])], rho=0.5)
    >>> [round(float(e), 4) for e in eps], float(n)
    ([0.3, 0.4], 5.0)
    """
    if not grads:
        return [], torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
    scale = torch.where(norm > 0, rho / norm, torch.zeros_like(norm))
    return [(g.detach() * scale.to(g.dtype)) for g in grads], norm


def batch_mean_outer(x: Tensor, batch_size: int | None = None, mask: Tensor | None = None) -> Tensor:
    """``sum_t zbar_t zbar_t^T`` over consecutive batches of ``batch_size`` rows of a layer input
    ``x`` (N, d) (or (N, ..., d): extra axes are averaged per sample), ``zbar_t`` = the mean of
    batch t's rows (only rows where ``mask`` is True; batches with none are skipped). One batch
    when ``batch_size`` is None. Summed over the training set this is the paper's cumulative
    statistic ``Ybar`` (Eq. 5): rank one per batch, not a per-sample covariance. Float64.

    >>> batch_mean_outer(torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
    tensor([[4., 2.],
            [2., 1.]], dtype=torch.float64)
    """
    x = x.detach().double()
    x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
    n, d = x.shape
    w = torch.ones(n, dtype=x.dtype, device=x.device) if mask is None else mask.to(x.device, x.dtype)
    bs = batch_size or max(n, 1)
    pad = (-n) % bs
    if pad:
        x = torch.cat([x, x.new_zeros(pad, d)])
        w = torch.cat([w, w.new_zeros(pad)])
    xs, ws = x.view(-1, bs, d), w.view(-1, bs, 1)
    cnt = ws.sum(1)
    z = (xs * ws).sum(1)[cnt[:, 0] > 0] / cnt[cnt[:, 0] > 0]
    return z.T @ z


def flat_gm_matrix(ybar: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """The gradient-modification matrix ``T = V Sigma V^T`` of paper Eq. 6-7.

    ``Ybar = U Lambda V^T`` (SVD); ``Sigma = exp(-tau (Lambda - lambda_min) / (lambda_max -
    lambda_min))``, so T is symmetric with eigenvalues in ``[exp(-tau), 1]``: the direction with
    the largest singular value is damped by ``exp(-tau)``, the smallest is kept. When all
    singular values are equal (e.g. ``Ybar = 0``) the normalisation is undefined; we take it as
    0, i.e. ``T = I`` (no direction is preferred, nothing is damped).
    Returns ``(T, Lambda)``; T in ``ybar``'s dtype, Lambda in float64 (descending).

    >>> T, s = flat_gm_matrix(torch.diag(torch.tensor([4.0, 1.0])), tau=0.4)
    >>> [round(float(v), 4) for v in torch.diagonal(T)]
    [0.6703, 1.0]
    """
    y = ybar.detach().double()
    _, s, vh = torch.linalg.svd(y)
    lo, hi = s.min(), s.max()
    if float(hi - lo) <= 1e-12 * max(float(hi), 1e-300):
        normed = torch.zeros_like(s)
    else:
        normed = (s - lo) / (hi - lo)
    sigma = torch.exp(-float(tau) * normed)
    v = vh.mH
    t = (v * sigma) @ v.mH
    t = 0.5 * (t + t.mH)  # exact symmetry despite rounding
    return t.to(ybar.dtype), s


def modify_weight_gradient(grad: Tensor, T: Tensor) -> Tensor:
    """``grad_W T`` for a weight gradient ``(out, in)`` and ``T`` ``(in, in)`` (paper Eq. 8);
    biases are never modified."""
    return grad @ T.to(grad.dtype)


def average_fusion(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Average of the modalities' probabilities, returned as its log: ``log mean_m softmax(z_m)``.

    ``logits`` is ``(M, B, C)``; ``mask`` ``(M, B)`` bool restricts the mean to present
    modalities (a sample with none present averages all). The log of the mean probability has
    the same argmax as the mean and is a proper log-probability, so the engine's fused
    cross-entropy is the mixture's NLL.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    if mask is None:
        return torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    w = _mask_weights(mask)
    return torch.logsumexp(logp + torch.log(w).unsqueeze(-1), dim=0)


def entropy_weights(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """MLA's per-sample dynamic fusion weights (MLA Eq. 7) for stacked logits ``(M, B, C)``:
    ``lambda_m = softmax_m(-e_m)`` -> ``(M, B)``; one implementation, :func:`mla_fusion_weights`."""
    present = list(mask) if mask is not None else None
    return mla_fusion_weights(list(logits), "entropy", present=present).T


def entropy_fusion(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum_m lambda_m z_m`` on logits with :func:`entropy_weights` (as MLA)."""
    present = list(mask) if mask is not None else None
    return mla_fuse(list(logits), "entropy", present=present)[0]


def present_rows_known(x: Tensor, y: Tensor, present: Tensor, n: int) -> tuple[Tensor, Tensor, int, bool]:
    """:func:`mmbalance.methods.mla.present_rows` when the number ``n`` of present rows is
    already known on the host: the same ``(x, y, n, placeholder)`` (the present rows in their
    order; a zero-input placeholder when there is none), gathered by a stable sort of the mask
    instead of boolean indexing, so no data-dependent shape makes the host wait."""
    if n == 0:
        return torch.zeros_like(x), y, 0, True
    if n < present.numel():
        rows = torch.argsort((~present.view(-1).to(torch.bool)).to(torch.uint8), stable=True)[:n]
        return x.index_select(0, rows), y.index_select(0, rows), n, False
    return x, y, n, False


def _mask_weights(mask: Tensor) -> Tensor:
    keep = mask.clone().float()
    none = keep.sum(0) == 0
    keep[:, none] = 1.0
    return keep / keep.sum(0, keepdim=True)


def stage_of_epoch(epoch: int, stage_epochs: int | Sequence[int]) -> int:
    """Index of the stage that epoch ``epoch`` (0-based) belongs to, for stage lengths
    ``stage_epochs`` (an int, or a list cycled: stage s lasts ``stage_epochs[s % len]`` epochs).

    >>> [stage_of_epoch(e, [2, 3]) for e in range(8)]
    [0, 0, 1, 1, 1, 2, 2, 3]
    """
    lengths = [int(stage_epochs)] if isinstance(stage_epochs, int) else [int(s) for s in stage_epochs]
    if len(lengths) == 1:
        return epoch // lengths[0]
    cycle = sum(lengths)
    s, rem = (epoch // cycle) * len(lengths), epoch % cycle
    for n in lengths:
        if rem < n:
            return s
        rem -= n
        s += 1
    raise AssertionError("unreachable")  # pragma: no cover


def select_gm_layers(encoder: nn.Module, head: nn.Module, scope: str | float) -> list[tuple[str, nn.Linear]]:
    """The Linear layers whose weight gradients are modified, deepest first, with labels.

    ``scope="head"``: the head's Linear layers (``head1`` .. ``head3``, input to output).
    ``scope=f`` (0 < f <= 1): the deepest fraction f of the network's parameters (paper
    Table 4): walking parameterised layers from the output backwards, a layer is taken while
    the parameters already taken are fewer than ``f * total`` (so the last layer is always
    taken). Encoder Linear layers are labelled ``enc1`` .. ``encK``. Norm layers count towards
    the total but are not modified (like biases). A convolution inside the chosen fraction
    raises :class:`ConfigError` (only Linear layers are supported).
    """
    head_lin = [mod for mod in head.modules() if isinstance(mod, nn.Linear)]
    head_labels = {id(mod): f"head{i + 1}" for i, mod in enumerate(head_lin)}
    if scope == "head":
        return [(head_labels[id(mod)], mod) for mod in reversed(head_lin)]
    enc_lin = [mod for mod in encoder.modules() if isinstance(mod, nn.Linear)]
    enc_labels = {id(mod): f"enc{i + 1}" for i, mod in enumerate(enc_lin)}
    labels = {**enc_labels, **head_labels}
    layers = [mod for part in (encoder, head) for mod in part.modules()
              if any(True for _ in mod.parameters(recurse=False))]
    total = sum(p.numel() for mod in layers for p in mod.parameters(recurse=False))
    budget, taken, out = float(scope) * total, 0, []
    for mod in reversed(layers):
        if taken >= budget:
            break
        if isinstance(mod, _CONV):
            raise ConfigError(
                f"mie: gm_scope={scope} reaches a {type(mod).__name__} layer; gradient modification "
                "supports Linear layers only — use gm_scope head or a smaller fraction")
        if isinstance(mod, nn.Linear):
            out.append((labels[id(mod)], mod))
        taken += sum(p.numel() for p in mod.parameters(recurse=False))
    return out


# ---------------------------------------------------------------------------------------- model
class MIEHeads(Fusion):
    """One head per modality, FC(d,256) -> ReLU -> FC(256,64) -> FC(64,C) (paper Sec. 4.2.3; no
    ReLU between the last two layers, as in the public code), and late fusion of the unimodal
    logits by ``rule``: ``average`` (log of the mean probability) or ``entropy`` (MLA weighting).

    Built by the ``mie`` method only; not in the fusion registry (its ``name`` is reported)."""

    name = "mie_heads"

    def __init__(self, feature_dims: dict[str, int], num_classes: int, rule: str = "average",
                 hidden: Sequence[int] = (256, 64)):
        super().__init__(feature_dims, num_classes)
        h1, h2 = (int(h) for h in hidden)
        self.rule = rule
        self.heads = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.Linear(h2, num_classes))
            for m, d in feature_dims.items()})

    def combine(self, zm: Mapping[str, Tensor], mask: Tensor | None = None) -> Tensor:
        stacked = torch.stack([zm[m] for m in self.modalities])
        fused = average_fusion(stacked, mask) if self.rule == "average" else entropy_fusion(stacked, mask)
        return fused.to(stacked.dtype)

    def forward(self, features):
        zm = {m: self.heads[m](features[m]) for m in self.modalities}
        return self.combine(zm), zm


@contextlib.contextmanager
def _frozen_norm_stats(modules: Sequence[nn.Module]):
    """Keep BatchNorm running statistics unchanged (the SAM re-evaluation is not a new batch)."""
    bns = [mod for mod in modules if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats]
    saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, (mom, nbt) in zip(bns, saved):
            bn.momentum = mom
            bn.num_batches_tracked.copy_(nbt)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# ---------------------------------------------------------------------------------------- method
@register_method("mie", summary="MIE: per-modality networks trained in turn with SAM and SVD gradient modification",
                 paper='Jiang et al., "Multimodal Classification via Modal-Aware Interactive Enhancement"',
                 venue="arXiv", year=2024, category="optimisation")
class MIE(Method):
    """Modal-aware interactive enhancement (MIE, paper Algorithm 1).

    Model: late fusion of per-modality networks, encoder_m + head_m with
    head = FC(d,256) -> ReLU -> FC(256,64) -> FC(64,C) (Sec. 4.2.3). ``--fusion`` is not used
    (only the default ``concat`` or ``late`` are accepted); the test-time rule is ``fusion``.

    Training: the modalities are trained one at a time (Algorithm 1: modalities j = 1..M in
    turn, each for an inner loop of mini-batches; CE on j's own logits, the other networks get
    no gradient and no optimizer update). One *step* of modality j:

    1. **SAM** (Sec. 3.2, Eq. 3-4; Foret et al.) on theta_j = encoder_j + head_j:
       g = grad L(theta_j); eps = rho g / ||g||_2 (one global norm over theta_j); theta_j += eps;
       a *fresh* forward at theta_j + eps (same dropout mask; BatchNorm running statistics not
       updated twice); its gradient is the update direction; theta_j is then **restored exactly**
       from a saved copy (never by subtracting eps).
    2. **Gradient modification** (Eq. 8): for each modified Linear layer of modality j,
       grad_W <- grad_W T^(k) with T^(k) of the layer at the same depth and with the same weight
       shape of the previously trained modality k; biases are not modified. T^(k) = I until k's
       T has been built (also for layers without a same-shape partner).
    3. The optimizer step (the engine's optimizer, clipping included).

    L is the mean over the samples of the *global* batch where j is present (sum of the local
    present rows times world size over the all-reduced count, as the engine averages gradients
    over ranks); a rank without such a sample runs a zero-weight placeholder so every rank
    makes the same collective calls, and when no rank has one the step is skipped on all ranks.

    T^(k) (Eq. 5-7), for each modified layer of k: Ybar = sum_t zbar_t zbar_t^T over the
    training set (``train_eval``, deterministic) in batches of ``cov_batch_size``, eval mode,
    no grad, zbar_t = batch-mean layer input over the batch's samples where k is present; under
    several processes each rank takes every world-th batch (``trainer.shard`` over the batches)
    and the sums are all-reduced, so Ybar is the single-process one. SVD Ybar = U Lambda V^T;
    Sigma = exp(-tau (Lambda - lambda_min I) / (lambda_max - lambda_min)); T^(k) = V Sigma V^T;
    eigenvalues in [exp(-tau), 1]; equal singular values give T = I. T is built lazily, when
    the next modality's training starts, so no pass is spent after the last one.

    Schedule (``schedule``):

    * ``batch`` (default): every batch trains each modality in turn (an inner loop of one
      mini-batch per modality, all on the same batch), so E epochs train every network for E
      epochs on the engine's learning-rate schedule, as joint training trains every encoder.
      Modality j uses T of the modality before it in the cycle (for two: each the other's).
      T is rebuilt for every modality at the start of each epoch after the first (one
      inference pass per epoch), not after every inner loop: the cost of a pass per batch
      would be prohibitive, and Ybar sums over the whole training set anyway.
    * ``epochs``: stages of whole epochs, ``stage_epochs`` per stage (int, or a list cycled; the
      public code's CREMA-D stages are ``[25, 50]``); stage s trains ``modalities[s % M]`` and
      uses T of stage s-1's modality, built when stage s starts. With E epochs each of M
      modalities trains about E/M epochs: raise ``train.epochs`` accordingly.
    * ``steps``: stages of ``inner_steps`` mini-batches (running across epoch boundaries); every
      stage ends with a covariance pass, so small ``inner_steps`` multiplies the cost.

    Inference (``fusion``): ``average`` — the mean of the modalities' probabilities, returned as
    its log (same argmax; the fused loss is the mixture's NLL); ``entropy`` — MLA's per-sample
    entropy weights on the logits, sum_m lambda_m z_m. Absent modalities are left out per sample.

    Options:
        sam: SAM step on/off (paper Table 3 ablation). Default True.
        rho: SAM radius. Default 1e-10 = the paper's value (audio-video; 1e-15 for image-text).
            It is below float32 resolution of typical weights, so SAM does (almost) nothing at
            this value; the realised perturbation norm is logged (``sam_eps_real/<m>``).
        gm: gradient modification on/off (Table 3). Default True.
        tau: damping temperature of Sigma. Default 0.4 (paper and code).
        cov_batch_size: batch size of the covariance pass. Default 12 (public code).
        gm_scope: ``"head"`` (default, paper: the three head Linear layers) or a fraction in
            (0, 1] of the deepest parameters (Table 4), encoder Linear layers included; a conv
            layer inside the fraction is a ConfigError (Linear layers only).
        schedule: ``batch`` (default: each modality in turn on every batch), ``epochs`` or ``steps``
            (stages; see Schedule above).
        stage_epochs: epochs per stage for ``schedule=epochs``, int or list (cycled). Default 1.
        inner_steps: mini-batches per stage for ``schedule=steps`` (required there). Default None.
        reset_optimizer: clear the optimizer state (momentum, Adam moments and step) of the
            modality whose stage starts, as the public code re-creates its optimizer at every
            stage (``train_CREMA.py``). Default False: each modality has its own network, so the
            other modalities' stages leave its parameters and loss untouched and its momentum
            is still that of its own trajectory; a reset only adds a cold start per stage. Only
            with ``schedule`` ``epochs`` or ``steps`` (with ``batch`` it would reset every step).
            The learning-rate schedule stays the engine's (the public code also restarts
            StepLR(40) per stage).
        fusion: ``average`` (default, code) or ``entropy``.
        variant: ``paper`` (default) or ``official``: the public code's mixup on the current
            modality's input (lambda ~ Beta(mixup_alpha, mixup_alpha), random partner in the
            batch) and clean-label term, L = (1 - clean_weight) * [lambda CE(o, y) + (1 - lambda)
            CE(o, y_perm)] + clean_weight * CE(o, y), o = head_j(encoder_j(x_mix)); both SAM
            passes use the same mixup draw (under several processes each rank mixes within its
            own rows). The public code's other departures (per-tensor SAM norm, no weight
            restore, stage restarts from a test-selected checkpoint) are bugs and are not
            reproduced.
        mixup_alpha: Beta parameter of the official mixup. Default 1.0.
        clean_weight: weight of the clean-label term in the official variant. Default 0.3.

    Diagnostics (per epoch): ``stage`` (stage index; stage schedules), ``trained/<m>`` (fraction
    of the epoch's steps that trained m), ``loss/<m>``, ``sam_grad_norm/<m>`` (||g||),
    ``sam_eps/<m>`` (||eps|| = rho), ``sam_eps_real/<m>`` (norm of the perturbation actually
    realised in the weights), ``sam_loss_rise/<m>`` (L(theta + eps) - L(theta) on this rank's
    present samples), ``gm_ratio/<m>`` (||grad_W T|| / ||grad_W|| over the modified weights),
    and when T is built ``sv_min/<m>/<layer>``, ``sv_max/<m>/<layer>`` (range of Lambda; Ybar is
    a sum of rank-one terms, so lambda_min is ~0 whenever the layer is wider than the number of
    covariance batches) and ``sv_top_share/<m>`` (lambda_max / sum(Lambda), mean over layers:
    near 1 means T damps essentially one direction).

    Cost: per step of a modality, its network forward + backward, twice with SAM (with
    ``batch``, each encoder once per batch as in joint training); one covariance pass over the
    training set and small SVDs per epoch (``batch``) or per stage. Host synchronisation: one
    read per batch of every scheduled modality's present count (here and over all ranks: which
    rows a step uses, and whether it runs); diagnostics stay on the device.
    """

    def __init__(self, sam: bool = True, rho: Annotated[float, Interval(0, None)] = 1e-10, gm: bool = True,
                 tau: Annotated[float, Interval(0, None)] = 0.4, cov_batch_size: PositiveInt = 12,
                 gm_scope: Literal["head"] | Annotated[float, Interval(0, 1, closed="right")] = "head",
                 schedule: Schedule = "batch",
                 stage_epochs: PositiveInt | list[PositiveInt] = 1, inner_steps: PositiveInt | None = None,
                 reset_optimizer: bool = False, fusion: FusionRule = "average", variant: Variant = "paper",
                 mixup_alpha: Annotated[float, Interval(0, None, closed="neither")] = 1.0,
                 clean_weight: Annotated[float, Interval(0, 1)] = 0.3):
        super().__init__()
        if isinstance(stage_epochs, (list, tuple)) and not stage_epochs:
            raise ConfigError("mie option stage_epochs takes an integer >= 1 or a non-empty list of them, got []")
        if stage_epochs != 1 and schedule != "epochs":
            raise ConfigError(f"mie: stage_epochs applies to schedule=epochs (got schedule={schedule}); "
                              "add --method.schedule epochs")
        if (inner_steps is None) != (schedule != "steps"):
            raise ConfigError("mie: inner_steps (mini-batches per stage) goes with schedule=steps, and "
                              "schedule=steps needs inner_steps")
        if reset_optimizer and schedule == "batch":
            raise ConfigError("mie: reset_optimizer needs stages (schedule epochs or steps); with schedule=batch "
                              "it would reset the optimizer at every step")
        self.sam = sam
        self.rho = float(rho)
        self.gm = gm
        self.tau = float(tau)
        self.cov_batch_size = int(cov_batch_size)
        self.gm_scope = gm_scope if gm_scope == "head" else float(gm_scope)
        self.schedule = schedule
        self.stage_epochs = list(stage_epochs) if isinstance(stage_epochs, tuple) else stage_epochs
        self.inner_steps = inner_steps
        self.reset_optimizer = reset_optimizer
        self.fusion = fusion
        self.variant = variant
        self.mixup_alpha = float(mixup_alpha)
        self.clean_weight = float(clean_weight)
        # state (resume): T per modality (list aligned with its GM layers), stage counters, and
        # (schedule=steps) the modality whose stage ended and whose T is still to be built
        self._T: dict[str, list[Tensor] | None] = {}
        self._stage = 0
        self._steps_in_stage = 0
        self._pending: str | None = None

    # -- construction ----------------------------------------------------------------------
    def build_model(self, spec: ModelSpec) -> MultimodalModel:
        if spec.fusion not in ("concat", "late"):
            raise ConfigError(f"mie builds its own per-modality networks (late fusion); --fusion "
                              f"{spec.fusion} is not used — choose the test-time rule with "
                              f"--method.fusion {'|'.join(FUSION_RULES)}")
        encoders = spec.build_encoders()
        dims = {m: int(e.out_dim) for m, e in encoders.items()}
        head = MIEHeads(dims, spec.num_classes, rule=self.fusion)
        model = MultimodalModel(encoders, head, spec.input_shapes, spec.absent_policy)
        for m in model.modalities:  # fail early on conv layers inside a gm_scope fraction
            select_gm_layers(model.encoders[m], head.heads[m], self.gm_scope)
        return model

    def setup(self, trainer) -> None:
        super().setup(trainer)
        model = self.model
        self._mods = list(model.modalities)
        self._layers = {m: select_gm_layers(model.encoders[m], model.fusion.heads[m], self.gm_scope)
                        for m in self._mods}
        self._params = {m: [p for p in list(model.encoders[m].parameters()) + list(model.fusion.heads[m].parameters())
                            if p.requires_grad] for m in self._mods}
        self._T = {m: None for m in self._mods}
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.schedule == "batch":
            return
        M, E = len(self._mods), self.trainer.cfg.train.epochs
        if self.schedule == "steps":
            n_batches = math.ceil(len(self.trainer.data.train) / self.trainer.cfg.train.batch_size)
            stages = math.ceil(E * n_batches / self.inner_steps)
        else:
            stages = stage_of_epoch(E - 1, self.stage_epochs) + 1
        if stages < M:
            untrained = self._mods[stages:]
            log.warning("mie: with %d epoch(s) the schedule has %d stage(s); modality %s is never trained "
                        "(raise train.epochs or shorten the stages)", E, stages, ", ".join(untrained))

    # -- schedule --------------------------------------------------------------------------
    def current_modality(self) -> str:
        """The modality of the current stage (stage schedules; with ``batch`` the first one)."""
        return self._mods[self._stage % len(self._mods)]

    def scheduled_modalities(self) -> list[str]:
        """The modalities the next training step trains, in order."""
        return list(self._mods) if self.schedule == "batch" else [self.current_modality()]

    def previous_modality(self, m: str | None = None) -> str | None:
        """The modality trained before ``m``: with ``batch`` the one before it in the cycle, with
        stages the previous stage's (None in the first stage)."""
        if self.schedule == "batch":
            m = m if m is not None else self._mods[0]
            return self._mods[(self._mods.index(m) - 1) % len(self._mods)]
        return self._mods[(self._stage - 1) % len(self._mods)] if self._stage > 0 else None

    def on_epoch_start(self, epoch: int) -> None:
        if self.schedule == "batch":
            if epoch > 0 and self.gm:  # T of every modality from its network after the previous epoch
                self.build_T(self._mods)
        elif self.schedule == "epochs":
            self._stage = stage_of_epoch(epoch, self.stage_epochs)
            if epoch > 0 and self._stage != stage_of_epoch(epoch - 1, self.stage_epochs):
                self.start_stage(self._mods[(self._stage - 1) % len(self._mods)])

    def start_stage(self, finished: str) -> None:
        """A stage begins: build T of the modality whose stage just ended; optionally clear the
        optimizer state of the modality whose stage begins."""
        if self.gm:
            self.build_T([finished])
        if self.reset_optimizer:
            opt = self.trainer.optimizer
            for p in self._params[self.current_modality()]:
                opt.state.pop(p, None)

    def build_T(self, mods: Sequence[str]) -> None:
        """T^(m) = V Sigma V^T from modality m's layer inputs over the training set (Eq. 5-7)."""
        for m, ybars in zip(mods, self.layer_input_statistics(mods)):
            ts, shares = [], []
            for (label, _), ybar in zip(self._layers[m], ybars):
                t, s = flat_gm_matrix(ybar, self.tau)
                ts.append(t.float())
                self.log(f"sv_min/{m}/{label}", float(s.min()))
                self.log(f"sv_max/{m}/{label}", float(s.max()))
                if float(s.sum()) > 0:
                    shares.append(float(s.max() / s.sum()))
            if shares:  # Ybar sums rank-one terms, so lambda_min is ~0 and max/min says nothing
                self.log(f"sv_top_share/{m}", sum(shares) / len(shares))
            self._T[m] = ts

    def covariance_dataset(self):
        """This rank's share of the training set for the covariance pass: whole ``cov_batch_size``
        batches, every world-th one (``trainer.shard`` over the batch indices), so the batches
        and their means are exactly those of one process."""
        data, bs = self.trainer.data.train_eval, self.cov_batch_size
        if self.trainer.world_size == 1:
            return data
        n = len(data)
        mine = self.trainer.shard(range(math.ceil(n / bs)))
        idx = [i for k in range(len(mine)) for i in range(mine[k] * bs, min((mine[k] + 1) * bs, n))]
        return torch.utils.data.Subset(data, idx)

    @torch.no_grad()
    def layer_input_statistics(self, mods: Sequence[str]) -> list[list[Tensor]]:
        """Per modality in ``mods``, Ybar = sum_t zbar_t zbar_t^T per modified layer, in one pass
        (deterministic train data, ``cov_batch_size``, eval mode, no grad, float64, all-reduced).
        Every module is back in its own mode after, and eval mode leaves BatchNorm buffers alone."""
        from ..utils import to_device

        trainer, model = self.trainer, self.model
        acc = {m: [torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64, device=trainer.device)
                   for _, mod in self._layers[m]] for m in mods}
        present: dict[str, Tensor] = {}

        def make_hook(m, i):
            def hook(_mod, inputs):
                acc[m][i] += batch_mean_outer(inputs[0], self.cov_batch_size, present[m])
            return hook

        # In eval mode every sample is computed independently, so the forward runs on loader
        # batches of a multiple of cov_batch_size (fewer, larger batches: same numbers, less
        # loader overhead) and the hooks split them into cov_batch_size chunks.
        big = self.cov_batch_size * max(1, trainer.cfg.train.eval_batch_size // self.cov_batch_size)
        handles = [mod.register_forward_pre_hook(make_hook(m, i))
                   for m in mods for i, (_, mod) in enumerate(self._layers[m])]
        try:
            with eval_mode([model]):
                loader = trainer.loader(self.covariance_dataset(), batch_size=big)
                for batch in trainer.progress(loader, desc=f"mie covariance ({', '.join(mods)})"):
                    batch = to_device(batch, trainer.device)
                    for m in mods:
                        present[m] = batch["present"][m]
                        model.fusion.heads[m](model.encode(m, batch["inputs"][m]))
        finally:
            for h in handles:
                h.remove()
        return [[trainer.all_reduce_sum(a) for a in acc[m]] for m in mods]

    # -- training --------------------------------------------------------------------------
    def _loss_sum(self, m: str, x: Tensor, y: Tensor, mix: tuple[float, Tensor] | None) -> Tensor:
        """Sum over the rows of modality m's loss (CE; the official variant's mixup loss)."""
        with self.trainer.autocast():
            if mix is not None:
                lam, perm = mix
                x = lam * x + (1.0 - lam) * x[perm]
            logits = self.model.fusion.heads[m](self.model.encode(m, x)).float()
        if mix is None:
            return F.cross_entropy(logits, y, reduction="sum")
        lam, perm = mix
        l_mix = lam * F.cross_entropy(logits, y, reduction="sum") + (1.0 - lam) * F.cross_entropy(
            logits, y[perm], reduction="sum")
        return (1.0 - self.clean_weight) * l_mix + self.clean_weight * F.cross_entropy(logits, y, reduction="sum")

    def training_step(self, batch):
        if self._pending is not None:  # schedule=steps: the previous stage ended at the last step
            finished, self._pending = self._pending, None
            self.start_stage(finished)
        mods = self.scheduled_modalities()
        for other in self._mods:
            self.log(f"trained/{other}", 1.0 if other in mods else 0.0)
        if self.schedule != "batch":
            self.log("stage", self._stage)
        # the batch's one host read: per scheduled modality, the present rows here and in the
        # global batch (which rows a step uses, and whether any rank has one)
        local = torch.stack([batch["present"][m].to(torch.bool).sum() for m in mods]).to(torch.float64)
        n = torch.cat([local, self.trainer.all_reduce_sum(local)]).tolist()
        counts = {m: (int(n[i]), n[len(mods) + i]) for i, m in enumerate(mods)}
        losses = [v for v in (self.sam_gm_step(m, batch, *counts[m]) for m in mods) if v is not None]
        if self.schedule == "steps":
            self._steps_in_stage += 1
            if self._steps_in_stage >= self.inner_steps:
                self._pending = self.current_modality()
                self._stage += 1
                self._steps_in_stage = 0
        return {"loss": sum(losses) / len(losses)} if losses else {}

    def sam_gm_step(self, m: str, batch, n_local: int | None = None, n_global: float | None = None) -> Tensor | None:
        """One step of modality m on ``batch``: SAM gradient (restore theta exactly), GM, optimizer
        step. Returns the global-batch loss (a device tensor), or None (nothing changes) when no
        sample has m. ``n_local`` / ``n_global``: the present rows of m on this rank and in the
        global batch (read here, with one all-reduce, when not given)."""
        trainer = self.trainer
        if n_local is None or n_global is None:
            local = batch["present"][m].to(torch.bool).sum().to(torch.float64).view(1)
            here, everywhere = torch.cat([local, trainer.all_reduce_sum(local)]).tolist()
            n_local, n_global = int(here), everywhere
        x, y, n_local, placeholder = present_rows_known(batch["inputs"][m], batch["label"], batch["present"][m],
                                                        n_local)
        modules = [self.model.encoders[m], self.model.fusion.heads[m]]
        mode = lambda: unimodal_forward_mode(modules, n_local, placeholder)  # noqa: E731
        mix = None
        if self.variant == "official":  # drawn on the host (CPU generator): no device wait
            lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
            mix = (lam, torch.randperm(x.shape[0], device=x.device))
        rng = _rng_state(trainer.device)
        with mode():
            loss = self._loss_sum(m, x, y, mix)
        if placeholder:  # weight 0: same graph, nothing learned
            loss = loss * 0.0
        if n_global == 0:  # no rank has m: every rank skips alike
            return None
        loss_global = trainer.all_reduce_sum(loss.detach())
        scale = trainer.world_size / n_global  # gradients are averaged over ranks: global mean
        value = loss_global.double() / n_global
        self.log(f"loss/{m}", value)
        trainer.zero_grad()
        trainer.backward(loss * scale)
        if self.sam and self.rho > 0:
            live = [p for p in self._params[m] if p.grad is not None]
            eps, gnorm = sam_perturbation([p.grad for p in live], self.rho)
            saved = [p.detach().clone() for p in live]
            with torch.no_grad():
                for p, e in zip(live, eps):
                    p.add_(e)
                real_sq = torch.zeros((), dtype=torch.float64, device=trainer.device)
                for p, kept in zip(live, saved):
                    real_sq = real_sq + (p - kept).double().pow(2).sum()
            trainer.zero_grad()
            _set_rng_state(rng, trainer.device)  # same dropout mask at theta + eps
            with _frozen_norm_stats(list(modules[0].modules()) + list(modules[1].modules())), mode():
                loss_p = self._loss_sum(m, x, y, mix)
            if placeholder:
                loss_p = loss_p * 0.0
            trainer.backward(loss_p * scale)
            with torch.no_grad():
                for p, kept in zip(live, saved):
                    p.copy_(kept)
            self.log(f"sam_grad_norm/{m}", gnorm)
            self.log(f"sam_eps/{m}", (gnorm > 0).to(torch.float64) * self.rho)
            self.log(f"sam_eps_real/{m}", real_sq.sqrt())
            if n_local > 0:
                self.log(f"sam_loss_rise/{m}", (loss_p.detach() - loss.detach()).double() / n_local)
        if self.gm:
            self.modify_gradients(m)
        trainer.optimizer_step()
        return value

    def partner_matrices(self, m: str) -> list[Tensor | None]:
        """T^(k) per modified layer of m (None = identity), k = :meth:`previous_modality`."""
        k = self.previous_modality(m)
        out: list[Tensor | None] = [None] * len(self._layers[m])
        if k is None or k == m or self._T.get(k) is None:
            return out
        for i, (_, mod) in enumerate(self._layers[m]):
            if i < len(self._layers[k]) and self._layers[k][i][1].weight.shape == mod.weight.shape:
                out[i] = self._T[k][i]
        return out

    @torch.no_grad()
    def modify_gradients(self, m: str) -> None:
        before = after = None  # squared norms, summed on the device
        for (_, mod), t in zip(self._layers[m], self.partner_matrices(m)):
            g = mod.weight.grad
            if g is None:
                continue
            sq = g.double().pow(2).sum()
            before = sq if before is None else before + sq
            if t is not None:
                g.copy_(modify_weight_gradient(g, t.to(g.device)))
            sq = g.double().pow(2).sum()
            after = sq if after is None else after + sq
        if before is not None:
            self.log(f"gm_ratio/{m}", torch.sqrt(after / before), weight=before > 0)

    # -- evaluation ------------------------------------------------------------------------
    def predict(self, batch) -> Output:
        out = self.model(batch["inputs"], batch["present"])
        present = batch["present"]
        if all(bool(present[m].all()) for m in self.model.modalities):
            return out
        mask = torch.stack([present[m].to(out.logits.device) for m in self.model.modalities])
        return Output(self.model.fusion.combine(out.unimodal_logits, mask), out.unimodal_logits, out.features)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"T": {m: (None if t is None else [x.detach().cpu().clone() for x in t]) for m, t in self._T.items()},
                "stage": self._stage, "steps_in_stage": self._steps_in_stage, "pending": self._pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        dev = self.trainer.device if self.trainer is not None else torch.device("cpu")
        self._T = {m: (None if t is None else [x.to(dev) for x in t]) for m, t in state["T"].items()}
        self._stage = int(state["stage"])
        self._steps_in_stage = int(state["steps_in_stage"])
        self._pending = state.get("pending")

