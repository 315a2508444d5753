"""The Method interface.

A method owns what differs between methods and nothing else: how one training step uses the
model (losses, gradient hooks, projections, alternation), optional per-epoch work (valuation,
prototypes, covariance), how it predicts, and what it logs. The engine owns the loop, devices,
precision, checkpoints, metrics and logging, and hands the method a :class:`TrainerHandle`: the
narrow set of things a method may use (methods never import the engine).

Life cycle (all hooks optional except what the default already does)::

    method = create_method(name, **hyperparameters)      # constructor: hyperparameters only
    method.modalities(available)    -> modalities to use (e.g. ``unimodal`` keeps one)
    method.build_model(spec)        -> MultimodalModel (default: encoders + chosen fusion)
    method.setup(handle)            # a TrainerHandle: model, optimizer, data, device, helpers
    for epoch:
        method.on_epoch_start(epoch)
        dataset = method.train_dataset(epoch, base_train)   # e.g. valuation re-sampling
        for batch: method.training_step(batch) -> {name: float}
        method.on_epoch_end(epoch)
        diagnostics = method.epoch_diagnostics()   # means of what was ``log``-ged, reset
    method.predict(batch) -> Output                 # evaluation (eval mode, no grad)
    method.state_dict() / load_state_dict()         # whatever must survive --resume

Helpers a step uses from the handle (``self.trainer``): ``step(loss)`` (zero grads, backward,
clip, optimizer step), or the pieces ``zero_grad()``, ``backward(loss)``, ``optimizer_step()``
when gradients are modified in between; ``autocast()``; ``all_reduce_mean(t)`` /
``all_reduce_sum(t)`` for batch statistics (identity on one process); ``batches(dataset)`` for
an extra pass (device batches, eval mode unless ``train=True``, train mode restored after);
``shard(dataset)`` for this rank's share of a per-epoch pass.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable, Iterator, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import RunConfig
from ..data.base import DataSplits
from ..models import MultimodalModel, Output, create_encoder, create_fusion


class TrainerHandle(Protocol):
    """What a method may use of the engine that drives it (the engine's ``Trainer`` is one; a
    loaded run for inference is another, with only ``model``, ``device`` and ``autocast``)."""

    model: MultimodalModel
    device: torch.device
    cfg: RunConfig  # read only
    data: DataSplits
    optimizer: torch.optim.Optimizer
    epoch: int  # 0-based
    global_step: int
    world_size: int
    rank: int

    def autocast(self) -> ContextManager[Any]: ...
    def zero_grad(self) -> None: ...
    def backward(self, loss: Tensor, **kwargs: Any) -> None: ...
    def clip_gradients(self) -> float | None: ...
    def optimizer_step(self) -> None: ...
    def step(self, loss: Tensor) -> None: ...
    def all_reduce_mean(self, t: Tensor) -> Tensor: ...
    def all_reduce_sum(self, t: Tensor) -> Tensor: ...
    def loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None,
               seed: int | None = None, drop_last: bool = False, shard: bool = False) -> Iterable[Any]: ...
    def shard(self, dataset: Dataset) -> Dataset: ...
    def check_finite(self, loss: Tensor) -> None: ...
    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer: ...
    def average_gradients(self, params: Iterable[nn.Parameter]) -> None: ...
    def broadcast_buffers(self, module: nn.Module) -> None: ...
    def drop_last_for(self, n: int) -> bool: ...
    def load_checkpoint(self, path: Any) -> dict[str, Any]: ...
    def batches(self, dataset: Dataset, *, train: bool = False, batch_size: int | None = None,
                shuffle: bool = False, seed: int | None = None, drop_last: bool = False,
                desc: str | None = None) -> Iterator[dict[str, Any]]: ...
    def progress(self, iterable: Iterable[Any], **kwargs: Any) -> Iterable[Any]: ...


@dataclass
class ModelSpec:
    """Everything needed to build a model for a dataset: resolved per-modality encoders."""

    modalities: list[str]
    num_classes: int
    input_shapes: dict[str, tuple[int, ...]]
    encoders: dict[str, tuple[str, dict[str, Any]]]  # modality -> (encoder name, options)
    fusion: str
    fusion_options: dict[str, Any]
    absent_policy: str

    def build_encoders(self) -> dict[str, nn.Module]:
        return {m: create_encoder(name, self.input_shapes[m], **opts)
                for m, (name, opts) in self.encoders.items()}


def build_standard_model(spec: ModelSpec, fusion: str | None = None, **fusion_options: Any) -> MultimodalModel:
    """Encoders from ``spec`` and a registered fusion (``fusion`` overrides the spec's)."""
    encoders = spec.build_encoders()
    dims = {m: int(e.out_dim) for m, e in encoders.items()}
    opts = dict(spec.fusion_options) if fusion is None else {}
    opts.update(fusion_options)
    head = create_fusion(fusion or spec.fusion, dims, spec.num_classes, **opts)
    return MultimodalModel(encoders, head, spec.input_shapes, spec.absent_policy)


def masked_cross_entropy(logits: Tensor, labels: Tensor, present: Tensor | None, global_count: Tensor | float,
                         world_size: int = 1) -> Tensor:
    """``sum_{b present} CE(logits_b, y_b) * world_size / global_count``.

    On one process with ``global_count`` = the number of present samples this is the mean CE
    over present samples. With several processes, each normalising by the *global* count (times
    the number of processes, because the engine averages gradients over processes) makes the
    averaged gradient exactly that of the global batch's mean over present samples, however the
    present samples are spread over the processes. 0 when no sample is present. A tensor
    ``global_count`` is never read on the host.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    if present is not None:
        ce = ce * present.view(-1).to(ce.dtype)
    if isinstance(global_count, Tensor):  # on the device (no host synchronisation), same numbers
        count = global_count.detach().to(torch.float64)
        return ce.sum() * (count.new_full((), float(world_size)) / count.clamp(min=1.0)).to(ce.dtype)
    return ce.sum() * (float(world_size) / max(float(global_count), 1.0))


class Method:
    """Base class; subclasses set ``name``/``summary`` via :func:`register_method`."""

    name: str = "base"
    #: metadata set by :func:`register_method` (shown by ``mmbalance list methods``)
    paper: str | None = None
    venue: str | None = None
    year: int | None = None
    category: str | None = None
    #: a fusion the method requires (e.g. ``shared_head``); None = any fusion
    required_fusion: str | None = None

    def __init__(self) -> None:
        self._logs: dict[str, list[Any]] = defaultdict(list)
        self.trainer: TrainerHandle | None = None

    # -- construction --------------------------------------------------------------------
    def modalities(self, available: list[str]) -> list[str]:
        return list(available)

    def build_model(self, spec: ModelSpec) -> MultimodalModel:
        return build_standard_model(spec)

    def setup(self, trainer: TrainerHandle) -> None:
        self.trainer = trainer

    @property
    def model(self) -> MultimodalModel:
        assert self.trainer is not None, "method used before setup()"
        return self.trainer.model

    # -- training ------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        pass

    def train_dataset(self, epoch: int, dataset: Dataset) -> Dataset:
        return dataset

    def training_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        pass

    # -- evaluation ------------------------------------------------------------------------
    def predict(self, batch: Mapping[str, Any]) -> Output:
        return self.model(batch["inputs"], batch["present"])

    # -- diagnostics -----------------------------------------------------------------------
    def log(self, name: str, value: float | Tensor, weight: float | Tensor | None = None) -> None:
        """Record a diagnostic; the epoch's mean goes to metrics.jsonl. A tensor stays on its
        device (no host synchronisation per step); it is converted once per epoch.

        ``weight`` (a number or a device tensor, e.g. a 0/1 condition): the entry's weight in
        the epoch's mean, so a diagnostic that only exists on some steps (say, while a modality
        is present) is logged every step without a host-side ``if``: weight 0 counts as not
        logged (a non-finite value is then ignored too); an epoch whose weights sum to 0 leaves
        the name out. Unweighted entries weigh 1."""
        v = value.detach().to(torch.float64) if isinstance(value, Tensor) else float(value)
        if weight is None:
            self._logs[name].append(v)
        elif isinstance(weight, Tensor):
            w = weight.detach().to(torch.float64)
            self._logs[name].append((torch.where(w > 0, w * v, 0.0), w))
        else:
            w = float(weight)
            self._logs[name].append((v * w if w > 0 else 0.0, w))

    def epoch_diagnostics(self) -> dict[str, float]:
        out = {}
        for k, v in self._logs.items():
            if not v:
                continue
            if not any(isinstance(x, tuple) for x in v):
                out[k] = float(sum(v) / len(v))
                continue
            total = sum(x[0] if isinstance(x, tuple) else x for x in v)
            n = sum(x[1] if isinstance(x, tuple) else 1.0 for x in v)
            if float(n) > 0:
                out[k] = float(total / n)
        self._logs.clear()
        return out

    # -- state (resume) --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    # -- shared helpers --------------------------------------------------------------------
    def fused_forward(self, batch: Mapping[str, Any]) -> tuple[Output, Tensor]:
        """The model's output on ``batch`` (under autocast) and the fused loss CE(z, y)."""
        with self.trainer.autocast():
            out = self.model(batch["inputs"], batch["present"])
        return out, self.ce(out.logits, batch["label"])

    @torch.no_grad()
    def unimodal_validation(self, per_sample) -> dict[str, float]:
        """Mean over the *validation* split (never test) of ``per_sample(z_m, y) -> (B,)`` for each
        modality's unimodal logits from :meth:`predict`, over samples where the modality is
        present; sums are all-reduced. The model is left in train mode."""
        tr = self.trainer
        mods = self.model.modalities
        sums = torch.zeros(len(mods), 2, dtype=torch.float64, device=tr.device)
        for batch in tr.batches(tr.shard(tr.data.val)):
            with tr.autocast():
                out = self.predict(batch)
            for i, m in enumerate(mods):
                p = batch["present"][m]
                sums[i, 0] += per_sample(out.unimodal_logits[m].float(), batch["label"])[p].double().sum()
                sums[i, 1] += p.sum()
        sums = tr.all_reduce_sum(sums)
        return {m: float(sums[i, 0] / sums[i, 1].clamp(min=1)) for i, m in enumerate(mods)}

    def in_window(self, epoch: int) -> bool:
        """True when 0-based ``epoch`` lies in ``[modulation_start, modulation_end]`` (inclusive;
        an end of None = until the end), for methods that define those hyperparameters."""
        end = getattr(self, "modulation_end", None)
        return getattr(self, "modulation_start", 0) <= epoch and (end is None or epoch <= end)

    def present_ce(self, logits: Tensor, labels: Tensor, present: Tensor) -> Tensor:
        """Mean CE over the samples of the *global* batch where a modality is present
        (:func:`masked_cross_entropy` with the count summed over processes: one all-reduce on
        every rank, whatever its data)."""
        count = self.trainer.all_reduce_sum(present.sum().to(torch.float64))
        return masked_cross_entropy(logits, labels, present, count, self.trainer.world_size)

    @staticmethod
    def ce(logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), labels)

    def hparams(self) -> dict[str, Any]:
        """The constructor's hyperparameters (for config.yaml)."""
        import inspect

        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}
