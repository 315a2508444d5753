"""The missing-modality protocol (MLA, Sec. 4.3): each modality of each sample is absent with
probability ``eta`` in train, validation and test alike, seeded, and never all modalities of a
sample at once.

``--missing-rate 0.3`` (every modality) or ``--missing-rate '{audio: 0.5}'`` (per modality)
wraps every split of any dataset; an absent modality's input becomes zeros and its ``present``
flag False, so every method and fusion handles it through the model's absent policy, and
evaluation reports accuracy under the mask. The masks depend only on ``(missing_seed, split,
sample position)``: every method and every training seed sees the same missing entries, and a
rate of 0 leaves the dataset untouched (results equal a normal run).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import ConfigError
from .base import DataSplits

SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


def missing_masks(n: int, modalities: list[str], rates: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Presence masks ``{m: (n,) bool}``: modality m absent with probability ``rates[m]``; a sample
    that would lose every modality keeps one, drawn uniformly among its modalities.

    >>> masks = missing_masks(1000, ["a", "b"], {"a": 0.5, "b": 0.5}, seed=0)
    >>> bool((masks["a"] | masks["b"]).all()), bool(0.3 < 1 - masks["a"].mean() < 0.45)
    (True, True)
    """
    rng = np.random.default_rng(seed)
    r = np.array([float(rates.get(m, 0.0)) for m in modalities])
    present = rng.random((n, len(modalities))) >= r
    empty = np.flatnonzero(~present.any(axis=1))
    present[empty, rng.integers(0, len(modalities), len(empty))] = True
    return {m: present[:, i] for i, m in enumerate(modalities)}


class MissingModalities(Dataset):
    """A view of ``base`` with some modalities absent (zeros + ``present`` False), by fixed masks."""

    def __init__(self, base: Dataset, masks: Mapping[str, np.ndarray]):
        self.base = base
        self.masks = {m: torch.as_tensor(v, dtype=torch.bool) for m, v in masks.items()}
        if hasattr(base, "labels"):
            self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        inputs, present = dict(item["inputs"]), dict(item["present"])
        for m, mask in self.masks.items():
            if not mask[i]:
                inputs[m] = torch.zeros_like(inputs[m])
                present[m] = torch.tensor(False)
        return {**item, "inputs": inputs, "present": present}


def normalise_rates(rate: float | Mapping[str, float], modalities: list[str]) -> dict[str, float]:
    """``{modality: rate}`` from one rate or a mapping; one-line errors for unknown names and rates
    outside [0, 1)."""
    if isinstance(rate, Mapping):
        unknown = [m for m in rate if m not in modalities]
        if unknown:
            raise ConfigError(f"dataset.missing_rate names unknown modality {', '.join(map(str, unknown))}; "
                              f"modalities: {', '.join(modalities)}")
        rates = {m: float(rate.get(m, 0.0)) for m in modalities}
    else:
        rates = {m: float(rate) for m in modalities}
    bad = {m: r for m, r in rates.items() if not 0.0 <= r < 1.0}
    if bad:
        raise ConfigError(f"dataset.missing_rate must be in [0, 1) per modality, got {bad}")
    return rates


def apply_missing(data: DataSplits, rate: float | Mapping[str, float], seed: int = 0,
                  modalities: list[str] | None = None) -> DataSplits:
    """``data`` with the protocol's masks on train, val and test (``train_eval`` shares train's)."""
    mods = list(modalities or data.modalities)
    rates = normalise_rates(rate, mods)
    if not any(rates.values()):
        return data
    out: dict[str, Dataset] = {}
    masks_train = None
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        masks = missing_masks(len(ds), mods, rates, seed * 7919 + SPLIT_IDS[split])
        if split == "train":
            masks_train = masks
        out[split] = MissingModalities(ds, masks)
    train_eval = data.train_eval if data.train_eval is not data.train else None
    return replace(data, train=out["train"], val=out["val"], test=out["test"],
                   train_eval=MissingModalities(train_eval, masks_train) if train_eval is not None else out["train"],
                   info={**data.info, "missing_rate": rates, "missing_seed": seed})
