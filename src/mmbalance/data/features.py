"""The generic ``.npz`` features format (bring your own data).

One ``.npz`` file holding:

* ``labels`` — integer class indices, shape (N,), values 0..C-1 with every class used
  (classes = max + 1); integer-valued floats are accepted;
* optional ``split`` — N strings in {train, val, test}; without it a fixed stratified 60/20/20
  split is drawn (seed ``split_seed``); with ``train``/``test`` but no ``val``, a stratified
  ``val_fraction`` of train becomes the validation split;
* optional ``modality_names`` — the modality order; otherwise every other array, sorted;
* optional ``present_<modality>`` — boolean (or 0/1) (N,), False where that modality is missing;
* every other array is a modality whose first dimension is N (any trailing shape, at least
  one feature), of integer or float numbers; its name must be an identifier.

The file is validated on load, completely and before anything is built; each problem is
reported in one line (:class:`~mmbalance.registry.ConfigError`) that names the file and says
what to fix. Features are standardised per element with statistics of the *training* split only
(present samples only).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..options import Annotated, Interval, validate_options
from ..registry import ConfigError
from .base import ArrayDataset, DataSplits, _fmt_list, _one_line, check_modality_name, stratified_split, validate_splits

RESERVED = {"labels", "split", "modality_names"}
SPLITS = ("train", "val", "test")
_KIND_NAMES = {"b": "booleans", "U": "strings", "S": "byte strings", "O": "Python objects", "c": "complex numbers",
               "M": "datetimes", "m": "time deltas", "V": "raw/structured records"}
_F32_MAX = float(np.finfo(np.float32).max)
_REMAP = "remap them to 0..C-1, e.g. labels = np.unique(labels, return_inverse=True)[1]"
SplitSeed = Annotated[int, Interval(0, None)]
ValFraction = Annotated[float, Interval(0, 1, closed="neither")]


def _err(path: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def load_features(path: str | Path, modalities: list[str] | None = None, standardize: bool = True,
                  split_seed: SplitSeed = 0, val_fraction: ValFraction = 0.2, name: str | None = None) -> DataSplits:
    """Load and validate a features ``.npz`` file into :class:`DataSplits`.

    Options:
        path: the ``.npz`` file.
        modalities: which modality arrays to use, in order (default: all).
        standardize: standardise features with training-split statistics (default True).
        split_seed: seed of the stratified split drawn when the file has no ``split`` (default 0).
        val_fraction: fraction of train held out for validation when ``split`` has no ``val`` (default 0.2).
        name: the dataset's name in results (default: the file's stem).
    """
    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"dataset file not found: {path}")
    data: dict[str, np.ndarray] = {}
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - not a zip, truncated, ...
        raise _err(path, f"cannot be read as a .npz file ({_one_line(e)}); save it with np.savez") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise _err(path, "holds a single array, not a .npz archive of named arrays; save it with "
                         "np.savez(path, labels=..., <modality>=...)")
    with npz:
        for k in npz.files:
            try:
                data[k] = npz[k]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise _err(path, f"array '{k}' holds Python objects (dtype object); save numbers for features "
                                     "and labels and plain strings for split/modality_names") from None
                raise _err(path, f"array '{k}' cannot be read ({_one_line(e)})") from None
            except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError) as e:
                raise _err(path, f"is corrupt or truncated: array '{k}' cannot be read ({_one_line(e)})") from None
    return features_from_arrays(data, path, modalities, standardize, split_seed, val_fraction, name)


def _check_options(path: str, modalities: Any, standardize: Any, split_seed: Any, val_fraction: Any,
                   name: Any) -> dict[str, Any]:
    """The options of a direct :func:`features_from_arrays` call, coerced and checked against its
    declared types and ranges (the config layer does the same for ``load_features``); one
    ``ConfigError`` line naming ``path``."""
    given = {"modalities": modalities, "standardize": standardize, "split_seed": split_seed,
             "val_fraction": val_fraction, "name": name}
    given = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in given.items()}
    out = validate_options("dataset", path, features_from_arrays, given, skip=("data", "path"))
    modalities = out["modalities"]
    if modalities is not None and len(set(modalities)) != len(modalities):  # not expressible as a type
        raise _err(path, f"option modalities names a modality twice: {list(modalities)}")
    return {**out, "modalities": modalities or None}


def _labels(data: Mapping[str, Any], path: str) -> np.ndarray:
    if "labels" not in data:
        raise _err(path, "missing the 'labels' array (integer class index per sample)")
    labels = np.asarray(data["labels"])
    if labels.ndim != 1:
        what = "a 0-d array (a single value)" if labels.ndim == 0 else f"shape {labels.shape}"
        raise _err(path, f"'labels' must be 1-D (N,), got {what}")
    n = len(labels)
    if n == 0:
        raise _err(path, "'labels' is empty")
    kind = labels.dtype.kind
    if kind == "f":
        finite = np.isfinite(labels)
        if not finite.all():
            raise _err(path, f"'labels' has NaN or inf at index {int(np.flatnonzero(~finite)[0])}; labels must be "
                             "integer class indices")
        frac = labels != np.round(labels)
        if frac.any():
            i = int(np.flatnonzero(frac)[0])
            raise _err(path, f"'labels' must be integers, got {labels[i]!r} at index {i} (dtype {labels.dtype})")
    elif kind not in "iub":
        raise _err(path, f"'labels' must be integers, got dtype {labels.dtype} ({_KIND_NAMES.get(kind, kind)}); "
                         f"{_REMAP}")
    lo, hi = labels.min(), labels.max()
    if lo < 0:
        raise _err(path, f"'labels' must be >= 0, found {int(lo)}; {_REMAP}")
    # the class count is checked against the data before anything is allocated per class
    if hi >= n:
        raise _err(path, f"'labels' has the value {int(hi)}, i.e. {int(hi) + 1} classes, but only {n} samples; "
                         f"labels must be class indices 0..C-1: {_REMAP}")
    labels = labels.astype(np.int64)
    used = np.bincount(labels, minlength=int(hi) + 1)  # <= n entries
    if (used > 0).sum() < 2:
        raise _err(path, f"'labels' hold a single class ({int(hi)}); a classifier needs samples of at least 2 classes")
    unused = np.flatnonzero(used == 0)
    if len(unused):
        raise _err(path, f"'labels' skip class{'es' if len(unused) > 1 else ''} {_fmt_list(unused.tolist())} "
                         f"(no sample has {'them' if len(unused) > 1 else 'it'}, though the largest label is "
                         f"{int(hi)}); {_REMAP}")
    return labels


def _modality_order(data: Mapping[str, Any], path: str) -> list[str]:
    if "modality_names" in data:
        names = np.asarray(data["modality_names"])
        if names.ndim != 1 or names.dtype.kind not in "US" or len(names) == 0:
            raise _err(path, f"'modality_names' must be a non-empty 1-D array of strings, got dtype {names.dtype} "
                             f"shape {names.shape}")
        try:
            order = [str(m) if names.dtype.kind == "U" else m.decode() for m in names.tolist()]
        except UnicodeDecodeError:
            raise _err(path, "'modality_names' holds bytes that are not text; save it as str") from None
        dup = sorted({m for m in order if order.count(m) > 1})
        if dup:
            raise _err(path, f"'modality_names' lists {dup} more than once")
        bad = [m for m in order if m in RESERVED or m.startswith("present_")]
        if bad:
            raise _err(path, f"'modality_names' lists {bad}, which are not modality arrays")
        missing = [m for m in order if m not in data]
        if missing:
            raise _err(path, f"modality_names lists {missing} but the file has no such arrays")
    else:
        order = sorted(k for k in data if k not in RESERVED and not k.startswith("present_"))
    if not order:
        raise _err(path, "no modality arrays (every array other than labels/split/modality_names/present_* is a modality)")
    for m in order:
        check_modality_name(m, path + (" ('modality_names')" if "modality_names" in data else ""))
    masks = [k for k in data if k.startswith("present_")]
    for k in masks:
        if k[len("present_"):] not in order:
            raise _err(path, f"'{k}' is a presence mask for modality '{k[len('present_'):]}', which the file does not "
                             f"have; modalities: {', '.join(order)} (rename or remove the mask)")
    return order


def _modality(data: Mapping[str, Any], m: str, n: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(data[m])
    if a.ndim == 0:
        raise _err(path, f"modality '{m}' is a 0-d array (a single value); a modality needs one row per sample, "
                         f"shape ({n}, ...)")
    kind = a.dtype.kind
    if kind not in "fiu":
        raise _err(path, f"modality '{m}' holds {_KIND_NAMES.get(kind, a.dtype)} (dtype {a.dtype}); features must be "
                         "integer or float numbers" + (" (convert with .astype(np.float32))" if kind == "b" else ""))
    if a.shape[0] != n:
        raise _err(path, f"modality '{m}' has {a.shape[0]} samples but 'labels' has {n}; "
                         "the first dimension of every modality must be N")
    if int(np.prod(a.shape[1:], dtype=np.int64)) == 0:
        raise _err(path, f"modality '{m}' has no features (shape {a.shape}); drop it or give each sample at "
                         "least one feature")
    p = np.ones(n, dtype=bool)
    key = f"present_{m}"
    if key in data:
        raw = np.asarray(data[key])
        if raw.shape != (n,):
            raise _err(path, f"'{key}' must have shape ({n},), got {raw.shape}")
        if raw.dtype.kind == "b":
            p = raw.copy()
        elif raw.dtype.kind in "iuf" and np.isin(raw, (0, 1)).all():
            p = raw == 1
        else:
            raise _err(path, f"'{key}' must be booleans (True where '{m}' is present) or 0/1, got dtype {raw.dtype}"
                             + (" with other values" if raw.dtype.kind in "iuf" else ""))
    rows = a.reshape(n, -1)
    if kind == "f":
        bad = ~np.isfinite(rows).all(axis=1) & p
        if bad.any():
            raise _err(path, f"modality '{m}' has NaN or inf values in {int(bad.sum())} sample(s), "
                             f"first at index {int(np.flatnonzero(bad)[0])}")
    big = (np.abs(rows) > _F32_MAX).any(axis=1) & p if kind == "f" and a.dtype.itemsize > 4 else p & False
    if big.any():
        raise _err(path, f"modality '{m}' has values beyond the float32 range (|x| > 3.4e38) in {int(big.sum())} "
                         f"sample(s), first at index {int(np.flatnonzero(big)[0])}; rescale it")
    with np.errstate(over="ignore", invalid="ignore"):
        out = a.astype(np.float32).reshape(n, -1) if a.ndim == 1 else a.astype(np.float32)
    out[~p] = 0.0  # absent samples' values are never used (and may be NaN)
    return out, p


def features_from_arrays(data: Mapping[str, np.ndarray], path: str = "<arrays>",
                         modalities: Sequence[str] | None = None, standardize: bool = True,
                         split_seed: SplitSeed = 0, val_fraction: ValFraction = 0.2,
                         name: str | None = None) -> DataSplits:
    """Validate arrays in the features format and build :class:`DataSplits`.

    Either returns splits that pass :func:`~mmbalance.data.base.validate_splits`, or raises one
    :class:`~mmbalance.registry.ConfigError` naming ``path`` and the problem.
    """
    path = str(path)
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise _err(path, "must be a mapping of array names to arrays")
    opts = _check_options(path, modalities, standardize, split_seed, val_fraction, name)
    modalities, standardize, split_seed, val_fraction, name = (
        opts[k] for k in ("modalities", "standardize", "split_seed", "val_fraction", "name"))
    labels = _labels(data, path)
    n = len(labels)
    order = _modality_order(data, path)
    if modalities:
        unknown = [m for m in modalities if m not in order]
        if unknown:
            raise ConfigError(f"unknown modality {unknown}; modalities in {path}: {', '.join(order)}")
        order = list(modalities)

    arrays: dict[str, np.ndarray] = {}
    present: dict[str, np.ndarray] = {}
    for m in order:
        arrays[m], present[m] = _modality(data, m, n, path)

    split = _resolve_split(data, labels, path, int(split_seed), float(val_fraction))
    idx = {s: np.flatnonzero(split == s) for s in SPLITS}
    for s in SPLITS:
        if len(idx[s]) == 0:
            how = ("give it samples in the 'split' array" if "split" in data else
                   f"the automatic stratified split of {n} samples left it empty: add samples or give a 'split' array")
            raise _err(path, f"split '{s}' is empty; {how}")
    num_classes = int(labels.max()) + 1
    tr_labels = labels[idx["train"]]
    if num_classes > len(tr_labels):
        raise _err(path, f"{num_classes} classes but only {len(tr_labels)} training samples; every class needs a "
                         "training sample (put more samples in train)")
    no_train = np.flatnonzero(np.bincount(tr_labels, minlength=num_classes) == 0)
    if len(no_train):
        raise _err(path, f"class{'es' if len(no_train) > 1 else ''} {_fmt_list(no_train.tolist())} ha"
                         f"{'ve' if len(no_train) > 1 else 's'} no training sample (only in val/test); move some of "
                         "its samples to train")
    for m in order:
        k = int(present[m][idx["train"]].sum())
        if k < 2:
            raise _err(path, f"modality '{m}' has {k} training sample(s) present; at least 2 are needed to learn "
                             "and standardise it")

    if standardize:
        for m in order:
            tr = arrays[m][idx["train"]][present[m][idx["train"]]]
            mean = tr.mean(axis=0, dtype=np.float64, keepdims=True)
            std = tr.std(axis=0, dtype=np.float64, keepdims=True)
            std[~(std >= 1e-8)] = 1.0  # constant (or overflowing) features: centre only
            with np.errstate(over="ignore", invalid="ignore"):
                z = ((arrays[m] - mean) / std).astype(np.float32)
            z[~present[m]] = 0.0
            bad = ~np.isfinite(z.reshape(n, -1)).all(axis=1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise _err(path, f"modality '{m}': standardising with training statistics overflows float32 in "
                                 f"{int(bad.sum())} sample(s) (first at index {i}, split {split[i]}), a feature "
                                 "nearly constant in train but not there; rescale it or set dataset.standardize false")
            arrays[m] = z

    def subset(s: str) -> ArrayDataset:
        i = idx[s]
        return ArrayDataset({m: arrays[m][i] for m in order}, labels[i], {m: present[m][i] for m in order})

    splits = DataSplits(
        train=subset("train"), val=subset("val"), test=subset("test"), modalities=order,
        num_classes=num_classes, input_shapes={m: tuple(arrays[m].shape[1:]) for m in order},
        default_encoders={m: "mlp" for m in order},
        info={"name": name or Path(path).stem, "sizes": {s: int(len(idx[s])) for s in SPLITS},
              "missing": {m: int((~present[m]).sum()) for m in order}},
    )
    return validate_splits(splits, source=path)


def _resolve_split(data: Mapping[str, Any], labels: np.ndarray, path: str, seed: int,
                   val_fraction: float) -> np.ndarray:
    n = len(labels)
    if "split" not in data:
        parts = stratified_split(labels, (0.6, 0.2, 0.2), seed)
        split = np.empty(n, dtype="<U5")
        for s, i in zip(SPLITS, parts):
            split[i] = s
        return split
    raw = np.asarray(data["split"])
    if raw.shape != (n,):
        raise _err(path, f"'split' must have shape ({n},), got {raw.shape}")
    if raw.dtype.kind not in "US":
        raise _err(path, f"'split' must hold the strings train/val/test, got dtype {raw.dtype}")
    try:
        split = raw.astype(str)
    except UnicodeDecodeError:
        raise _err(path, "'split' holds bytes that are not text; save it as str") from None
    bad = sorted(set(split.tolist()) - set(SPLITS))
    if bad:
        raise _err(path, f"'split' has values {_fmt_list([repr(b) for b in bad])}; allowed: train, val, test")
    if not (split == "val").any() and (split == "train").any():
        tr = np.flatnonzero(split == "train")
        keep, val = stratified_split(labels[tr], (1 - val_fraction, val_fraction), seed)
        split = split.copy()
        split[tr[val]] = "val"
    return split
