"""MSES (Fujimori et al. 2019): modality-specific early stopping."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch.nn.functional as F

from ..registry import ConfigError
from . import register_method
from .base import Method


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


@register_method("mses", summary="MSES: modality-specific early stopping (freeze an encoder when its val loss stalls)")
class MSES(Method):
    """Modality-Specific Early Stopping (Fujimori et al. 2019).

    Loss: CE of the fused logits (any fusion). After every epoch each still-training modality m
    is scored by its validation loss ``CE(z_m, y)`` (its unimodal logits on the *validation*
    split — model-selection data, never test). When that loss has not improved by more than
    ``min_delta`` for ``patience`` consecutive epochs (:func:`mses_update`), modality m is
    *stopped*: its encoder's parameters get ``requires_grad = False`` (so their gradients stay
    None and no optimizer — momentum, Adam moments, weight decay — moves them; the optimizer
    skips parameters without a gradient) and the encoder runs in eval mode for the rest of
    training (BatchNorm running statistics frozen, no dropout), i.e. it is a fixed feature
    extractor. The fusion head (including per-modality heads of ``sum``/``late``) keeps
    training on the fused loss. Stopping is permanent; the stopped set, bests and counters are
    in ``state_dict`` (``--resume``).

    Options:
        patience: epochs without improvement before stopping a modality (default 5).
        min_delta: the improvement that counts (default 0.0).

    Diagnostics: ``stopped_<modality>`` (1 once stopped), ``val_loss_<modality>``.
    Cost: ~1x joint training plus one validation pass per epoch (cheaper once encoders stop).
    Note for DDP: parameters frozen mid-run need ``find_unused_parameters``.
    """

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        super().__init__()
        if int(patience) < 1:
            raise ConfigError(f"mses option patience must be >= 1, got {patience}")
        if float(min_delta) < 0:
            raise ConfigError(f"mses option min_delta must be >= 0, got {min_delta}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best: dict[str, float] = {}
        self.bad_epochs: dict[str, int] = {}
        self.stopped: list[str] = []

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.best = {m: math.inf for m in self.model.modalities}
        self.bad_epochs = {m: 0 for m in self.model.modalities}

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
        return {"loss": float(loss.detach())}

    # ------------------------------------------------------------------ validation loss
    def unimodal_val_loss(self) -> dict[str, float]:
        """Mean CE of each modality's unimodal logits on the validation split (present samples)."""
        return self.unimodal_validation(lambda z, y: F.cross_entropy(z, y, reduction="none"))

    def on_epoch_end(self, epoch: int) -> None:
        losses = self.unimodal_val_loss()
        for m, loss in losses.items():
            self.log(f"val_loss_{m}", loss)
            if m not in self.stopped:
                self.best[m], self.bad_epochs[m], stop = mses_update(
                    self.best[m], self.bad_epochs[m], loss, self.patience, self.min_delta)
                if stop:
                    self.freeze(m)
            self.log(f"stopped_{m}", float(m in self.stopped))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"stopped": list(self.stopped), "best": dict(self.best), "bad_epochs": dict(self.bad_epochs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.best = {m: float(v) for m, v in state.get("best", self.best).items()}
        self.bad_epochs = {m: int(v) for m, v in state.get("bad_epochs", self.bad_epochs).items()}
        stopped = list(state.get("stopped", []))
        for m in self.model.modalities:  # a checkpoint from before a stop un-freezes (best.pt)
            if m not in stopped and m in self.stopped:
                for p in self.model.encoders[m].parameters():
                    p.requires_grad_(True)
        self.stopped = []
        for m in stopped:
            self.freeze(m)
