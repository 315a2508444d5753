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

import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..registry import ConfigError

Batch = dict[str, Any]
SPLITS = ("train", "val", "test")
log = logging.getLogger("mmbalance")


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


def _as_tensor(x: Any, dtype: torch.dtype, what: str) -> torch.Tensor:
    try:
        if isinstance(x, torch.Tensor):
            return x.to(dtype)
        a = np.asarray(x)
        if a.dtype.kind not in "biuf":
            raise TypeError(f"dtype {a.dtype}")
        return torch.as_tensor(a, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"ArrayDataset: {what} must be a numeric array ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


class ArrayDataset(Dataset):
    """In-memory multimodal dataset over float arrays (one per modality), with labels.

    ``present`` optionally marks missing modalities per sample; a missing modality's input is
    returned as zeros.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray | torch.Tensor], labels: np.ndarray | torch.Tensor,
                 present: Mapping[str, np.ndarray | torch.Tensor] | None = None):
        self.modalities = list(arrays)
        self.arrays = {m: _as_tensor(a, torch.float32, f"modality '{m}'") for m, a in arrays.items()}
        self.labels = _as_tensor(labels, torch.long, "labels")
        if self.labels.dim() != 1:
            raise ConfigError(f"ArrayDataset: labels must be 1-D (N,), got shape {tuple(self.labels.shape)}")
        n = len(self.labels)
        unknown = [m for m in (present or {}) if m not in self.arrays]
        if unknown:
            raise ConfigError(f"ArrayDataset: present names modality {unknown} that has no array; "
                              f"modalities: {', '.join(self.modalities)}")
        self.present = {m: torch.ones(n, dtype=torch.bool) for m in self.modalities}
        for m, p in (present or {}).items():
            self.present[m] = _as_tensor(p, torch.bool, f"present mask of '{m}'")
        for m in self.modalities:
            a, p = self.arrays[m], self.present[m]
            if a.dim() == 0 or a.shape[0] != n:
                raise ConfigError(f"ArrayDataset: modality '{m}' has {a.shape[0] if a.dim() else 0} samples "
                                  f"but labels has {n}; the first dimension of every modality must be N")
            if tuple(p.shape) != (n,):
                raise ConfigError(f"ArrayDataset: present mask of '{m}' must have shape ({n},), got {tuple(p.shape)}")
            a[~p] = 0.0

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


# ----------------------------------------------------------------------------- validation
def check_modality_name(name: Any, where: str) -> str:
    """A modality name must be a Python identifier: it becomes a module name (``encoders.<m>``),
    a config key (``--model.encoders.<m>.width``) and a results key."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"{where}: modality name {name!r} is not a valid identifier (letters, digits and _, "
                          "not starting with a digit); rename it")
    return name


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing Python's, NumPy's or torch's (CPU) global random state, so
    reading a sample to check it (random augmentation) never changes a seeded run."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _fmt_list(xs: Sequence[Any], k: int = 5) -> str:
    xs = list(xs)
    return ", ".join(str(x) for x in xs[:k]) + (f", ... ({len(xs)} in all)" if len(xs) > k else "")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def validate_splits(data: DataSplits, source: str | None = None) -> DataSplits:
    """Check a :class:`DataSplits` before anything is built from it; return it unchanged.

    Works for every dataset (the ``.npz`` format, registered datasets, splits made in Python).
    Each problem raises :class:`~mmbalance.registry.ConfigError` with one line that names
    ``source`` (default: ``data.info["name"]``) and says what to fix:

    * modalities: a non-empty list of distinct identifiers, each with an input shape of positive
      sizes (a modality with zero features is an error);
    * ``num_classes`` >= 2 and at most the number of training samples (checked before any
      per-class count, so a huge label value never allocates anything);
    * every split non-empty; labels (where a dataset keeps a ``labels`` array) 1-D integers in
      ``[0, num_classes)``; every class has at least one training sample;
    * in-memory datasets (``arrays`` / ``present`` attributes, as :class:`ArrayDataset`): no
      ``present`` mask for an unknown modality, no NaN/inf in present samples, at least 2
      training samples of each modality; a modality absent from every sample of val or test is
      logged (its metrics there cannot be computed and are written as null);
    * the first sample of each split follows the batch contract with the declared shapes
      (read with the global random state preserved).

    Cost: one pass over in-memory arrays and labels, one sample per split.
    """
    where = source or str((data.info or {}).get("name") or "dataset")

    def fail(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    mods = data.modalities
    if not isinstance(mods, (list, tuple)) or not mods:
        fail("has no modalities; a dataset needs at least one")
    for m in mods:
        check_modality_name(m, where)
    if len(set(mods)) != len(mods):
        fail(f"modality names repeat: {list(mods)}")

    C = data.num_classes
    if isinstance(C, bool) or not isinstance(C, (int, np.integer)):
        fail(f"num_classes must be an integer, got {C!r}")
    C = int(C)
    if C < 2:
        fail(f"has {C} class{'es' if C != 1 else ''}; a classifier needs labels of at least 2 classes")

    for m in mods:
        if m not in data.input_shapes:
            fail(f"input_shapes has no entry for modality '{m}'")
        shape = data.input_shapes[m]
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            fail(f"input shape of modality '{m}' must be a tuple of sizes, got {shape!r}")
        if not dims or any(d < 1 for d in dims):
            fail(f"modality '{m}' has no features (input shape {dims}); drop it or give each sample at least "
                 "one feature")

    splits = {s: getattr(data, s) for s in SPLITS}
    sizes: dict[str, int] = {}
    for s, ds in splits.items():
        try:
            sizes[s] = len(ds)
        except TypeError:
            fail(f"the {s} split must be a map-style dataset with a length, got {type(ds).__name__}")
        if sizes[s] == 0:
            fail(f"the {s} split is empty; every split needs samples")

    if C > sizes["train"]:
        fail(f"has {C} classes but only {sizes['train']} training samples; every class needs a training "
             "sample (labels must be class indices 0..C-1: remap them, e.g. np.unique(labels, return_inverse=True))")

    labels: dict[str, np.ndarray | None] = {}
    for s, ds in splits.items():
        raw = getattr(ds, "labels", None)
        if raw is None:
            labels[s] = None
            continue
        y = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        if y.ndim != 1 or len(y) != sizes[s]:
            fail(f"the {s} split has {sizes[s]} samples but labels of shape {y.shape}")
        if y.dtype.kind not in "iu":
            fail(f"labels of the {s} split must be integers, got dtype {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= C:
            bad = lo if lo < 0 else hi
            fail(f"the {s} split has label {bad}, outside [0, {C}) (num_classes {C}); labels must be class "
                 "indices 0..num_classes-1")
        labels[s] = y
    if labels["train"] is not None:
        counts = np.bincount(labels["train"], minlength=C)  # C <= number of training samples
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            fail(f"class{'es' if len(empty) > 1 else ''} {_fmt_list(empty.tolist())} ha{'ve' if len(empty) > 1 else 's'} "
                 "no training sample; every class needs at least one (move samples to train, or remap labels to "
                 "0..C-1 without gaps)")

    for s, ds in splits.items():
        _check_arrays(ds, s, mods, data, where, fail)
    for s, ds in splits.items():
        _check_first_sample(ds, s, mods, C, data, fail)
    return data


def _check_arrays(ds: Dataset, s: str, mods: Sequence[str], data: DataSplits, where: str, fail) -> None:
    """Checks of in-memory datasets (``arrays`` and/or ``present`` attributes)."""
    present = getattr(ds, "present", None)
    arrays = getattr(ds, "arrays", None)
    n = len(ds)
    if isinstance(present, Mapping):
        unknown = [m for m in present if m not in mods]
        if unknown:
            fail(f"the {s} split has a present mask for {unknown}, which is not a modality; "
                 f"modalities: {', '.join(mods)}")
    any_present = np.zeros(n, dtype=bool) if isinstance(present, Mapping) else None
    for m in mods:
        p = None
        if isinstance(present, Mapping) and m in present:
            p = torch.as_tensor(present[m]).bool().cpu().reshape(-1)
            if len(p) != n:
                fail(f"the present mask of '{m}' in the {s} split has {len(p)} entries for {n} samples")
            k = int(p.sum())
            if s == "train" and k < 2:
                fail(f"modality '{m}' is present in {k} training sample(s); at least 2 are needed to learn it")
            if k == 0:
                log.warning("%s: modality '%s' is absent from every sample of the %s split; its metrics there "
                            "cannot be computed (written as null)", where, m, s)
            any_present |= p.numpy()
        if isinstance(arrays, Mapping) and m in arrays:
            a = arrays[m]
            a = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
            if tuple(a.shape[1:]) != tuple(int(d) for d in data.input_shapes[m]):
                fail(f"modality '{m}' of the {s} split has sample shape {tuple(a.shape[1:])} but input_shapes "
                     f"says {tuple(data.input_shapes[m])}")
            rows = a.reshape(len(a), -1) if a.dim() else a.reshape(1, -1)
            if p is not None:
                rows = rows[p]
            if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
                bad = ~torch.isfinite(rows).all(dim=1)
                fail(f"modality '{m}' has NaN or inf values in {int(bad.sum())} sample(s) of the {s} split; "
                     "fix or mark them absent")
    if any_present is not None and len(mods) > 1 and not any_present.all() and all(m in present for m in mods):
        k = int((~any_present).sum())
        log.warning("%s: %d sample(s) of the %s split have no modality present (first at position %d); "
                    "they carry no information", where, k, s,
                    int(np.flatnonzero(~any_present)[0]))


def _check_first_sample(ds: Dataset, s: str, mods: Sequence[str], C: int, data: DataSplits, fail) -> None:
    try:
        with preserved_rng():
            item = ds[0]
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a dataset's own failure, reported in one line
        fail(f"reading the first sample of the {s} split failed ({_one_line(e)})")
    if not isinstance(item, Mapping) or not {"inputs", "label", "present"} <= set(item):
        fail(f"a sample of the {s} split must be a mapping with inputs, label, index and present "
             f"(the batch contract), got {type(item).__name__}"
             + (f" with keys {sorted(item)}" if isinstance(item, Mapping) else ""))
    inputs, present = item["inputs"], item["present"]
    for m in mods:
        if not isinstance(inputs, Mapping) or m not in inputs:
            fail(f"samples of the {s} split have no input for modality '{m}'")
        x = inputs[m]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            fail(f"the input of modality '{m}' in the {s} split must be a float tensor, got "
                 f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if tuple(x.shape) != tuple(int(d) for d in data.input_shapes[m]):
            fail(f"the input of modality '{m}' in the {s} split has shape {tuple(x.shape)} but input_shapes says "
                 f"{tuple(data.input_shapes[m])}")
        if not isinstance(present, Mapping) or m not in present:
            fail(f"samples of the {s} split have no present flag for modality '{m}'")
    y = item["label"]
    y = int(y) if isinstance(y, (int, np.integer)) or (isinstance(y, torch.Tensor) and y.numel() == 1
                                                         and not y.is_floating_point()) else None
    if y is None or not 0 <= y < C:
        fail(f"the first label of the {s} split is {item['label']!r}; labels must be integer class indices in "
             f"[0, {C})")
