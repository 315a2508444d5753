"""The batch contract and the pieces every dataset shares.

A *sample* (what ``Dataset.__getitem__`` returns) and a *batch* (what the default collate
makes of a list of samples) are mappings with four keys:

``inputs``   ``{modality: Tensor}`` — one tensor per modality (per sample: no batch axis).
``label``    ``int64`` class index.
``index``    ``int64`` position of the sample in its split (methods keep per-sample history by it).
``present``  ``{modality: bool Tensor}`` — False where the modality is missing for that sample.

An absent modality still has an input tensor of the right shape (zeros), so batches stack;
the model decides what "absent" means (see ``MultimodalModel.absent_policy``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

Batch = dict[str, Any]


def make_sample(inputs: Mapping[str, torch.Tensor], label: int, index: int,
                present: Mapping[str, bool] | None = None) -> Batch:
    """Build one sample that follows the batch contract."""
    present = present or {}
    return {
        "inputs": dict(inputs),
        "label": torch.tensor(int(label), dtype=torch.long),
        "index": torch.tensor(int(index), dtype=torch.long),
        "present": {m: torch.tensor(bool(present.get(m, True))) for m in inputs},
    }


class ArrayDataset(Dataset):
    """In-memory multimodal dataset over float arrays (one per modality), with labels.

    ``present`` optionally marks missing modalities per sample; a missing modality's input is
    returned as zeros.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray | torch.Tensor], labels: np.ndarray | torch.Tensor,
                 present: Mapping[str, np.ndarray | torch.Tensor] | None = None):
        self.modalities = list(arrays)
        self.arrays = {m: torch.as_tensor(np.asarray(a), dtype=torch.float32) for m, a in arrays.items()}
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        n = len(self.labels)
        self.present = {m: torch.ones(n, dtype=torch.bool) for m in self.modalities}
        for m, p in (present or {}).items():
            self.present[m] = torch.as_tensor(np.asarray(p), dtype=torch.bool)
        for m in self.modalities:
            self.arrays[m][~self.present[m]] = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return {
            "inputs": {m: self.arrays[m][i] for m in self.modalities},
            "label": self.labels[i],
            "index": torch.tensor(i, dtype=torch.long),
            "present": {m: self.present[m][i] for m in self.modalities},
        }


@dataclass
class DataSplits:
    """What a dataset builder returns: the three splits plus what the model needs to know.

    ``train_eval`` is the training split with deterministic (test-time) transforms, used by
    linear probes and valuation passes; for datasets without augmentation it is ``train``.
    ``default_encoders`` names the encoder (registry name) to use per modality unless the
    user overrides it; ``encoder_options`` gives per-modality options for it (e.g. input size).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    modalities: list[str]
    num_classes: int
    input_shapes: dict[str, tuple[int, ...]]
    default_encoders: dict[str, str]
    encoder_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_eval: Dataset | None = None
    class_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train_eval is None:
            self.train_eval = self.train


def labels_of(ds: Dataset) -> torch.Tensor:
    """All labels of a dataset (fast path for datasets that keep a ``labels`` tensor)."""
    if hasattr(ds, "labels"):
        return torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)
    return torch.stack([ds[i]["label"] for i in range(len(ds))])


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class by ``fractions`` (summing to 1), seeded; returns sorted index arrays."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    cum = np.cumsum(fractions)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        bounds = np.round(cum * len(idx)).astype(int)
        start = 0
        for k, end in enumerate(bounds):
            parts[k].extend(idx[start:end].tolist())
            start = end
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
