"""UME: the uni-modal ensemble (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal
Learning", ICML 2023): train each modality alone, average the members' predictions at test time.

The prediction rule is :func:`ensemble_logits` (pure); :class:`Ensemble` trains the members.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import Output
from ..options import Literal
from ..registry import ConfigError
from . import register_method
from .base import Method, build_standard_model
from .unimodal_pretrain import as_folders, check_run_folders, copy_weights_, read_run_weights, reduced_member_losses

COMBINES = ("probabilities", "logits")


def ensemble_logits(unimodal_logits: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None,
                    combine: str = "probabilities") -> Tensor:
    """The ensemble's prediction ``(B, C)`` from the members' logits, over the modalities present
    for each sample (all when ``present`` is None).

    ``probabilities``: ``log(mean_m softmax(z_m))``, so that its softmax is the members' mean
    probability (argmax, mAP and the NLL all refer to it). ``logits``: ``mean_m z_m``. A sample
    with no modality present gets a uniform prediction.

    >>> z = {"a": torch.tensor([[2.0, 0.0]]), "b": torch.tensor([[0.0, 4.0]])}
    >>> [round(p, 4) for p in ensemble_logits(z).softmax(1)[0].tolist()]  # (0.8808 + 0.0180) / 2, ...
    [0.4494, 0.5506]
    >>> only_a = {"a": torch.tensor([True]), "b": torch.tensor([False])}
    >>> [round(p, 4) for p in ensemble_logits(z, only_a).softmax(1)[0].tolist()]
    [0.8808, 0.1192]
    """
    if combine not in COMBINES:
        raise ConfigError(f"ensemble: unknown combine '{combine}'; valid: {', '.join(COMBINES)}")
    zs = torch.stack([z.float() for z in unimodal_logits.values()])  # (M, B, C)
    if present is None:
        w = torch.ones(zs.shape[:2], dtype=zs.dtype, device=zs.device)
    else:
        w = torch.stack([present[m].view(-1).to(zs.dtype) for m in unimodal_logits])  # (M, B)
    count = w.sum(0).clamp_min(1.0).unsqueeze(1)
    if combine == "logits":
        return (zs * w.unsqueeze(2)).sum(0) / count
    p = (zs.softmax(dim=2) * w.unsqueeze(2)).sum(0) / count
    none = w.sum(0) == 0
    if bool(none.any()):
        p[none] = 1.0 / zs.shape[2]
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


@register_method("ensemble", summary="UME: one network per modality trained alone; average the members' probabilities",
                 paper='Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning"',
                 venue="ICML", year=2023, category="baseline")
class Ensemble(Method):
    """Uni-Modal Ensemble (UME; Du et al., ICML 2023): each modality is trained alone and the
    members' predictions are averaged at test time; no joint training.

    Model: one network per modality — its encoder and a linear head of its own (the ``late``
    fusion's per-modality heads), no shared parameter. Training loss: ``sum_m CE_m``, with
    ``CE_m`` the mean CE of member m's logits over the samples of the global batch where m is
    present. With disjoint parameters each member's gradient is exactly that of training it
    alone on the same batches (one exception: ``optim.grad_clip``, off by default, clips the
    members' joint gradient norm). Prediction (:func:`ensemble_logits`): the mean of the
    members' probabilities (``combine="logits"``: of their logits) over the modalities present
    for each sample; the per-modality metrics are the members'.

    Model selection: the engine selects one epoch — the one with the best *ensemble* validation
    metric — for all members together. Members selected each on its own validation curve are
    separate runs: train one ``unimodal`` run per modality (each keeps its best epoch) and give
    their folders to ``members_from``; listed members are loaded from those runs' ``best.pt``
    before the first epoch and then kept fixed (not trained), the others train as above. With
    every member listed nothing is trained: run it with ``--epochs 1`` (one pass that only
    evaluates the ensemble). The folders are read once; ``mmbalance evaluate`` does not need them.

    Options:
        combine: how the members' predictions are averaged: ``probabilities`` (default, their
            softmax) or ``logits``.
        members_from: ``{modality: run folder}`` of finished ``unimodal`` (or ``ensemble``) runs
            whose encoder and linear head become that member, fixed; default none.

    Decisions: only ``--fusion late`` (or the default ``concat``, ignored) is accepted, since the
    members share nothing; a sample's absent modalities take no part in its prediction, and
    their samples no part in that member's loss (a separate ``unimodal`` run trains on every
    sample, absent ones with a zero input).

    Diagnostics: ``ce_<m>`` (each trained member's training CE, global mean over present
    samples), ``trained_members``. Cost: one forward/backward per encoder per step (as joint
    training); prediction at no extra cost.
    """

    required_fusion = "late"

    def __init__(self, combine: Literal["probabilities", "logits"] = "probabilities",
                 members_from: dict[str, str] | None = None):
        super().__init__()
        self.combine = combine
        self.members_from = as_folders(members_from)

    def build_model(self, spec):
        if spec.fusion not in ("concat", "late"):
            raise ConfigError(f"ensemble builds one network per modality and shares nothing; --fusion {spec.fusion} "
                              "is not used (choose the test-time rule with --method.combine probabilities|logits)")
        return build_standard_model(spec, fusion="late")

    def setup(self, trainer) -> None:
        super().setup(trainer)
        mods = self.model.modalities
        check_run_folders(self.members_from, mods, "ensemble option members_from")
        self.trained = [m for m in mods if m not in (self.members_from or {})]

    def load_members(self) -> None:
        where = "ensemble option members_from"
        for m, run_dir in (self.members_from or {}).items():
            enc, head = read_run_weights(run_dir, m, where)
            if head is None:
                raise ConfigError(f"{where}[{m}]: {run_dir} holds no linear head of '{m}' alone; give a unimodal "
                                  "run (mmbalance train --method unimodal) or an ensemble run")
            copy_weights_(self.model.encoders[m], enc, where, m, run_dir)
            copy_weights_(self.model.fusion.heads[m], head, where, m, run_dir, what="linear head")

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 0 and self.members_from:  # a resumed run has the members in its checkpoint
            self.load_members()

    def training_step(self, batch):
        self.log("trained_members", float(len(self.trained)))
        tr, model = self.trainer, self.model
        if not self.trained:  # every member loaded and fixed: nothing to train (same on every rank)
            tr.zero_grad()
            tr.optimizer_step()  # no gradient: no parameter moves (keeps the scheduler's step order)
            return {"loss": 0.0}
        present, y = batch["present"], batch["label"]
        with tr.autocast():
            logits = {m: model.fusion.heads[m](model.encode(m, batch["inputs"][m], present[m])) for m in self.trained}
        ce = {m: F.cross_entropy(z.float(), y, reduction="none") for m, z in logits.items()}
        loss, means = reduced_member_losses(ce, present, tr.all_reduce_sum, tr.world_size)
        tr.step(loss)
        for m, v in means.items():
            self.log(f"ce_{m}", v)
        return {"loss": torch.stack(list(means.values())).sum()}

    def predict(self, batch: Mapping[str, Any]) -> Output:
        out = self.model(batch["inputs"], batch["present"])
        return Output(ensemble_logits(out.unimodal_logits, batch.get("present"), self.combine),
                      out.unimodal_logits, out.features)


__all__ = ["COMBINES", "Ensemble", "ensemble_logits"]
