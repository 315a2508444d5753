"""Prediction over a dataset and its metrics, shared by the trainer and by loaded runs."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..config import RunConfig
from ..evaluation.metrics import classification_metrics
from ..methods import Method
from ..models import MultimodalModel
from ..utils import to_device


@torch.no_grad()
def predict_batches(method: Method, batches: Iterable[Mapping[str, Any]], modalities: list[str],
                    autocast: Callable[[], ContextManager[Any]], num_classes: int | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Fused logits, unimodal logits per modality and labels over device ``batches`` (the
    method's prediction rule), gathered on the CPU in float32. No batches (a process's empty
    shard of a tiny split): ``(0, num_classes)`` logits and no labels."""
    logits, uni, labels = [], {m: [] for m in modalities}, []
    for batch in batches:
        with autocast():
            out = method.predict(batch)
        logits.append(out.logits.float().cpu())
        for m in modalities:
            uni[m].append(out.unimodal_logits[m].float().cpu())
        labels.append(batch["label"].cpu())
    if not labels and num_classes is not None:
        empty = torch.zeros(0, num_classes)
        return empty, {m: empty.clone() for m in modalities}, torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), {m: torch.cat(v) for m, v in uni.items()}, torch.cat(labels)


def split_metrics(logits: torch.Tensor, uni: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  num_classes: int) -> dict[str, Any]:
    """Accuracy, macro-F1, mAP and loss of the fused prediction, and the same per modality."""
    res: dict[str, Any] = classification_metrics(logits, labels, num_classes)
    res["loss"] = float(F.cross_entropy(logits, labels))
    res["per_modality"] = {m: classification_metrics(z, labels, num_classes) for m, z in uni.items()}
    return res


class InferenceHandle:
    """The part of a :class:`~mmbalance.methods.base.TrainerHandle` that prediction needs: a
    loaded run's model on a device, one process, no data, no optimizer."""

    world_size = 1
    rank = 0

    def __init__(self, model: MultimodalModel, device: torch.device, cfg: RunConfig,
                 amp_dtype: torch.dtype | None = None, epoch: int = 0):
        self.model = model
        self.device = device
        self.cfg = cfg
        self.amp_dtype = amp_dtype
        self.epoch = epoch
        self.global_step = 0

    def autocast(self) -> ContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    all_reduce_sum = all_reduce_mean

    def shard(self, dataset: Dataset) -> Dataset:
        return dataset

    def loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None,
               seed: int | None = None, drop_last: bool = False, shard: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size or self.cfg.train.eval_batch_size, shuffle=False,
                          drop_last=drop_last)

    def batches(self, dataset: Dataset, *, train: bool = False, batch_size: int | None = None,
                shuffle: bool = False, seed: int | None = None, drop_last: bool = False, desc: str | None = None):
        was = self.model.training
        self.model.train(train)
        try:
            for batch in self.loader(dataset, batch_size=batch_size, drop_last=drop_last):
                yield to_device(batch, self.device)
        finally:
            self.model.train(was)

    def progress(self, iterable, **kwargs):
        return iterable
