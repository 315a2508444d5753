"""ARL: asymmetric representation learning (Wei, Luo, Luo, "Improving Multimodal Learning via
Imbalanced Learning", ICCV 2025).

Each modality's dependence should be inversely proportional to its prediction variance; ARL
scales the gradient reaching each encoder so that modalities whose current dependence share is
below their inverse-variance target learn faster, and adds the unimodal losses (the bias terms).
The rule is :func:`arl_coefficients` (pure); :class:`ARL` only wires it into a training step.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..options import Annotated, Interval, Literal
from . import register_method
from .base import Method, build_standard_model, masked_cross_entropy

Estimator = Literal["entropy", "variance"]
Score = Literal["product", "ratio"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
SCORES: tuple[str, ...] = get_args(Score)


def default_floor(num_modalities: int) -> float:
    """0.3 for two modalities (the public code); 0.6 / M in general (60% of the uniform share)."""
    return 0.6 / max(int(num_modalities), 1)


def _as_list(unimodal_logits: Mapping[str, Tensor] | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(unimodal_logits, Mapping):
        return list(unimodal_logits.values())
    return list(unimodal_logits)


#: columns of :func:`arl_batch_statistics`
STAT_COLUMNS = ("abs_logit_sum", "entropy_sum", "p_true_sum", "p_true_sq_sum", "count")


def arl_batch_statistics(unimodal_logits: Mapping[str, Tensor] | Sequence[Tensor], labels: Tensor,
                         present: Mapping[str, Tensor] | Sequence[Tensor | None] | None = None) -> Tensor:
    """Per-modality batch *sums* ``(M, 5)`` in float64 over the samples where the modality is present:
    ``[sum_b sum_c |z_m|, sum_b entropy(softmax z_m), sum_b p_y, sum_b p_y^2, count]``.

    Sums and counts (not means) so that summing them over processes (``all_reduce_sum``) gives
    exactly the statistics of the global batch, whatever each process's share of present
    samples. ``present`` (same order/keys as ``unimodal_logits``; None = all present) masks out
    samples whose modality is absent: their z_m is only the absent-policy prediction. Detached.
    """
    zs = _as_list(unimodal_logits)
    if present is None:
        masks: list[Tensor | None] = [None] * len(zs)
    elif isinstance(present, Mapping):
        if not isinstance(unimodal_logits, Mapping):
            raise ValueError("present as a mapping needs unimodal_logits as a mapping")
        masks = [present.get(m) for m in unimodal_logits]
    else:
        masks = list(present)
    rows = []
    for z, p in zip(zs, masks):
        z = z.detach().double()
        logp = F.log_softmax(z, dim=1)
        prob = logp.exp()
        ent = -(prob * logp).sum(1)
        py = prob.gather(1, labels.view(-1, 1).long()).squeeze(1)
        per_sample = torch.stack([z.abs().sum(1), ent, py, py * py, torch.ones_like(py)], 1)  # (B, 5)
        if p is not None:
            per_sample = per_sample * p.detach().view(-1, 1).to(per_sample.dtype)
        rows.append(per_sample.sum(0))
    return torch.stack(rows)


def arl_scores(c: Tensor, w: Tensor, score: str = "product") -> Tensor:
    """The score ``r`` whose tempered softmax gives ARL's coefficients.

    ``product``: ``r_m = (M-1)^(M-1) * w_m * prod_{n != m} c_n``. For M = 2 this is exactly the
    public code's ``[c_2 w_1, c_1 w_2]``. For any M it orders modalities like ``w_m / c_m``
    (it equals ``(M-1)^(M-1) * prod_n c_n * w_m / c_m``), and the factor ``(M-1)^(M-1)`` keeps its
    range M-independent: ``prod_{n != m} c_n <= (M-1)^-(M-1)`` (reached when ``c_m -> 0`` and the
    others share equally), so ``0 <= r_m <= w_m`` for every M, as for M = 2. Without the factor
    ``T * r_m <= T / (M-1)^(M-1)`` and k is almost uniform at M = 4 and uniform at M = 6.

    ``ratio``: the literal ``r_m = w_m / c_m`` (unbounded: saturates to a one-hot k as a share
    ``c_m`` approaches 0).
    """
    if score not in SCORES:  # a direct call (the method's option is validated by the config layer)
        raise ValueError(f"arl: unknown score '{score}'; valid: {', '.join(SCORES)}")
    M = c.shape[0]
    if score == "ratio":
        return w / c.clamp_min(1e-12)
    others = torch.stack([torch.cat([c[:m], c[m + 1:]]).prod() for m in range(M)])
    return float(M - 1) ** (M - 1) * w * others


def arl_coefficients_from_statistics(stats: Tensor, T: float = 8.0, estimator: str = "entropy",
                                     floor: float | None = None, score: str = "product"
                                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ARL coefficients from :func:`arl_batch_statistics` (possibly summed over processes).

    Returns ``(k, c, v, w)``, each of shape ``(M,)`` (float32):

    * ``c_m`` dependence share: mean over present samples of sum-classes ``|z_m|``, normalised
      to sum 1;
    * ``v_m`` variance estimate, normalised to sum 1 and floored at ``floor`` (default
      :func:`default_floor`): ``entropy`` = mean prediction entropy (the public code),
      ``variance`` = variance over the present samples of the true-class probability ``p(z_m)_y``;
    * ``w_m = (1/v_m) / sum_n (1/v_n)`` inverse-variance target;
    * ``k = softmax(T * r)`` with ``r`` from :func:`arl_scores`.

    A modality with no present sample (count 0) takes no part: its ``k, c, v, w`` are 0 and the
    rule runs over the others (M = their number). With fewer than two present modalities there
    is nothing to balance and every ``k_m`` is 0 (gradient multiplier 1).
    """
    if estimator not in ESTIMATORS:  # a direct call (the method's option is validated by the config layer)
        raise ValueError(f"arl: unknown estimator '{estimator}'; valid: {', '.join(ESTIMATORS)}")
    if score not in SCORES:
        raise ValueError(f"arl: unknown score '{score}'; valid: {', '.join(SCORES)}")
    stats = stats.detach().double()
    if stats.dim() != 2 or stats.shape[1] != len(STAT_COLUMNS):
        raise ValueError(f"expected (M, {len(STAT_COLUMNS)}) statistics from arl_batch_statistics, "
                         f"got {tuple(stats.shape)}")
    M_all = stats.shape[0]
    k_all, c_all, v_all, w_all = (torch.zeros(M_all, dtype=torch.float64) for _ in range(4))
    idx = torch.nonzero(stats[:, 4] > 0).flatten()
    M = int(idx.numel())
    if M == 0:
        return k_all.float(), c_all.float(), v_all.float(), w_all.float()
    count = stats[idx, 4]
    mean = stats[idx, :4] / count.view(-1, 1)
    floor = default_floor(M) if floor is None else float(floor)
    eps = 1e-12

    def normalise(x: Tensor) -> Tensor:
        s = x.sum()
        return x / s if float(s) > eps else torch.full_like(x, 1.0 / M)

    c = normalise(mean[:, 0].clamp_min(0))
    if estimator == "entropy":
        raw = mean[:, 1].clamp_min(0)
    else:
        raw = (mean[:, 3] - mean[:, 2] ** 2).clamp_min(0)
    v = normalise(raw).clamp_min(max(floor, eps))
    inv = 1.0 / v
    w = inv / inv.sum()
    k = torch.softmax(float(T) * arl_scores(c, w, score), dim=0) if M >= 2 else torch.zeros_like(c)
    for full, part in ((k_all, k), (c_all, c), (v_all, v), (w_all, w)):
        full[idx] = part
    return k_all.float(), c_all.float(), v_all.float(), w_all.float()


def arl_coefficients(unimodal_logits: Mapping[str, Tensor] | Sequence[Tensor], labels: Tensor,
                     T: float = 8.0, estimator: str = "entropy", floor: float | None = None,
                     score: str = "product", reduce: Callable[[Tensor], Tensor] | None = None,
                     present: Mapping[str, Tensor] | Sequence[Tensor | None] | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ARL coefficients ``(k, c, v, w)`` for one batch of unimodal logits (see
    :func:`arl_coefficients_from_statistics`). ``reduce`` (e.g. ``trainer.all_reduce_sum``)
    sums the batch statistics over processes before use; ``present`` masks absent samples.

    >>> za = torch.tensor([[2.0, 0.0], [1.0, 0.0]]); zv = torch.tensor([[0.5, 0.0], [0.0, 0.5]])
    >>> k, c, v, w = arl_coefficients([za, zv], torch.tensor([0, 0]))
    >>> round(float(k.sum()), 6), bool(k[1] > k[0])   # the weaker, lower-dependence modality gets more
    (1.0, True)
    """
    stats = arl_batch_statistics(unimodal_logits, labels, present)
    if reduce is not None:
        stats = reduce(stats)
    return arl_coefficients_from_statistics(stats, T=T, estimator=estimator, floor=floor, score=score)


@register_method("arl", summary="ARL: inverse-variance gradient scaling (1 + k_m) per encoder + gamma * unimodal losses",
                 paper='Wei et al., "Improving Multimodal Learning via Imbalanced Learning"',
                 venue='ICCV', year=2025, category='optimisation')
class ARL(Method):
    """Asymmetric Representation Learning (Wei, Luo, Luo, ICCV 2025; public code
    ``shicaiwei123/ICCV2025-ARL``, ``main_arl_variance.py``).

    Per step, one forward gives the fused logits z and the unimodal logits z_m of every
    modality from the model's own fusion (no extra parameters; any fusion that yields z_m:
    concat, sum, late, shared_head, film, gated; any M; any optimizer).

    1. Loss (the bias terms): ``L = CE(z, y) + gamma * sum_m CE_m`` after warm-up; during the
       first ``warmup_epochs`` epochs ``L = CE(z, y) + sum_m CE_m`` and no gradient scaling.
       ``CE_m`` is the mean of ``CE(z_m, y)`` over the samples where modality m is present (a
       sample without m has no unimodal prediction to learn from).
    2. Detached batch statistics over the present samples of each modality, summed over
       processes (:func:`arl_coefficients`): dependence share ``c_m = mean_b sum_classes |z_m|``
       normalised to sum 1; variance estimate ``v_m`` normalised to sum 1 and floored;
       inverse-variance target ``w_m = (1/v_m)/sum_n(1/v_n)`` (the paper's minimum-variance
       weighting ``w_1 = Var(s_2)/(Var(s_1)+Var(s_2))``).
    3. ``k = softmax(T * r)``, ``r_m = (M-1)^(M-1) * w_m * prod_{n != m} c_n`` (:func:`arl_scores`).
    4. The gradient flowing into encoder m (from all losses) is multiplied by ``(1 + k_m)``:
       identity in forward, a scale in backward, on the encoder output h_m; the fusion head's
       gradient is not scaled.
    5. Gradient-norm clipping at ``grad_clip``, optimizer step.

    Options:
        T: temperature of the coefficient softmax (default 8; paper: 8 CREMA-D, 4 KS/AVE).
        gamma: weight of the unimodal losses after warm-up (default 4; 3 KS, 5 AVE).
        warmup_epochs: 0-based epochs ``0 .. warmup_epochs-1`` are warm-up (default 5). The
            public code (``main_arl_variance.py``, ``models/backbone.py``) tests ``epoch > start``
            with start = 5, i.e. six warm-up epochs: ``warmup_epochs=6`` reproduces it.
        estimator: ``entropy`` (mean prediction entropy; the public code) or ``variance``
            (variance over the batch of the unimodal true-class probability).
        floor: lower bound on the normalised variance estimate, applied with both estimators
            (keeps ``1/v_m`` finite). Default None = ``0.6 / M``, i.e. the public code's 0.3 for
            two modalities; a fixed 0.3 would make every share floored (and ``w`` uniform) for
            M >= 4, so the floor scales with the uniform share ``1/M``.
        score: ``product`` (default; ``r_m = (M-1)^(M-1) w_m prod_{n != m} c_n``) or ``ratio``
            (``r_m = w_m / c_m``).
        grad_clip: max global gradient norm, applied by the method before the optimizer step
            (default 40, as the public code; 0 or None = off). The engine's ``optim.grad_clip``
            still applies on top when set, so the tighter of the two wins.

    Decisions:
        * ``score``: the literal ratio ``r_m = w_m / c_m`` equals the public code's
          ``softmax(T * [c_2 w_1, c_1 w_2])`` for M = 2 only up to a common factor. Inside a
          tempered softmax a common factor is a change of temperature (``c_1 c_2 <= 1/4``, so
          ``w/c`` is >= 4x sharper, and unbounded as a share goes to 0), and T = 8 was tuned on
          the code's scale. The default keeps the code's form for M = 2 exactly (tested) and,
          for M > 2, the same ordering (``w_m / c_m``) with the range of r kept M-independent by
          the factor ``(M-1)^(M-1)``: the plain product ``w_m prod_{n != m} c_n`` is at most
          ``(M-1)^-(M-1)``, which makes k uniform in practice from M = 4 on (ARL would silently
          become a symmetric ``x(1 + 1/M)`` scaling). ``score="ratio"`` gives the literal
          ``w_m / c_m``.
        * Gradient scaling is applied with a tensor hook registered on h_m *after* the forward
          (``h_m.register_hook(g -> (1 + k_m) g)``): mathematically the same as ``scale_grad``
          on h_m before the fusion, but k can be computed from this very forward's z_m without
          an extra head evaluation. (The public code's first release never applies k, its
          multipliers stay 1.5; a later ``main_arl_variance.py`` sets them after the forward, so
          each step there uses the previous step's k.)
        * With the ``concat`` fusion the model is built with ``unimodal_bias="full"`` (each z_m
          carries the full bias, as the public code) unless ``model.fusion_options`` sets
          ``unimodal_bias`` explicitly. With ``gated`` it uses the public code's self-gating
          unimodal logits (``unimodal="self"``) unless ``model.fusion_options`` says otherwise.
        * Missing modalities: a sample without modality m is left out of ``CE_m`` and of m's
          statistics (the public code has no missing data). Means are taken over the present
          samples of the *global* batch: sums and counts are all-reduced (one collective per
          step on every process, whatever its data), so several processes give the update of
          one process on the global batch. A modality absent from the whole global batch gets
          ``k_m = 0`` and the rule runs over the others. The fused loss and the absent
          modality's encoder still follow the model's absent policy.

    Diagnostics per epoch (means over steps): ``k_<m>``, ``c_<m>``, ``v_<m>``, ``w_<m>`` (also
    during warm-up, where k is computed but not applied) and ``arl_active`` (1 after warm-up).
    Cost: ~1.0x joint training (the statistics are scalars per modality).
    """

    def __init__(self, T: Annotated[float, Interval(0, None, closed="neither")] = 8.0,
                 gamma: Annotated[float, Interval(0, None)] = 4.0,
                 warmup_epochs: Annotated[int, Interval(0, None)] = 5,
                 estimator: Estimator = "entropy",
                 floor: Annotated[float, Interval(0, 1, closed="left")] | None = None,
                 score: Score = "product",
                 grad_clip: Annotated[float, Interval(0, None)] | None = 40.0):
        super().__init__()
        self.T = float(T)
        self.gamma = float(gamma)
        self.warmup_epochs = int(warmup_epochs)
        self.estimator = estimator
        self.floor = None if floor is None else float(floor)
        self.score = score
        self.grad_clip = None if grad_clip in (None, 0) else float(grad_clip)

    def build_model(self, spec):
        if spec.fusion == "concat" and "unimodal_bias" not in spec.fusion_options:
            return build_standard_model(spec, unimodal_bias="full")
        if spec.fusion == "gated" and "unimodal" not in spec.fusion_options:
            # the public code's self-gating unimodal logits (zero-the-others barely learns)
            return build_standard_model(spec, unimodal="self")
        return build_standard_model(spec)

    # -- one step --------------------------------------------------------------------------
    def active(self) -> bool:
        """True after warm-up (gamma and the gradient scaling apply)."""
        return self.trainer.epoch >= self.warmup_epochs

    def forward_loss(self, batch, scale: bool, gamma: float):
        """Forward, loss and (if ``scale``) the ``(1 + k_m)`` hooks on each encoder output.

        Returns ``(loss, parts, (k, c, v, w))``; ``loss.backward()`` then yields ARL's gradients.
        """
        model, tr = self.model, self.trainer
        mods = model.modalities
        y = batch["label"]
        present = batch.get("present") or {}
        with tr.autocast():
            feats = model.encode_all(batch["inputs"], present)
            out = model.fuse(feats, present)
        zs = [out.unimodal_logits[m] for m in mods]
        masks = [present.get(m) for m in mods]
        stats = tr.all_reduce_sum(arl_batch_statistics(zs, y, masks))  # one collective, every step
        k, c, v, w = arl_coefficients_from_statistics(stats, T=self.T, estimator=self.estimator,
                                                      floor=self.floor, score=self.score)
        if scale:
            for i, m in enumerate(mods):
                if feats[m].requires_grad:
                    feats[m].register_hook(_grad_scaler(1.0 + float(k[i])))
        loss_fused = self.ce(out.logits, y)
        world = tr.world_size
        loss_uni = sum(masked_cross_entropy(zs[i], y, masks[i], stats[i, 4], world) for i in range(len(mods)))
        loss = loss_fused + gamma * loss_uni
        return loss, {"loss_fused": loss_fused.detach(), "loss_unimodal": loss_uni.detach()}, (k, c, v, w)

    def training_step(self, batch):
        tr = self.trainer
        active = self.active()
        loss, parts, (k, c, v, w) = self.forward_loss(batch, scale=active, gamma=self.gamma if active else 1.0)
        tr.zero_grad()
        tr.backward(loss)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        tr.optimizer_step()
        for i, m in enumerate(self.model.modalities):
            self.log(f"k_{m}", k[i])
            self.log(f"c_{m}", c[i])
            self.log(f"v_{m}", v[i])
            self.log(f"w_{m}", w[i])
        self.log("arl_active", float(active))
        return {"loss": float(loss.detach()), **{n: float(t) for n, t in parts.items()}}


def _grad_scaler(s: float):
    def hook(g: Tensor) -> Tensor:
        return g * s

    return hook


__all__ = ["ARL", "STAT_COLUMNS", "arl_batch_statistics", "arl_coefficients", "arl_coefficients_from_statistics",
           "arl_scores", "default_floor", "masked_cross_entropy"]
