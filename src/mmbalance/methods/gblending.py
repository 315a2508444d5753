"""G-Blending (Wang, Tran & Feiszli, CVPR 2020): gradient blending of unimodal and fused losses.

The loss blends the M unimodal outputs and the fused output,
``L = sum_k w_k CE(z_k, y)``, with weights from each output's generalisation / overfitting
trade-off measured on a held-out part of the *training* split (never val or test).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ..data.base import labels_of, stratified_split
from ..models import Fusion, MultimodalModel
from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from . import register_method
from ..utils import epoch_seed, to_device
from .base import Method, ModelSpec, build_standard_model

FUSED = "fused"
Heads = Literal["separate", "fusion"]
NegativeGain = Literal["zero", "abs"]
HEADS: tuple[str, ...] = get_args(Heads)


def gblending_weights(train_losses_before: Sequence[float] | Tensor, train_losses_after: Sequence[float] | Tensor,
                      val_losses_before: Sequence[float] | Tensor, val_losses_after: Sequence[float] | Tensor,
                      eps: float = 1e-6, negative_gain: str = "zero") -> Tensor:
    """Blending weights from loss curves (paper Eq. 5-7, "OGR" = overfitting-to-generalisation ratio).

    For each output k: gain ``dG = L^V_N - L^V_{N+n}``; overfitting ``O = L^V - L^T`` and
    ``dO = O_{N+n} - O_N``; ``w_k ∝ dG_k / (dO_k^2 + eps)``, normalised to sum 1.
    ``negative_gain="zero"`` (default): an output whose held-out loss did not improve
    (dG <= 0) gets weight 0; ``"abs"``: ``|dG| / (dO^2 + eps)`` as BalanceBenchmark's code does.
    If every raw weight is 0, the weights are uniform.

    Two outputs, both starting at loss 2.0: gains 0.5 and 0.4, overfitting changes 0.5 and 0.1,
    raw weights 0.5 / 0.25 = 2 and 0.4 / 0.01 = 40 (eps aside), normalised 2/42 and 40/42:

    >>> w = gblending_weights([2.0, 2.0], [1.0, 1.5], [2.0, 2.0], [1.5, 1.6])
    >>> [round(x, 4) for x in w.tolist()]
    [0.0476, 0.9524]
    """
    if negative_gain not in get_args(NegativeGain):  # a direct call (the option is validated by the config layer)
        raise ValueError(f"gblending: negative_gain must be 'zero' or 'abs', got {negative_gain!r}")
    t0, t1, v0, v1 = (torch.as_tensor(x, dtype=torch.float64) for x in
                      (train_losses_before, train_losses_after, val_losses_before, val_losses_after))
    gain = v0 - v1
    overfit = (v1 - t1) - (v0 - t0)
    gain = gain.clamp(min=0.0) if negative_gain == "zero" else gain.abs()
    raw = gain / (overfit ** 2 + eps)
    total = raw.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(raw, 1.0 / raw.numel())
    return raw / total


def holdout_split(labels: Tensor | Sequence[int], fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded stratified split of training positions into (train part, held-out part)."""
    if not 0.0 < fraction < 1.0:  # a direct call (the option is validated by the config layer)
        raise ValueError(f"gblending: holdout_fraction must be in (0, 1), got {fraction}")
    import numpy as np

    tr, ho = stratified_split(np.asarray(labels), [1.0 - fraction, fraction], seed)
    if len(ho) == 0 or len(tr) == 0:
        raise ConfigError(f"gblending: holdout_fraction {fraction} leaves an empty part of the "
                          f"{len(labels)}-sample training split")
    return torch.as_tensor(tr), torch.as_tensor(ho)


class BlendingHeads(Fusion):
    """The run's fusion for the fused logits, plus one linear classifier per modality on that
    modality's encoder feature for the unimodal logits: the M + 1 separately parameterised
    outputs of the paper's multi-task network (``unimodal_heads="separate"``).

    Built by the ``gblending`` method only (not in the fusion registry; its ``name`` is the
    inner fusion's, which produces the fused prediction)."""

    def __init__(self, fusion: Fusion, name: str):
        super().__init__(fusion.feature_dims, fusion.num_classes)
        self.inner = fusion
        self.name = name
        self.heads = nn.ModuleDict({m: nn.Linear(d, fusion.num_classes) for m, d in fusion.feature_dims.items()})

    def forward(self, features):
        z, _ = self.inner(features)
        return z, {m: self.heads[m](features[m]) for m in self.modalities}


@register_method("gblending", summary="G-Blending: losses of unimodal + fused outputs blended by held-out OGR weights",
                 paper='Wang et al., "What Makes Training Multi-modal Classification Networks Hard?"',
                 venue='CVPR', year=2020, category='objective')
class GBlending(Method):
    """Gradient-Blending (Wang et al. 2020).

    Loss (paper Eq. 7 with the M + 1 outputs): ``L = sum_k w_k CE(z_k, y)`` over k in {each
    modality m (unimodal logits z_m), fused z}. Inference: the fused logits.

    Outputs (``unimodal_heads``): ``"separate"`` (default) adds one linear classifier per
    modality on its encoder feature, next to the run's fusion, which keeps producing z — the
    paper's network, whose uni-modal and multi-modal outputs each have their own classifier
    (also the G-Blending ("OGR") model of the PMR repository, ``models/OGR_model.py``).
    ``"fusion"`` uses the fusion's own unimodal logits instead (for ``concat``: slices of the
    fused layer, z_m = W_m h_m + b/M, as BalanceBenchmark's G-Blending does): the unimodal
    losses then also move the fused classifier's weights, which the paper's blend does not
    model. Per-modality metrics report whichever z_m the loss trains.

    Weights (paper Eq. 5-6 "OGR", Algorithm 1): the training split is divided, seeded and
    stratified, into a training part T and a held-out part V (``holdout_fraction``). For each
    output k, a deep copy of the model is trained for ``estimate_epochs`` (n) epochs on T with
    the loss CE(z_k) only — a modality's copy sees that modality alone (the others absent under
    the model's ``absent_policy``; z_m depends on h_m only for separate heads and for every
    built-in fusion), the fused copy sees everything. Losses of output k on T and V (eval mode)
    before and after give ``dG = L^V_N - L^V_{N+n}``, ``dO = O_{N+n} - O_N`` with
    ``O = L^V - L^T``, and ``w_k ∝ dG_k / (dO_k^2 + eps)`` normalised to sum 1
    (:func:`gblending_weights`). Validation and test splits are never read by the estimate.

    Options:
        mode: ``"offline"`` (default; estimate once, from the initialisation, before epoch 1;
            copies use a fresh optimizer of the run's config) or ``"online"`` (re-estimate at
            the start of every ``super_epoch``-th epoch from the current weights; copies start
            from the current optimizer state).
        estimate_epochs: n, epochs each copy trains (default 5).
        super_epoch: online re-estimation period in epochs (default 10).
        holdout_fraction: share of the training split held out as V (default 0.2).
        holdout_seed: seed of the split (default None = the run's ``train.seed``).
        eps: added to dO^2 (default 1e-6; guards against dO = 0 only).
        negative_gain: ``"zero"`` (default: an output whose held-out loss got worse gets
            weight 0 — no generalisation gain, nothing to blend in) or ``"abs"`` (BalanceBenchmark
            code: |dG|, which hides that sign flip).
        train_on_holdout: whether the main model trains on the full training split (T + V).
            None (default) = True for offline (V only matters before training starts) and False
            for online (the checkpoint each online estimate starts from must not have seen V,
            else L^V is a training loss).
        unimodal_heads: ``"separate"`` (default, the paper) or ``"fusion"`` (see Outputs).

    Decisions: L^T is measured in eval mode on T after (not during) the copy's epochs, so
    dropout does not bias the overfitting estimate; the copies train like the main model — the
    run's global batch, shuffled per epoch from the epoch's seed, a trailing batch of one sample
    dropped (BatchNorm), the run's gradient clip — and their RNG draws are inside the epoch's
    seeded stream, so ``--resume`` reproduces them; the weights are kept in ``state_dict``.
    Several processes: the estimate is computed once, sharded like training itself — every rank
    trains its share of each global batch of every copy, gradients averaged over ranks after
    each backward and buffers broadcast after each step (so the copies stay identical on every
    rank and follow what one process does on the same global batches), and the loss passes use
    ``trainer.shard`` with summed statistics — rather than repeated whole on every rank.
    Diagnostics: ``w_<modality>``, ``w_fused`` (every epoch), and at estimate epochs
    ``gain_<k>``/``overfit_<k>``. Cost: offline (M + 1) * n extra epochs once; online that
    every ``super_epoch`` epochs (about (M + 1) * n / super_epoch times joint training).
    """

    def __init__(self, mode: Literal["offline", "online"] = "offline",
                 estimate_epochs: Annotated[int, Interval(1, None)] = 5,
                 super_epoch: Annotated[int, Interval(1, None)] = 10,
                 holdout_fraction: Annotated[float, Interval(0, 1, closed="neither")] = 0.2,
                 holdout_seed: Annotated[int, Interval(0, None)] | None = None,
                 eps: Annotated[float, Interval(0, None)] = 1e-6,
                 negative_gain: NegativeGain = "zero", train_on_holdout: bool | None = None,
                 unimodal_heads: Heads = "separate"):
        super().__init__()
        self.mode = mode
        self.estimate_epochs = int(estimate_epochs)
        self.super_epoch = int(super_epoch)
        self.holdout_fraction = float(holdout_fraction)
        self.holdout_seed = holdout_seed
        self.eps = float(eps)
        self.negative_gain = negative_gain
        self.train_on_holdout = train_on_holdout
        self.unimodal_heads = unimodal_heads
        self.weights: dict[str, float] | None = None

    # ------------------------------------------------------------------ setup
    def build_model(self, spec: ModelSpec) -> MultimodalModel:
        model = build_standard_model(spec)
        if self.unimodal_heads == "separate":
            model.fusion = BlendingHeads(model.fusion, spec.fusion)
        return model

    def setup(self, trainer) -> None:
        super().setup(trainer)
        seed = trainer.cfg.train.seed if self.holdout_seed is None else int(self.holdout_seed)
        self.train_idx, self.holdout_idx = holdout_split(labels_of(trainer.data.train), self.holdout_fraction, seed)
        self.outputs = [*self.model.modalities, FUSED]

    @property
    def _trains_on_holdout(self) -> bool:
        return (self.mode == "offline") if self.train_on_holdout is None else bool(self.train_on_holdout)

    def train_dataset(self, epoch: int, dataset: Dataset) -> Dataset:
        return dataset if self._trains_on_holdout else Subset(dataset, self.train_idx.tolist())

    def estimate_due(self, epoch: int) -> bool:
        """Offline: only while no weights exist; online: at every ``super_epoch``-th epoch (0-based
        0, S, 2S, ...) and whenever no weights exist."""
        if self.weights is None:
            return True
        return self.mode == "online" and epoch % self.super_epoch == 0

    def on_epoch_start(self, epoch: int) -> None:
        if self.estimate_due(epoch):
            self.weights = self.estimate_weights()

    # ------------------------------------------------------------------ estimation
    def _output_loss(self, model, batch, k: str, reduction: str = "mean") -> Tensor:
        present = batch["present"]
        if k != FUSED:  # only modality k present; the others absent under the model's policy
            h = model.encode(k, batch["inputs"][k], present[k])
            feats = {m: (h if m == k else h.new_zeros(h.shape[0], model.feature_dim(m))) for m in model.modalities}
            out = model.fuse_subset(feats, keep=[k])
            logits = out.unimodal_logits[k]
        else:
            logits = model(batch["inputs"], present).logits
        return F.cross_entropy(logits.float(), batch["label"], reduction=reduction)

    @torch.no_grad()
    def _mean_loss(self, model, dataset: Dataset, k: str) -> float:
        """Mean CE of output k over ``dataset`` in eval mode, sharded over the processes."""
        tr = self.trainer
        was = model.training
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=tr.device)
        for batch in tr.loader(tr.shard(dataset)):
            batch = to_device(batch, tr.device)
            with tr.autocast():
                loss = self._output_loss(model, batch, k, reduction="sum")
            total[0] += loss.double()
            total[1] += len(batch["label"])
        model.train(was)
        total = tr.all_reduce_sum(total)
        return float(total[0] / total[1].clamp(min=1))

    def _train_copy(self, model, opt, fit_set: Dataset, k: str) -> None:
        """``estimate_epochs`` epochs of CE(z_k) on ``fit_set``, as the engine trains: global
        batches sharded over the processes, gradients averaged, buffers broadcast."""
        tr = self.trainer
        tc, clip = tr.cfg.train, tr.cfg.optim.grad_clip
        drop_last = tr.drop_last_for(len(fit_set))
        for e in range(self.estimate_epochs):
            model.train()
            loader = tr.loader(fit_set, shuffle=True, batch_size=tc.batch_size,
                               seed=epoch_seed(tc.seed, tr.epoch) + 1 + e, drop_last=drop_last, shard=True)
            for batch in tr.progress(loader, desc=f"g-blending estimate {k} {e + 1}/{self.estimate_epochs}"):
                batch = to_device(batch, tr.device)
                with tr.autocast():
                    loss = self._output_loss(model, batch, k)
                tr.check_finite(loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                tr.average_gradients(model.parameters())
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                tr.broadcast_buffers(model)

    def estimate_weights(self) -> dict[str, float]:
        """Train one copy per output on T, measure losses on T and V, return normalised weights.
        The main model is not changed (copies only) and keeps its train/eval mode."""
        tr = self.trainer
        was_training = self.model.training
        base = tr.data.train_eval if tr.data.train_eval is not None else tr.data.train
        part_t, part_v = self.train_idx.tolist(), self.holdout_idx.tolist()
        fit_set = Subset(tr.data.train, part_t)
        eval_t, eval_v = Subset(base, part_t), Subset(base, part_v)
        curves = {name: [] for name in ("t0", "t1", "v0", "v1")}
        for k in self.outputs:
            model = copy.deepcopy(self.model)
            opt = tr.make_optimizer(model.parameters())
            if self.mode == "online":
                opt.load_state_dict(tr.optimizer.state_dict())
            curves["t0"].append(self._mean_loss(model, eval_t, k))
            curves["v0"].append(self._mean_loss(model, eval_v, k))
            self._train_copy(model, opt, fit_set, k)
            curves["t1"].append(self._mean_loss(model, eval_t, k))
            curves["v1"].append(self._mean_loss(model, eval_v, k))
            del model, opt
        w = gblending_weights(curves["t0"], curves["t1"], curves["v0"], curves["v1"], self.eps, self.negative_gain)
        for i, k in enumerate(self.outputs):
            self.log(f"gain_{k}", curves["v0"][i] - curves["v1"][i])
            self.log(f"overfit_{k}", (curves["v1"][i] - curves["t1"][i]) - (curves["v0"][i] - curves["t0"][i]))
        self.model.train(was_training)
        return {k: float(w[i]) for i, k in enumerate(self.outputs)}

    # ------------------------------------------------------------------ training
    def blended_loss(self, out, y: Tensor) -> Tensor:
        w = self.weights
        assert w is not None
        loss = w[FUSED] * self.ce(out.logits, y)
        for m, z in out.unimodal_logits.items():
            loss = loss + w[m] * self.ce(z, y)
        return loss

    def training_step(self, batch):
        if self.weights is None:  # e.g. training_step used without the epoch hooks
            self.weights = self.estimate_weights()
        with self.trainer.autocast():
            out = self.model(batch["inputs"], batch["present"])
        loss = self.blended_loss(out, batch["label"])
        self.trainer.step(loss)
        return {"loss": loss.detach()}

    def on_epoch_end(self, epoch: int) -> None:
        for k, v in (self.weights or {}).items():
            self.log(f"w_{k}", v)

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights) if self.weights is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        w = state.get("weights")
        self.weights = dict(w) if w is not None else None
