"""Unimodal-pretrained fine-tuning: each encoder starts from its own unimodal training, then the
fused model is trained (the "Uni-Pre Finetuned" strong baseline).

This module also holds what the three unimodal-member methods (``ensemble``, ``unimodal_pretrain``,
``umt``) share: per-member losses over the present samples of the global batch
(:func:`reduced_member_losses`), the first stage that trains one network per modality inside the
run (:func:`pretrain_members`, selected per member on validation by :func:`member_val_scores`),
and reading a modality's weights from a finished run folder (:func:`read_run_weights`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation.metrics import classification_metrics
from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from ..utils import epoch_seed, seed_everything, to_device
from . import register_method
from .base import Method, build_standard_model

log = logging.getLogger("mmbalance")

#: a member network: (encoder, linear head on its feature)
Net = tuple[nn.Module, nn.Module]


# ----------------------------------------------------------------------------- pure math
def masked_mean_loss(per_sample: Tensor, present: Tensor | None, global_count: Tensor | float,
                     world_size: int = 1) -> Tensor:
    """``sum_{b present} per_sample_b * world_size / global_count`` (0 when nothing is present).

    With ``global_count`` the number of present samples of the *global* batch, the gradient
    averaged over ``world_size`` processes is that of the mean over the global batch's present
    samples (:func:`mmbalance.methods.base.masked_cross_entropy` for any per-sample loss).

    >>> float(masked_mean_loss(torch.tensor([1.0, 5.0, 3.0]), torch.tensor([True, False, True]), 2))
    2.0
    """
    v = per_sample.float()
    if present is not None:
        v = v * present.view(-1).to(v.dtype)
    if isinstance(global_count, Tensor):  # stays on the device: no host synchronisation
        return v.sum() * float(world_size) / global_count.to(v.dtype).clamp(min=1.0)
    return v.sum() * (float(world_size) / max(float(global_count), 1.0))


def member_statistics(per_sample: Mapping[str, Tensor], present: Mapping[str, Tensor | None]) -> Tensor:
    """``(M, 2)`` float64, detached: ``[sum over present samples of per_sample[m], count]`` per
    member, in the order of ``per_sample``. Sums and counts, so that summing them over processes
    gives the global batch's exactly."""
    rows = []
    for m, v in per_sample.items():
        v = v.detach().double().view(-1)
        p = present.get(m)
        mask = torch.ones_like(v) if p is None else p.view(-1).to(v.dtype)
        rows.append(torch.stack([(v * mask).sum(), mask.sum()]))
    return torch.stack(rows)


def reduced_member_losses(per_sample: Mapping[str, Tensor], present: Mapping[str, Tensor | None],
                          reduce: Callable[[Tensor], Tensor] | None = None, world_size: int = 1,
                          extra: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_m`` of the mean of ``per_sample[m]`` over the present samples of m in the global batch.

    One ``reduce`` (``trainer.all_reduce_sum``) of :func:`member_statistics` on every process,
    whatever its data, gives the global counts for the loss and the exact global means, returned
    for diagnostics (``{m: mean}``, 0-dim float64 tensors on the device: no host synchronisation).
    ``extra`` per-sample values (over every sample of the batch) ride along in the same reduce
    for their global means only; they are not part of the loss. Identity reduce and
    ``world_size=1`` on one process.
    """
    extra = dict(extra or {})
    stats = member_statistics({**per_sample, **extra}, present)
    if reduce is not None:
        stats = reduce(stats)
    loss = per_sample[next(iter(per_sample))].new_zeros((), dtype=torch.float32)
    means = {}
    for i, (m, v) in enumerate({**per_sample, **extra}.items()):
        if i < len(per_sample):
            loss = loss + masked_mean_loss(v, present.get(m), stats[i, 1], world_size)
        means[m] = stats[i, 0] / stats[i, 1].clamp(min=1.0)
    return loss, means


def encode_member(encoder: nn.Module, x: Tensor, present: Tensor | None, policy: str = "input") -> Tensor:
    """A member encoder's feature; with the ``input`` absent policy absent samples get a zero
    input, as :meth:`MultimodalModel.encode` does (their losses are masked out anyway). The mask
    is applied whatever it holds (times 1 leaves a present input exactly as it is), so the host
    never reads it."""
    if present is not None and policy == "input":
        x = x * present.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return encoder(x)


def member_ce(nets: Mapping[str, Net], batch: Mapping[str, Any], policy: str = "input") -> dict[str, Tensor]:
    """Per-sample CE ``(B,)`` of each member's logits (the caller masks absent samples)."""
    y = batch["label"]
    out = {}
    for m, (enc, head) in nets.items():
        z = head(encode_member(enc, batch["inputs"][m], batch["present"].get(m), policy))
        out[m] = F.cross_entropy(z.float(), y, reduction="none")
    return out


# ----------------------------------------------------------------------------- run folders
def read_run_weights(run_dir: str | Path, m: str, where: str) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Modality ``m``'s encoder (``encoders.<m>.*``, prefix removed) and linear head from a finished
    run folder's validation-selected checkpoint ``best.pt``; loaded with ``weights_only``.

    The head is ``{weight, bias}`` of ``fusion.heads.<m>`` (runs with per-modality heads:
    ``ensemble``, ``sum``/``late`` fusion) or of ``fusion.fc`` when the run has that one encoder
    only (a ``unimodal`` run: its concat head over one modality); None otherwise. ``where`` names
    the option in errors (``"umt option teachers_from"``)."""
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise ConfigError(f"{where}[{m}]: {path} does not exist (give the folder of a finished run that "
                          f"trained a '{m}' encoder, e.g. mmbalance train --method unimodal --method.modality {m})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch/zip raise many kinds for a damaged file
        raise ConfigError(f"{where}[{m}]: {path} cannot be loaded ({type(e).__name__}); use a checkpoint "
                          "written by mmbalance") from None
    model = state.get("model") if isinstance(state, Mapping) else None
    if not isinstance(model, Mapping):
        raise ConfigError(f"{where}[{m}]: {path} holds no model weights")
    prefix = f"encoders.{m}."
    encoder = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
    if not encoder:
        found = sorted({k.split(".")[1] for k in model if k.startswith("encoders.")})
        raise ConfigError(f"{where}[{m}]: {run_dir} holds no '{m}' encoder (it has {found})")
    head = None
    own = f"fusion.heads.{m}."
    if own + "weight" in model:
        head = {"weight": model[own + "weight"], "bias": model.get(own + "bias")}
    else:
        encoders = {k.split(".")[1] for k in model if k.startswith("encoders.")}
        if encoders == {m} and "fusion.fc.weight" in model:
            head = {"weight": model["fusion.fc.weight"], "bias": model.get("fusion.fc.bias")}
    if head is not None and head["bias"] is None:
        head = None
    return encoder, head


@torch.no_grad()
def copy_weights_(module: nn.Module, tensors: Mapping[str, Tensor], where: str, m: str, run_dir: str | Path,
                  what: str = "encoder") -> None:
    """Copy ``tensors`` (a state dict) into ``module``; a different architecture fails in one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    bad = [k for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or extra or bad:
        k = (bad or missing or extra)[0]
        got = tuple(tensors[k].shape) if k in tensors else None
        want = tuple(own[k].shape) if k in own else None
        raise ConfigError(f"{where}[{m}]: the {what} in {run_dir} does not fit this model ({k}: {got} vs {want}); "
                          "train that run with the same encoder and dataset")
    for k, v in tensors.items():
        own[k].copy_(v.to(own[k].device, own[k].dtype))


def check_run_folders(folders: Mapping[str, str] | None, modalities: list[str], where: str) -> None:
    unknown = [m for m in (folders or {}) if m not in modalities]
    if unknown:
        raise ConfigError(f"{where} names unknown modalities {unknown}; modalities: {', '.join(modalities)}")


def as_folders(value: Mapping[str, Any] | None) -> dict[str, str] | None:
    """``{modality: run folder}`` as plain strings (the config layer has checked it is a mapping)."""
    return None if value is None else {str(k): str(v) for k, v in value.items()}


# ----------------------------------------------------------------------------- stage 1
def _snapshot(net: Net) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return tuple({k: v.detach().clone() for k, v in part.state_dict().items()} for part in net)  # type: ignore[return-value]


@torch.no_grad()
def member_val_scores(method: Method, nets: Mapping[str, Net], metric: str = "accuracy") -> dict[str, float]:
    """Each member's ``metric`` (accuracy, macro_f1 or map) on the *validation* split over the
    samples where its modality is present; eval mode (restored after), sharded over processes:
    every process fills its samples' rows (by ``index``) and one all-reduce gathers them, so the
    result is the one-process value on every process."""
    tr = method.trainer
    val = tr.data.val
    mods = list(nets)
    N, C, M = len(val), int(tr.data.num_classes), len(mods)
    logits = torch.zeros(M, N, C, dtype=torch.float64, device=tr.device)
    pres = torch.zeros(M, N, dtype=torch.float64, device=tr.device)
    labels = torch.zeros(N, dtype=torch.float64, device=tr.device)
    policy = method.model.absent_policy
    for batch in tr.batches(tr.shard(val)):
        idx = batch["index"].long().view(-1)
        with tr.autocast():
            for i, m in enumerate(mods):
                enc, head = nets[m]
                p = batch["present"][m]
                logits[i, idx] = head(encode_member(enc, batch["inputs"][m], p, policy)).double()
                pres[i, idx] = p.double().view(-1)
        labels[idx] = batch["label"].double().view(-1)
    flat = tr.all_reduce_sum(torch.cat([logits.flatten(), pres.flatten(), labels]))
    logits = flat[:M * N * C].view(M, N, C)
    pres = flat[M * N * C:M * N * C + M * N].view(M, N) > 0.5
    labels = flat[M * N * C + M * N:].round().long()
    out = {}
    for i, m in enumerate(mods):
        p = pres[i]
        out[m] = float(classification_metrics(logits[i][p], labels[p], C)[metric]) if bool(p.any()) else 0.0
    return out


def member_step(method: Method, nets: Mapping[str, Net], batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """One stage-1 step: ``sum_m`` of each member's mean CE over the present samples of m
    (disjoint parameters: each member's gradient is that of its own loss alone); engine backward
    (gradients averaged over processes) and optimizer step. Returns the members' global mean CE."""
    tr = method.trainer
    with tr.autocast():
        ce = member_ce(nets, batch, method.model.absent_policy)
    loss, means = reduced_member_losses(ce, batch["present"], tr.all_reduce_sum, tr.world_size)
    tr.zero_grad()
    tr.backward(loss)
    tr.optimizer_step()
    return means


def stage1_seed(seed: int, epoch: int) -> int:
    """Seed of stage-1 epoch ``epoch``: ``epoch_seed(seed, -1 - epoch)``, a stream apart from the
    run's epochs (``epoch_seed(seed, e)`` for e >= 0)."""
    return epoch_seed(seed, -1 - int(epoch))


def pretrain_members(method: Method, nets: Mapping[str, Net], epochs: int, selection: str = "best",
                     label: str = "stage 1") -> dict[str, tuple[float, int]]:
    """Train every member alone (:func:`member_step`) for ``epochs`` epochs over the training
    split, as the engine trains an epoch (the run's global batch sharded over processes, a
    seeded shuffle per epoch, a trailing batch of one sample dropped) with the engine's
    optimizer at its current learning rate. After each epoch every member is scored on the
    validation split (:func:`member_val_scores`, the run's ``select_metric``); with
    ``selection="best"`` each member ends at its own best epoch (the first of ties), as a
    separate unimodal run's ``best.pt``; with ``"last"`` at the last epoch.

    Returns ``{m: (validation score, 0-based epoch)}`` of the kept weights. The global random
    state is re-seeded to the run's epoch 0 afterwards."""
    tr = method.trainer
    tc = tr.cfg.train
    metric = tc.select_metric
    data = tr.data.train
    drop_last = tr.drop_last_for(len(data))
    best: dict[str, tuple[float, int]] = {m: (-math.inf, -1) for m in nets}
    snaps: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
    for e in range(int(epochs)):
        seed = stage1_seed(tc.seed, e)
        seed_everything(seed)
        method.model.train()
        loader = tr.loader(data, shuffle=True, batch_size=tc.batch_size, seed=seed, drop_last=drop_last, shard=True)
        sums: dict[str, Any] = {m: 0.0 for m in nets}
        steps = 0
        for batch in tr.progress(loader, desc=f"{method.name} {label} epoch {e + 1}/{epochs}"):
            means = member_step(method, nets, to_device(batch, tr.device))
            for m, v in means.items():
                sums[m] += v
            steps += 1
        scores = member_val_scores(method, nets, metric)
        for m in nets:
            if selection == "last" or scores[m] > best[m][0]:
                best[m] = (scores[m], e)
                if selection == "best":
                    snaps[m] = _snapshot(nets[m])
        log.info("%s %s epoch %d/%d: train CE %s | val %s %s", method.name, label, e + 1, epochs,
                 " ".join(f"{m} {float(s) / max(steps, 1):.4f}" for m, s in sums.items()), metric,
                 " ".join(f"{m} {scores[m]:.4f}{'*' if best[m][1] == e else ''}" for m in nets))
    with torch.no_grad():
        for m, (enc_state, head_state) in snaps.items():
            nets[m][0].load_state_dict(enc_state)
            nets[m][1].load_state_dict(head_state)
    seed_everything(epoch_seed(tc.seed, 0))
    return best


def reset_optimizer_state(optimizer: torch.optim.Optimizer, params) -> None:
    """Forget the optimizer's state (momentum, Adam moments and step) of ``params``, so that the
    next stage starts as a fresh run would."""
    for p in params:
        optimizer.state.pop(p, None)


def scale_update_(params: list[nn.Parameter], before: list[Tensor], factor: float) -> None:
    """``p <- p0 + factor * (p - p0)``: the optimizer's update of ``params`` scaled, which is
    exactly a learning rate ``lr * factor`` for them with SGD (momentum, weight decay), Adam,
    AdamW and AdaGrad."""
    with torch.no_grad():
        for p, p0 in zip(params, before):
            p.copy_(p0 + factor * (p - p0))


# ----------------------------------------------------------------------------- the method
@register_method("unimodal_pretrain",
                 summary="each encoder first trained alone (stage 1, or run folders), then the fused model, any fusion",
                 category="baseline")
class UnimodalPretrain(Method):
    """Unimodal-pretrained fine-tuning: the strong simple baseline of initialising each encoder
    from its own unimodal training, then training the fused model (any fusion) with CE(z, y).

    Start of each encoder (before the first epoch):

    * ``init_from`` ``{modality: run folder}``: the encoder (and its linear head, from a
      ``unimodal`` or ``ensemble`` run) is copied from that run's validation-selected
      ``best.pt`` (:func:`read_run_weights`). The folders are read once; ``mmbalance evaluate``
      and ``--resume`` do not need them.
    * every other modality is trained alone in a first stage inside this command
      (:func:`pretrain_members`): ``pretrain_epochs`` epochs of its encoder with a linear head of
      its own (``pretrain_heads.<m>``, part of the model), the loss ``sum_m`` of each member's
      CE over its present samples — with disjoint parameters, each encoder's gradient is that of
      training it alone on the same batches. Each encoder keeps the weights of its best
      validation epoch (the run's ``select_metric``, over the samples where the modality is
      present), as a separate unimodal run's ``best.pt`` would.

    Stage 1 runs at the start of the run's first epoch, so ``train.epochs`` counts the fused
    stage only, and the run's first checkpoint already holds the pretrained encoders (a resumed
    run never repeats it; an interrupted stage 1 is started again). It uses the run's optimizer
    at its initial learning rate, without the schedule; the optimizer state of the pretrained
    parameters is then reset, so the fused stage starts as a fresh run with the run's schedule.
    Model selection (the engine's, on the fused validation metric) covers the fused stage.

    Options:
        pretrain_epochs: stage-1 epochs for the modalities not in ``init_from`` (default None =
            ``train.epochs``, the budget of a separate unimodal run of this config; 0 = no stage 1,
            then ``init_from`` must list every modality).
        init_from: ``{modality: run folder}`` to copy encoders from finished runs instead of stage 1.
        member_selection: ``best`` (default: each encoder at its best stage-1 validation epoch)
            or ``last`` (the end of stage 1).
        freeze_encoders: keep the pretrained encoders fixed in the fused stage (no gradient, eval
            mode: BatchNorm statistics frozen), so only the fusion trains — a linear probe on the
            unimodal features with ``concat``; default False (fine-tune everything).
        encoder_lr_factor: the fused stage's learning rate of the encoders relative to the
            fusion's (default 1; e.g. 0.1 for gentle fine-tuning), applied by scaling their update
            (exact for SGD, Adam, AdamW, AdaGrad); ignored with ``freeze_encoders``.
        init_heads: with per-modality-head fusions (``sum``, ``late``), also start each head from
            the member's linear head (then ``late`` starts as the unimodal ensemble in logit space);
            default False (the fusion starts fresh, as the baseline is usually run).

    Diagnostics: at the first epoch ``pretrain_val_<m>`` (the kept member's validation score;
    for ``init_from`` modalities when their run holds a head) and ``pretrain_epoch_<m>``
    (1-based stage-1 epoch kept); every epoch ``loss_fused`` and ``ce_<m>`` (CE of the fusion's
    unimodal logits over present samples). Cost: stage 1 is about ``pretrain_epochs`` epochs of
    unimodal training of all encoders (one forward/backward per encoder per step, like joint
    training) plus one validation pass per stage-1 epoch; the fused stage is 1.0x joint.
    """

    def __init__(self, pretrain_epochs: Annotated[int | None, Interval(0, None)] = None,
                 init_from: dict[str, str] | None = None,
                 member_selection: Literal["best", "last"] = "best",
                 freeze_encoders: bool = False,
                 encoder_lr_factor: Annotated[float, Interval(0, None)] = 1.0,
                 init_heads: bool = False):
        super().__init__()
        self.pretrain_epochs = None if pretrain_epochs is None else int(pretrain_epochs)
        self.init_from = as_folders(init_from)
        self.member_selection = member_selection
        self.freeze_encoders = bool(freeze_encoders)
        self.encoder_lr_factor = float(encoder_lr_factor)
        self.init_heads = bool(init_heads)
        self.stage1_done = False
        self.pretrain_scores: dict[str, dict[str, float]] = {}

    def build_model(self, spec):
        model = build_standard_model(spec)
        model.pretrain_heads = nn.ModuleDict({m: nn.Linear(model.feature_dim(m), spec.num_classes)
                                              for m in model.modalities})
        return model

    def setup(self, trainer) -> None:
        super().setup(trainer)
        mods = self.model.modalities
        check_run_folders(self.init_from, mods, "unimodal_pretrain option init_from")
        epochs = trainer.cfg.train.epochs if self.pretrain_epochs is None else self.pretrain_epochs
        self.stage1_epochs = int(epochs)
        loaded = set(self.init_from or {})
        self.stage1_modalities = [m for m in mods if m not in loaded]
        if self.stage1_modalities and self.stage1_epochs == 0:
            raise ConfigError(f"unimodal_pretrain: {', '.join(self.stage1_modalities)} would start untrained "
                              "(pretrain_epochs is 0 and init_from does not list it); set pretrain_epochs > 0 "
                              "or give a run folder per modality in init_from")

    def nets(self, mods) -> dict[str, Net]:
        return {m: (self.model.encoders[m], self.model.pretrain_heads[m]) for m in mods}

    # ------------------------------------------------------------------ stage 1
    def prepare(self) -> None:
        """Load ``init_from``, run stage 1, log the members' scores; once per run."""
        model, tr = self.model, self.trainer
        where = "unimodal_pretrain option init_from"
        with_head = set(self.stage1_modalities)
        for m, run_dir in (self.init_from or {}).items():
            enc, head = read_run_weights(run_dir, m, where)
            copy_weights_(model.encoders[m], enc, where, m, run_dir)
            if head is not None:
                copy_weights_(model.pretrain_heads[m], head, where, m, run_dir, what="linear head")
                with_head.add(m)
        kept = {}
        if self.stage1_modalities and self.stage1_epochs > 0:
            kept = pretrain_members(self, self.nets(self.stage1_modalities), self.stage1_epochs,
                                    self.member_selection)
        mods = [m for m in model.modalities if m in with_head]
        scores = member_val_scores(self, self.nets(mods), tr.cfg.train.select_metric) if mods else {}
        heads = getattr(model.fusion, "heads", None)
        if self.init_heads and isinstance(heads, nn.ModuleDict):
            with torch.no_grad():
                for m in mods:
                    if m in heads and heads[m].weight.shape == model.pretrain_heads[m].weight.shape:
                        heads[m].load_state_dict(model.pretrain_heads[m].state_dict())
        reset_optimizer_state(tr.optimizer, list(model.encoders.parameters()) + list(model.pretrain_heads.parameters()))
        self.pretrain_scores = {m: {"score": scores[m], "epoch": float(kept[m][1] + 1) if m in kept else 0.0}
                                for m in scores}
        self.stage1_done = True

    def on_epoch_start(self, epoch: int) -> None:
        if not self.stage1_done:
            self.prepare()
            for m, s in self.pretrain_scores.items():
                self.log(f"pretrain_val_{m}", s["score"])
                if s["epoch"]:
                    self.log(f"pretrain_epoch_{m}", s["epoch"])

    # ------------------------------------------------------------------ fused stage
    def training_step(self, batch):
        if not self.stage1_done:  # used without the epoch hooks
            self.on_epoch_start(self.trainer.epoch)
        tr, model = self.trainer, self.model
        present = batch["present"]
        with tr.autocast():
            if self.freeze_encoders:
                model.encoders.eval()
                with torch.no_grad():
                    feats = model.encode_all(batch["inputs"], present)
            else:
                feats = model.encode_all(batch["inputs"], present)
            out = model.fuse(feats, present)
        y = batch["label"]
        loss = self.ce(out.logits, y)
        uni = {f"ce_{m}": F.cross_entropy(z.detach().float(), y, reduction="none")
               for m, z in out.unimodal_logits.items()}
        fused = F.cross_entropy(out.logits.detach().float(), y, reduction="none")
        masks = {f"ce_{m}": present.get(m) for m in out.unimodal_logits}
        stats = tr.all_reduce_sum(member_statistics({**uni, "loss_fused": fused}, masks))  # one collective
        tr.zero_grad()
        tr.backward(loss)
        factor = self.encoder_lr_factor
        if factor != 1.0 and not self.freeze_encoders:
            params = list(model.encoders.parameters())
            before = [p.detach().clone() for p in params]
            tr.optimizer_step()
            scale_update_(params, before, factor)
        else:
            tr.optimizer_step()
        for i, name in enumerate([*uni, "loss_fused"]):  # global means over the (present) samples
            self.log(name, stats[i, 0] / stats[i, 1].clamp(min=1.0))
        return {"loss": loss.detach()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"stage1_done": self.stage1_done, "pretrain_scores": dict(self.pretrain_scores)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stage1_done = bool(state.get("stage1_done", self.stage1_done))
        self.pretrain_scores = {m: dict(v) for m, v in dict(state.get("pretrain_scores", {})).items()}


__all__ = ["Net", "UnimodalPretrain", "copy_weights_", "encode_member", "masked_mean_loss", "member_ce",
           "member_statistics", "member_step", "member_val_scores", "pretrain_members", "read_run_weights",
           "reduced_member_losses", "reset_optimizer_state", "scale_update_", "stage1_seed"]
