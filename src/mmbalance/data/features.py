"""The generic ``.npz`` features format (bring your own data).

One ``.npz`` file holding:

* ``labels`` — integer class indices, shape (N,), values >= 0 (classes = max + 1);
* optional ``split`` — N strings in {train, val, test}; without it a fixed stratified 60/20/20
  split is drawn (seed ``split_seed``); with ``train``/``test`` but no ``val``, a stratified
  ``val_fraction`` of train becomes the validation split;
* optional ``modality_names`` — the modality order; otherwise every other array, sorted;
* optional ``present_<modality>`` — boolean (N,), False where that modality is missing;
* every other array is a modality whose first dimension is N (any trailing shape).

The file is validated on load; each problem is reported in one line that says what to fix.
Features are standardised per element with statistics of the *training* split only (present
samples only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..registry import ConfigError
from .base import ArrayDataset, DataSplits, stratified_split

RESERVED = {"labels", "split", "modality_names"}
SPLITS = ("train", "val", "test")


def _err(path: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def load_features(path: str | Path, modalities: Sequence[str] | None = None, standardize: bool = True,
                  split_seed: int = 0, val_fraction: float = 0.2, name: str | None = None) -> DataSplits:
    """Load and validate a features ``.npz`` file into :class:`DataSplits`."""
    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"dataset file not found: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
        data = {k: npz[k] for k in npz.files}
    except Exception as e:  # corrupt zip, pickled objects, ...
        raise _err(path, f"cannot be read as a .npz of plain arrays ({type(e).__name__}: {e})") from None
    return features_from_arrays(data, path, modalities, standardize, split_seed, val_fraction, name)


def features_from_arrays(data: dict[str, np.ndarray], path: str = "<arrays>",
                         modalities: Sequence[str] | None = None, standardize: bool = True,
                         split_seed: int = 0, val_fraction: float = 0.2,
                         name: str | None = None) -> DataSplits:
    """Validate arrays in the features format and build :class:`DataSplits`."""
    if "labels" not in data:
        raise _err(path, "missing the 'labels' array (integer class index per sample)")
    labels = np.asarray(data["labels"])
    if labels.ndim != 1:
        raise _err(path, f"'labels' must be 1-D (N,), got shape {labels.shape}")
    n = len(labels)
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise _err(path, f"'labels' must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if n == 0:
        raise _err(path, "'labels' is empty")
    if labels.min() < 0:
        raise _err(path, f"'labels' must be >= 0, found {int(labels.min())}")

    if "modality_names" in data:
        order = [str(m) for m in np.asarray(data["modality_names"]).tolist()]
    else:
        order = sorted(k for k in data if k not in RESERVED and not k.startswith("present_"))
    missing = [m for m in order if m not in data]
    if missing:
        raise _err(path, f"modality_names lists {missing} but the file has no such arrays")
    if not order:
        raise _err(path, "no modality arrays (every array other than labels/split/modality_names/present_* is a modality)")
    if modalities:
        unknown = [m for m in modalities if m not in order]
        if unknown:
            raise ConfigError(f"unknown modality {unknown}; modalities in {path}: {', '.join(order)}")
        order = list(modalities)

    arrays: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for m in order:
        a = np.asarray(data[m])
        if a.dtype.kind not in "fiub":
            raise _err(path, f"modality '{m}' must be numeric, got dtype {a.dtype}")
        if a.ndim == 0 or a.shape[0] != n:
            raise _err(path, f"modality '{m}' has {a.shape[0] if a.ndim else 0} samples but 'labels' has {n}; "
                             "the first dimension of every modality must be N")
        a = a.astype(np.float32).reshape(n, -1) if a.ndim == 1 else a.astype(np.float32)
        p = np.ones(n, dtype=bool)
        if f"present_{m}" in data:
            p = np.asarray(data[f"present_{m}"]).astype(bool)
            if p.shape != (n,):
                raise _err(path, f"'present_{m}' must have shape ({n},), got {p.shape}")
        bad = ~np.isfinite(a.reshape(n, -1)).all(axis=1) & p
        if bad.any():
            raise _err(path, f"modality '{m}' has NaN or inf values in {int(bad.sum())} sample(s), "
                             f"first at index {int(np.flatnonzero(bad)[0])}")
        arrays[m], present[m] = a, p

    split = _resolve_split(data, labels, path, split_seed, val_fraction)
    idx = {s: np.flatnonzero(split == s) for s in SPLITS}
    for s in SPLITS:
        if len(idx[s]) == 0:
            raise _err(path, f"split '{s}' is empty")
    for m in order:
        k = int(present[m][idx["train"]].sum())
        if k < 2:
            raise _err(path, f"modality '{m}' has {k} training sample(s) present; at least 2 are needed to learn "
                             "and standardise it")
    num_classes = int(labels.max()) + 1

    if standardize:
        for m in order:
            tr = arrays[m][idx["train"]][present[m][idx["train"]]]
            mean = tr.mean(axis=0, keepdims=True)
            std = tr.std(axis=0, keepdims=True)
            std[std < 1e-8] = 1.0
            arrays[m] = ((arrays[m] - mean) / std).astype(np.float32)

    def subset(s: str) -> ArrayDataset:
        i = idx[s]
        return ArrayDataset({m: arrays[m][i] for m in order}, labels[i], {m: present[m][i] for m in order})

    return DataSplits(
        train=subset("train"), val=subset("val"), test=subset("test"), modalities=order,
        num_classes=num_classes, input_shapes={m: tuple(arrays[m].shape[1:]) for m in order},
        default_encoders={m: "mlp" for m in order},
        info={"name": name or Path(path).stem, "sizes": {s: int(len(idx[s])) for s in SPLITS},
              "missing": {m: int((~present[m]).sum()) for m in order}},
    )


def _resolve_split(data: dict[str, np.ndarray], labels: np.ndarray, path: str, seed: int,
                   val_fraction: float) -> np.ndarray:
    n = len(labels)
    if "split" not in data:
        parts = stratified_split(labels, (0.6, 0.2, 0.2), seed)
        split = np.empty(n, dtype="<U5")
        for s, i in zip(SPLITS, parts):
            split[i] = s
        return split
    split = np.asarray(data["split"]).astype(str)
    if split.shape != (n,):
        raise _err(path, f"'split' must have shape ({n},), got {split.shape}")
    bad = sorted(set(split.tolist()) - set(SPLITS))
    if bad:
        raise _err(path, f"'split' has values {bad}; allowed: train, val, test")
    if not (split == "val").any() and (split == "train").any():
        tr = np.flatnonzero(split == "train")
        keep, val = stratified_split(labels[tr], (1 - val_fraction, val_fraction), seed)
        split = split.copy()
        split[tr[val]] = "val"
    return split
