"""MSES (Fujimori et al. 2019): modality-specific early stopping."""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, get_args

import torch
import torch.nn.functional as F

from ..options import Annotated, Interval, Literal
from . import register_method
from .base import Method

Rollback = Literal["none", "encoder", "model"]
ROLLBACKS: tuple[str, ...] = get_args(Rollback)


def mses_update(best: float, bad_epochs: int, loss: float, patience: int, min_delta: float = 0.0
                ) -> tuple[float, int, bool]:
    """One epoch of early-stopping bookkeeping for one modality.

    An epoch improves when ``loss < best - min_delta``: the best is updated and the counter
    reset; otherwise the counter grows. Returns ``(best, bad_epochs, stop)`` with
    ``stop = bad_epochs >= patience``.
    """
    if loss < best - min_delta:
        return float(loss), 0, False
    bad_epochs += 1
    return float(best), bad_epochs, bad_epochs >= patience


def mses_smoothed_loss(previous: float | None, loss: float, smoothing: float) -> float:
    """The score an epoch is judged by: ``smoothing * L(t-1) + (1 - smoothing) * L(t)``, a blend
    of this epoch's raw validation loss with the previous epoch's *raw* loss (not a running
    average); the first epoch (``previous`` None) uses its own loss. ``smoothing = 0`` is the raw
    loss; the AGM repository uses 0.6 (``run/CREMAD_main.py``, MSES branch)."""
    if previous is None or smoothing == 0.0:
        return float(loss)
    return float(smoothing * previous + (1.0 - smoothing) * loss)


def _snapshot(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


@register_method("mses", summary="MSES: modality-specific early stopping (freeze an encoder when its val loss stalls)",
                 paper='Fujimori et al., "Modality-specific Learning Rate Control for Multimodal Classification"',
                 venue='ACPR', year=2019, category='optimisation')
class MSES(Method):
    """Modality-Specific Early Stopping (Fujimori et al. 2019).

    Loss: CE of the fused logits (any fusion). After every epoch each still-training modality m
    is scored by its validation loss ``CE(z_m, y)`` (its unimodal logits on the *validation*
    split — model-selection data, never test), optionally smoothed (``loss_smoothing``,
    :func:`mses_smoothed_loss`). When that score has not improved by more than ``min_delta``
    for ``patience`` consecutive epochs (:func:`mses_update`), modality m is *stopped*: its
    encoder's parameters get ``requires_grad = False`` (so their gradients stay None and no
    optimizer — momentum, Adam moments, weight decay — moves them; the optimizer skips
    parameters without a gradient) and the encoder runs in eval mode for the rest of training
    (BatchNorm running statistics frozen, no dropout), i.e. it is a fixed feature extractor.
    The fusion head (including per-modality heads of ``sum``/``late``) keeps training on the
    fused loss. Stopping is permanent; the stopped set, bests, counters and rollback snapshots
    are in ``state_dict`` (``--resume``).

    Options:
        patience: epochs without improvement before stopping a modality (default 5; the stop
            comes at the ``patience``-th non-improving epoch in a row).
        min_delta: the improvement that counts (default 0.0).
        loss_smoothing: weight of the previous epoch's raw validation loss in the score
            (default 0.0: the raw loss). The AGM repository's MSES baseline uses 0.6.
        rollback: what happens to the weights when a modality stops: ``none`` (default: it
            freezes where it is), ``encoder`` (its encoder's parameters and buffers return to
            their values at the end of the modality's best epoch, then freeze) or ``model`` (the
            AGM repository: the *whole* model and the optimizer state return to that epoch's,
            as its ``run/CREMAD_main.py`` reloads the checkpoint of the modality's best epoch;
            the learning-rate schedule is not rewound, and encoders stopped earlier keep their
            frozen weights where the repository would reload them too).

    The AGM repository's MSES baseline is ``loss_smoothing=0.6, patience=81, rollback=model``
    (it stops when ``epoch - best_epoch > 80``, i.e. at the 81st epoch without improvement).
    Other departures of that code not reproduced: its "stop" multiplies the gradients by 0
    (SGD weight decay and momentum still move the weights, BatchNorm keeps updating) and acts
    only inside its modulation window; it scores on the test split.

    Diagnostics: ``stopped_<modality>`` (1 once stopped), ``val_loss_<modality>`` (raw), and
    ``val_score_<modality>`` (the smoothed score) when ``loss_smoothing > 0``.
    Cost: ~1x joint training plus one validation pass per epoch (cheaper once encoders stop);
    ``rollback`` keeps a copy of the encoder (``encoder``) or of the model and optimizer state
    (``model``) per modality, also in the checkpoints.
    Note for DDP: parameters frozen mid-run need ``find_unused_parameters``.
    """

    def __init__(self, patience: Annotated[int, Interval(1, None)] = 5,
                 min_delta: Annotated[float, Interval(0, None)] = 0.0,
                 loss_smoothing: Annotated[float, Interval(0, 1, closed="left")] = 0.0,
                 rollback: Rollback = "none"):
        super().__init__()
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.loss_smoothing = float(loss_smoothing)
        self.rollback = rollback
        self.best: dict[str, float] = {}
        self.bad_epochs: dict[str, int] = {}
        self.previous: dict[str, float | None] = {}
        self.snapshots: dict[str, Any] = {}
        self.stopped: list[str] = []

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.best = {m: math.inf for m in self.model.modalities}
        self.bad_epochs = {m: 0 for m in self.model.modalities}
        self.previous = {m: None for m in self.model.modalities}

    # ------------------------------------------------------------------ freezing
    def freeze(self, m: str) -> None:
        if m not in self.stopped:
            self.stopped.append(m)
        for p in self.model.encoders[m].parameters():
            p.requires_grad_(False)
            p.grad = None
        self.model.encoders[m].eval()

    def training_step(self, batch):
        for m in self.stopped:  # the engine puts the model in train mode every epoch
            self.model.encoders[m].eval()
        _, loss = self.fused_forward(batch)
        self.trainer.step(loss)
        return {"loss": loss.detach()}

    # ------------------------------------------------------------------ rollback
    def take_snapshot(self, m: str) -> None:
        """Remember the weights to return to if ``m`` stops (its best epoch so far)."""
        if self.rollback == "encoder":
            self.snapshots[m] = _snapshot(self.model.encoders[m].state_dict())
        elif self.rollback == "model":
            self.snapshots[m] = {"model": _snapshot(self.model.state_dict()),
                                 "optimizer": copy.deepcopy(self.trainer.optimizer.state_dict()["state"])}

    def roll_back(self, m: str) -> None:
        snap = self.snapshots.get(m)
        if snap is None:
            return
        if self.rollback == "encoder":
            self.model.encoders[m].load_state_dict(snap)
        elif self.rollback == "model":
            frozen = {s: _snapshot(self.model.encoders[s].state_dict()) for s in self.stopped if s != m}
            self.model.load_state_dict(snap["model"])
            for s, st in frozen.items():  # encoders stopped earlier keep their frozen weights
                self.model.encoders[s].load_state_dict(st)
            opt = self.trainer.optimizer
            current = opt.state_dict()  # keep the current param groups (learning rate, schedule)
            opt.load_state_dict({"state": copy.deepcopy(snap["optimizer"]), "param_groups": current["param_groups"]})

    # ------------------------------------------------------------------ validation loss
    def unimodal_val_loss(self) -> dict[str, float]:
        """Mean CE of each modality's unimodal logits on the validation split (present samples)."""
        return self.unimodal_validation(lambda z, y: F.cross_entropy(z, y, reduction="none"))

    def on_epoch_end(self, epoch: int) -> None:
        losses = self.unimodal_val_loss()
        for m, loss in losses.items():
            self.log(f"val_loss_{m}", loss)
            score = mses_smoothed_loss(self.previous.get(m), loss, self.loss_smoothing)
            self.previous[m] = float(loss)
            if self.loss_smoothing > 0:
                self.log(f"val_score_{m}", score)
            if m not in self.stopped:
                self.best[m], self.bad_epochs[m], stop = mses_update(
                    self.best[m], self.bad_epochs[m], score, self.patience, self.min_delta)
                if self.bad_epochs[m] == 0:
                    self.take_snapshot(m)
                if stop:
                    self.roll_back(m)
                    self.freeze(m)
            self.log(f"stopped_{m}", float(m in self.stopped))
        for m in self.stopped:  # the validation pass left the whole model in train mode
            self.model.encoders[m].eval()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"stopped": list(self.stopped), "best": dict(self.best), "bad_epochs": dict(self.bad_epochs),
                "previous": dict(self.previous), "snapshots": self.snapshots}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.best = {m: float(v) for m, v in state.get("best", self.best).items()}
        self.bad_epochs = {m: int(v) for m, v in state.get("bad_epochs", self.bad_epochs).items()}
        self.previous = {m: (None if v is None else float(v)) for m, v in state.get("previous", self.previous).items()}
        self.snapshots = copy.deepcopy(dict(state.get("snapshots", {})))
        stopped = list(state.get("stopped", []))
        for m in self.model.modalities:  # a checkpoint from before a stop un-freezes (best.pt)
            if m not in stopped and m in self.stopped:
                for p in self.model.encoders[m].parameters():
                    p.requires_grad_(True)
        self.stopped = []
        for m in stopped:
            self.freeze(m)
