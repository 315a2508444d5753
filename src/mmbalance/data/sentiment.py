"""Sentiment and emotion feature sets: ``mosi``, ``mosei``, ``iemocap`` (MulT pickles) and ``meld``.

**CMU-MOSI, CMU-MOSEI, IEMOCAP** are read from the pickles published with MulT
(``yaohungt/Multimodal-Transformer``, ``src/dataset.py``), the files BalanceBenchmark's
``Mosei_dataset.py`` reads as well::

    ROOT/mosi_data.pkl          (aligned)   ROOT/mosi_data_noalign.pkl          (unaligned)
    ROOT/mosei_senti_data.pkl               ROOT/mosei_senti_data_noalign.pkl
    ROOT/iemocap_data.pkl                   ROOT/iemocap_data_noalign.pkl

each ``{'train' | 'valid' | 'test': {'vision': (N, steps, d), 'audio': (N, steps, d), 'text':
(N, steps, d), 'labels': ..., 'id': ...}}`` (float arrays; ``root`` may also name the file).
Modalities here are ``audio``, ``visual`` (the pickle's ``vision``) and ``text``; MulT's
``valid`` split is the validation split. As in MulT, ``-inf`` audio values (MOSEI's COVAREP)
become 0; any other non-finite value does too, and the count is kept in ``info``.

*Variable lengths.* The pickles hold sequences zero-padded to a fixed length per modality
(aligned: 50 steps for MOSI/MOSEI, 20 for IEMOCAP; unaligned e.g. MOSI audio 375, visual
500), without lengths. Samples are fed as these fixed-length tensors ``(steps, features)``;
a step whose features are all 0 is padding, and the sequence encoders (``seq_transformer``,
``gru``: :mod:`mmbalance.models.sequence`, option ``mask: nonzero``) mask it out.
``standardize`` (off by default: MulT and BalanceBenchmark feed raw features) standardises
features with training statistics of real steps only and keeps padding at exactly 0, so the
rule still holds. An absent modality (missing-modality protocol) is all zeros, i.e. empty.

*Labels.* MOSI/MOSEI carry a sentiment score in [-3, 3]:

* ``labels: binary`` with ``binary_zero`` deciding what a score of exactly 0 is:
  ``exclude`` (default; positive > 0 vs negative < 0, zero-score samples dropped from every
  split: MulT's evaluation, ``eval_metrics.py`` called with ``exclude_zero=True``),
  ``positive`` (>= 0 vs < 0, BalanceBenchmark ``Mosei_dataset.py`` ``acc2``) or ``negative``
  (> 0 vs <= 0, MulT's evaluation with ``exclude_zero=False``).
* ``labels: 7class``: ``round(clip(score, -3, 3))`` with NumPy's round-half-to-even, as MulT's
  ``multiclass_acc``; classes ``-3 .. 3``.

IEMOCAP's labels are ``(N, 4, 2)``: for each of MulT's four emotions (neutral, happy, sad,
angry) a one-hot (no, yes); MulT trains four binary tasks. ``task: 4class`` (default) makes
one 4-way label per sample, the emotion marked yes; samples with no or several emotions marked
are dropped (counted in ``info``). ``task: neutral | happy | sad | angry`` is MulT's binary task
for that emotion.

**MELD** is read from the utterance-level feature pickle of the DialogueRNN / MMGCN lineage
(``MELD_features_raw1.pkl``, MMGCN's, with visual features; or ``MELD_features_raw.pkl``,
DialogueRNN's, text and audio only): a tuple ``(videoIDs, videoSpeakers, videoLabels,
videoText, videoAudio, videoVisual, videoSentence, trainVid, testVid, videoSentiment)`` (the
9-item DialogueRNN file has no ``videoVisual``), or a dict with these keys. Every ``video*``
item maps a dialogue id to one entry per utterance; a sample is one utterance with feature
vectors ``text``, ``audio``, ``visual`` (MLP encoders by default). Labels: ``emotion`` (7:
neutral, surprise, fear, sadness, joy, disgust, anger, the DialogueRNN coding) or
``sentiment`` (3, the file's own coding, named ``sentiment_0..2``). ``trainVid`` holds MELD's
train and dev dialogues: a validation split of ``val_fraction`` of those *dialogues* is carved
with a fixed seed (utterances of one dialogue never straddle train and validation);
``testVid`` is the test split.

Pickles can run code when loaded: only read files you trust.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence

import numpy as np

from ..options import Interval
from ..registry import ConfigError
from . import register_dataset
from .base import SPLITS, ArrayDataset, DataSplits, validate_splits

__all__ = ["read_pickle", "sentiment_classes", "iemocap_classes", "standardize_sequences", "mult_dataset",
           "meld_dataset", "MULT_LAYOUT", "MELD_LAYOUT", "IEMOCAP_EMOTIONS", "MELD_EMOTIONS"]

log = logging.getLogger("mmbalance")

MULT_FILES = {"mosi": "mosi", "mosei": "mosei_senti", "iemocap": "iemocap"}
MULT_KEYS = {"audio": "audio", "visual": "vision", "text": "text"}  # our name -> pickle key
MULT_SPLITS = {"train": "train", "val": "valid", "test": "test"}
MULT_LAYOUT = ("{'train' | 'valid' | 'test': {'vision' | 'audio' | 'text': float array (N, steps, features), "
               "'labels': array (N, ...)}}")
IEMOCAP_EMOTIONS = ["neutral", "happy", "sad", "angry"]  # MulT eval_metrics.py order
MELD_EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
MELD_ITEMS_10 = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoVisual",
                 "videoSentence", "trainVid", "testVid", "videoSentiment")
MELD_ITEMS_9 = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoSentence",
                "trainVid", "testVid", "videoSentiment")
MELD_KEYS = {"text": "videoText", "audio": "videoAudio", "visual": "videoVisual"}
MELD_LAYOUT = ("a tuple (videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual, videoSentence, "
               "trainVid, testVid, videoSentiment) as MMGCN's MELD_features_raw1.pkl (9 items without videoVisual: "
               "DialogueRNN's MELD_features_raw.pkl), or a dict with these keys")
SPLIT_SEED = 0
ValFraction = Annotated[float, Interval(0, 1, closed="neither")]


# ----------------------------------------------------------------------------- files

def read_pickle(path: str | os.PathLike, what: str) -> Any:
    """Load a pickle (Python 2 pickles with latin-1 strings too); one-line ``ConfigError`` on failure."""
    try:
        with open(path, "rb") as f:
            try:
                return pickle.load(f)
            except UnicodeDecodeError:
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except OSError as e:
        raise ConfigError(f"{what}: cannot open {path} ({e.strerror or type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - truncated / not a pickle / missing class
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(f"{what}: {path} cannot be read as a pickle ({type(e).__name__}: {msg})") from None


def _resolve(dataset: str, root: str | None, names: Sequence[str], layout: str) -> Path:
    """``root`` as a file, or the first of ``names`` inside the folder ``root``."""
    if not root:
        raise ConfigError(f"{dataset} needs the option root: the folder holding {' or '.join(names)} (or the file "
                          f"itself), i.e. {layout}; pass --dataset.root PATH")
    r = Path(root).expanduser()
    if r.is_file():
        return r
    if not r.is_dir():
        raise ConfigError(f"{dataset} root {root} is neither a file nor a folder")
    for n in names:
        if (r / n).is_file():
            return r / n
    raise ConfigError(f"{dataset}: {root} has no {' or '.join(names)}; expected {layout}")


def _modalities(dataset: str, requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    mods = list(requested) if requested else list(available)
    bad = [m for m in mods if m not in available]
    if bad or not mods or len(set(mods)) != len(mods):
        raise ConfigError(f"{dataset} has modalities {', '.join(available)}; got {list(requested or [])!r}")
    return mods


def _numeric(a: Any, where: str, ndim: int | None = None) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception:  # noqa: BLE001 - ragged lists and the like
        arr = np.asarray(a, dtype=object)
    if arr.dtype.kind not in "biuf":
        raise ConfigError(f"{where} must be a numeric array, got {arr.dtype} of shape {arr.shape}")
    if ndim is not None and arr.ndim != ndim:
        raise ConfigError(f"{where} must have {ndim} dimensions, got shape {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- labels (pure)

def sentiment_classes(scores: np.ndarray, labels: str = "binary", binary_zero: str = "exclude") -> np.ndarray:
    """Class indices from sentiment scores in [-3, 3]; -1 marks a sample without a class.

    >>> s = np.array([-2.6, -0.4, 0.0, 0.5, 1.5, 2.5, 3.4])
    >>> sentiment_classes(s, "binary", "exclude").tolist()
    [0, 0, -1, 1, 1, 1, 1]
    >>> sentiment_classes(s, "binary", "positive").tolist(), sentiment_classes(s, "binary", "negative").tolist()
    ([0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1])
    >>> sentiment_classes(s, "7class").tolist()  # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    [0, 3, 3, 3, 5, 5, 6]
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels == "7class":
        return (np.round(np.clip(s, -3.0, 3.0)) + 3).astype(np.int64)
    if labels != "binary":
        raise ValueError(f"labels must be 'binary' or '7class', got {labels!r}")
    if binary_zero == "positive":
        return (s >= 0).astype(np.int64)
    if binary_zero == "negative":
        return (s > 0).astype(np.int64)
    if binary_zero != "exclude":
        raise ValueError(f"binary_zero must be exclude, positive or negative, got {binary_zero!r}")
    out = (s > 0).astype(np.int64)
    out[s == 0] = -1
    return out


def iemocap_classes(raw: np.ndarray, task: str = "4class") -> np.ndarray:
    """Class indices from MulT's IEMOCAP labels; -1 marks a sample without a (single) class.

    ``raw``: (N, 4, 2) one-hot (no, yes) per emotion (MulT takes the argmax of the last axis),
    or (N, 4) 0/1 per emotion. ``task``: ``4class`` (the one emotion marked yes) or one of
    neutral / happy / sad / angry (binary).

    >>> yes, no = [0, 1], [1, 0]
    >>> raw = np.array([[no, yes, no, no], [yes, no, no, no], [no, no, no, no], [yes, no, no, yes]])
    >>> iemocap_classes(raw).tolist(), iemocap_classes(raw, "angry").tolist()
    ([1, 0, -1, -1], [0, 0, 0, 1])
    """
    a = np.asarray(raw)
    if a.ndim == 3 and a.shape[1:] == (4, 2):
        marked = np.argmax(a, axis=-1) == 1
    elif a.ndim == 2 and a.shape[1] == 4:
        marked = a > 0.5
    else:
        raise ValueError(f"IEMOCAP labels must have shape (N, 4, 2) or (N, 4), got {a.shape}")
    if task == "4class":
        out = np.argmax(marked, axis=1).astype(np.int64)
        out[marked.sum(axis=1) != 1] = -1
        return out
    if task not in IEMOCAP_EMOTIONS:
        raise ValueError(f"task must be 4class or one of {IEMOCAP_EMOTIONS}, got {task!r}")
    return marked[:, IEMOCAP_EMOTIONS.index(task)].astype(np.int64)


# ----------------------------------------------------------------------------- features (pure)

def _finite(a: np.ndarray) -> tuple[np.ndarray, int]:
    a = np.asarray(a, dtype=np.float32)
    bad = ~np.isfinite(a)
    n = int(bad.sum())
    if n:
        a = a.copy() if not a.flags.writeable else a
        a[bad] = 0.0
    return a, n


def standardize_sequences(train: np.ndarray, others: Sequence[np.ndarray]) -> None:
    """Standardise (N, steps, d) arrays in place with the mean/std of the *real* steps (rows not
    all zero) of ``train``; padding rows stay exactly 0. A constant feature is only centred."""
    valid = (train != 0).any(axis=-1)
    rows = train[valid]
    if len(rows) == 0:
        return
    mean = rows.mean(axis=0, dtype=np.float64)
    std = rows.std(axis=0, dtype=np.float64)
    std[~(std >= 1e-8)] = 1.0
    for a in (train, *others):
        m = (a != 0).any(axis=-1)
        a[m] = ((a[m] - mean) / std).astype(np.float32)


def _pad_to(a: np.ndarray, steps: int) -> np.ndarray:
    if a.shape[1] == steps:
        return a
    out = np.zeros((a.shape[0], steps, a.shape[2]), dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _splits(name: str, arrays: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, np.ndarray],
            mods: list[str], num_classes: int, class_names: list[str], encoder: str,
            info: dict[str, Any], source: str) -> DataSplits:
    sets = {s: ArrayDataset({m: arrays[s][m] for m in mods}, labels[s]) for s in SPLITS}
    data = DataSplits(
        train=sets["train"], val=sets["val"], test=sets["test"], modalities=mods, num_classes=num_classes,
        input_shapes={m: tuple(arrays["train"][m].shape[1:]) for m in mods},
        default_encoders={m: encoder for m in mods}, encoder_options={m: {} for m in mods},
        class_names=class_names, info={"name": name, "sizes": {s: int(len(labels[s])) for s in SPLITS}, **info})
    return validate_splits(data, source=source)


# ----------------------------------------------------------------------------- MulT pickles

def _mult_split(obj: Any, split_key: str, path: Path, mods: list[str], label_key: str = "labels") -> dict[str, Any]:
    expected = f"expected a MulT-style pickle {MULT_LAYOUT}"
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{path}: holds a {type(obj).__name__}, not a dict of splits; {expected}")
    if split_key not in obj:
        raise ConfigError(f"{path}: missing key '{split_key}' (has {sorted(map(str, obj))}); {expected}")
    part = obj[split_key]
    if not isinstance(part, Mapping):
        raise ConfigError(f"{path}: ['{split_key}'] is a {type(part).__name__}, not a dict; {expected}")
    for k in [MULT_KEYS[m] for m in mods] + [label_key]:
        if k not in part:
            raise ConfigError(f"{path}: missing key '{k}' in ['{split_key}'] (has {sorted(map(str, part))}); {expected}")
    out: dict[str, Any] = {}
    n = None
    for m in mods:
        a = _numeric(part[MULT_KEYS[m]], f"{path}: ['{split_key}']['{MULT_KEYS[m]}']", ndim=3)
        if n is not None and a.shape[0] != n:
            raise ConfigError(f"{path}: ['{split_key}']['{MULT_KEYS[m]}'] has {a.shape[0]} samples, other modalities {n}")
        n = a.shape[0]
        out[m] = a
    lab = _numeric(part[label_key], f"{path}: ['{split_key}']['{label_key}']")
    if lab.ndim == 0 or lab.shape[0] != n:
        raise ConfigError(f"{path}: ['{split_key}']['{label_key}'] has shape {lab.shape}, expected {n} samples first")
    out["labels"] = lab
    return out


def mult_dataset(dataset: str, root: str | None, aligned: bool, modalities: Sequence[str] | None,
                 standardize: bool, to_classes, num_classes: int, class_names: list[str],
                 encoder: str = "seq_transformer", options: Mapping[str, Any] | None = None) -> DataSplits:
    """A MulT pickle as :class:`DataSplits`; ``to_classes(raw labels) -> class index or -1``."""
    prefix = MULT_FILES[dataset]
    fname = f"{prefix}_data.pkl" if aligned else f"{prefix}_data_noalign.pkl"
    path = _resolve(dataset, root, [fname], f"MulT's {fname} holding {MULT_LAYOUT}")
    mods = _modalities(dataset, modalities, list(MULT_KEYS))
    obj = read_pickle(path, dataset)
    raw = {s: _mult_split(obj, MULT_SPLITS[s], path, mods) for s in SPLITS}
    del obj
    arrays: dict[str, dict[str, np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    replaced = {m: 0 for m in mods}
    dropped: dict[str, int] = {}
    for s in SPLITS:
        try:
            y = to_classes(raw[s]["labels"])
        except ValueError as e:
            raise ConfigError(f"{path}: ['{MULT_SPLITS[s]}']['labels'] {e}") from None
        keep = y >= 0
        dropped[s] = int((~keep).sum())
        labels[s] = y[keep]
        arrays[s] = {}
        for m in mods:
            a, n_bad = _finite(raw[s][m][keep] if dropped[s] else raw[s][m])
            replaced[m] += n_bad
            arrays[s][m] = a
    steps = {m: max(arrays[s][m].shape[1] for s in SPLITS) for m in mods}
    for m in mods:
        dims = {arrays[s][m].shape[2] for s in SPLITS}
        if len(dims) > 1:
            raise ConfigError(f"{path}: modality '{MULT_KEYS[m]}' has different feature sizes across splits: {sorted(dims)}")
        for s in SPLITS:
            arrays[s][m] = _pad_to(arrays[s][m], steps[m])
        if standardize:
            standardize_sequences(arrays["train"][m], [arrays["val"][m], arrays["test"][m]])
    if any(replaced.values()):
        log.info("%s: replaced %s non-finite feature values by 0 (MulT sets -inf audio values to 0)", dataset,
                 {m: k for m, k in replaced.items() if k})
    if any(dropped.values()):
        log.info("%s: dropped samples without a class under these label options: %s", dataset, dropped)
    # samples whose sequence has no real step (all zero): kept as present, counted here
    empty = {s: {m: int((~(arrays[s][m] != 0).any(axis=(1, 2))).sum()) for m in mods} for s in SPLITS}
    info = {"file": path.name, "aligned": aligned, "steps": steps, "nonfinite_replaced": replaced,
            "dropped": dropped, "empty_sequences": empty, **dict(options or {})}
    return _splits(dataset, arrays, labels, mods, num_classes, class_names, encoder, info, dataset)


def _sentiment(dataset: str, root, aligned, modalities, labels, binary_zero, standardize) -> DataSplits:
    def to_classes(raw: np.ndarray) -> np.ndarray:
        if raw.size != raw.shape[0]:
            raise ValueError(f"must hold one sentiment score per sample, got shape {raw.shape}")
        return sentiment_classes(raw.reshape(-1), labels, binary_zero)

    if labels == "7class":
        n, names = 7, [str(k) for k in range(-3, 4)]
    else:
        n, names = 2, ["negative", "positive"]
    return mult_dataset(dataset, root, aligned, modalities, standardize, to_classes, n, names,
                        options={"labels": labels, "binary_zero": binary_zero})


_SENTIMENT_DOC = """
    Options:
        root: folder with MulT's {p}_data.pkl / {p}_data_noalign.pkl (or the file itself).
        aligned: read the word-aligned pickle ({p}_data.pkl) instead of the unaligned one.
        modalities: any of audio, visual, text (default all three).
        labels: binary (negative / positive) or 7class (rounded score, -3 .. 3).
        binary_zero: a score of exactly 0 in binary: exclude (MulT), positive (BalanceBenchmark) or negative.
        standardize: standardise features with training statistics of real steps (padding stays 0).
"""


@register_dataset("mosi", summary="CMU-MOSI sentiment (binary or 7-class), audio + visual + text sequences from MulT's pickles")
def mosi(root: str | None = None, aligned: bool = False, modalities: list[str] | None = None,
         labels: Literal["binary", "7class"] = "binary",
         binary_zero: Literal["exclude", "positive", "negative"] = "exclude",
         standardize: bool = False) -> DataSplits:
    return _sentiment("mosi", root, aligned, modalities, labels, binary_zero, standardize)


@register_dataset("mosei", summary="CMU-MOSEI sentiment (binary or 7-class), audio + visual + text sequences from MulT's pickles")
def mosei(root: str | None = None, aligned: bool = False, modalities: list[str] | None = None,
          labels: Literal["binary", "7class"] = "binary",
          binary_zero: Literal["exclude", "positive", "negative"] = "exclude",
          standardize: bool = False) -> DataSplits:
    return _sentiment("mosei", root, aligned, modalities, labels, binary_zero, standardize)


mosi.__doc__ = "CMU-MOSI from MulT's pickles (2,199 clips: 1,284 / 229 / 686).\n" + _SENTIMENT_DOC.format(p="mosi")
mosei.__doc__ = ("CMU-MOSEI from MulT's pickles (22,856 clips: 16,326 / 1,871 / 4,659).\n"
                 + _SENTIMENT_DOC.format(p="mosei_senti"))


@register_dataset("iemocap", summary="IEMOCAP, MulT's 4 emotions (4-way or one binary task), audio + visual + text sequences")
def iemocap(root: str | None = None, aligned: bool = False, modalities: list[str] | None = None,
            task: Literal["4class", "neutral", "happy", "sad", "angry"] = "4class",
            standardize: bool = False) -> DataSplits:
    """IEMOCAP from MulT's pickles (labels (N, 4, 2): no/yes per emotion).

    Options:
        root: folder with MulT's iemocap_data.pkl / iemocap_data_noalign.pkl (or the file itself).
        aligned: read the word-aligned pickle (iemocap_data.pkl) instead of the unaligned one.
        modalities: any of audio, visual, text (default all three).
        task: 4class (the one emotion marked; others dropped) or one emotion as a binary task (MulT).
        standardize: standardise features with training statistics of real steps (padding stays 0).
    """
    if task == "4class":
        n, names = 4, list(IEMOCAP_EMOTIONS)
    else:
        n, names = 2, [f"not_{task}", task]

    def to_classes(raw: np.ndarray) -> np.ndarray:
        return iemocap_classes(raw, task)

    return mult_dataset("iemocap", root, aligned, modalities, standardize, to_classes, n, names,
                        options={"task": task})


# ----------------------------------------------------------------------------- MELD

def _meld_fields(obj: Any, path: Path) -> dict[str, Any]:
    if isinstance(obj, (tuple, list)):
        if len(obj) == len(MELD_ITEMS_10):
            return dict(zip(MELD_ITEMS_10, obj))
        if len(obj) == len(MELD_ITEMS_9):
            return dict(zip(MELD_ITEMS_9, obj))
        raise ConfigError(f"{path}: holds a {type(obj).__name__} of {len(obj)} items; expected {MELD_LAYOUT}")
    if isinstance(obj, Mapping):
        return dict(obj)
    raise ConfigError(f"{path}: holds a {type(obj).__name__}; expected {MELD_LAYOUT}")


def _sorted_ids(ids: Any) -> list[Any]:
    ids = list(ids)
    try:
        return sorted(ids)
    except TypeError:
        return sorted(ids, key=str)


def meld_dataset(root: str | None, modalities: Sequence[str] | None, labels: str, val_fraction: float,
                 standardize: bool, file: str | None = None) -> DataSplits:
    names = [file] if file else ["MELD_features_raw1.pkl", "MELD_features_raw.pkl"]
    path = _resolve("meld", root, names, MELD_LAYOUT)
    fields = _meld_fields(read_pickle(path, "meld"), path)
    available = [m for m in ("text", "audio", "visual") if MELD_KEYS[m] in fields]
    mods = _modalities("meld", modalities, available)
    label_key = "videoLabels" if labels == "emotion" else "videoSentiment"
    for k in ["trainVid", "testVid", label_key] + [MELD_KEYS[m] for m in mods]:
        if k not in fields:
            raise ConfigError(f"{path}: missing key '{k}' (has {sorted(map(str, fields))}); expected {MELD_LAYOUT}")
    for k in [label_key] + [MELD_KEYS[m] for m in mods]:
        if not isinstance(fields[k], Mapping):
            raise ConfigError(f"{path}: '{k}' must map dialogue ids to per-utterance entries, got "
                              f"{type(fields[k]).__name__}; expected {MELD_LAYOUT}")
    num_classes = 7 if labels == "emotion" else 3
    class_names = list(MELD_EMOTIONS) if labels == "emotion" else [f"sentiment_{k}" for k in range(3)]

    train_ids = _sorted_ids(fields["trainVid"])
    test_ids = _sorted_ids(fields["testVid"])
    rng = np.random.default_rng(SPLIT_SEED)
    n_val = max(1, int(round(val_fraction * len(train_ids)))) if len(train_ids) > 1 else 0
    val_set = {train_ids[i] for i in rng.permutation(len(train_ids))[:n_val]}
    split_ids = {"train": [d for d in train_ids if d not in val_set], "val": [d for d in train_ids if d in val_set],
                 "test": test_ids}

    arrays: dict[str, dict[str, np.ndarray]] = {}
    ys: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    for s, ids in split_ids.items():
        rows: dict[str, list[np.ndarray]] = {m: [] for m in mods}
        lab: list[np.ndarray] = []
        for d in ids:
            if d not in fields[label_key]:
                raise ConfigError(f"{path}: dialogue {d!r} of {'testVid' if s == 'test' else 'trainVid'} has no entry "
                                  f"in '{label_key}'")
            y = _numeric(fields[label_key][d], f"{path}: {label_key}[{d!r}]").reshape(-1)
            for m in mods:
                table = fields[MELD_KEYS[m]]
                if d not in table:
                    raise ConfigError(f"{path}: dialogue {d!r} has no entry in '{MELD_KEYS[m]}'")
                try:
                    x = np.stack([np.asarray(u, dtype=np.float32).reshape(-1) for u in table[d]]) if len(table[d]) \
                        else np.zeros((0, 1), dtype=np.float32)
                except (ValueError, TypeError) as e:
                    raise ConfigError(f"{path}: {MELD_KEYS[m]}[{d!r}] must hold one numeric vector per utterance, all "
                                      f"of one size ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
                if len(x) != len(y):
                    raise ConfigError(f"{path}: dialogue {d!r} has {len(y)} labels but {len(x)} utterances in "
                                      f"'{MELD_KEYS[m]}'")
                if len(x):
                    if dims.setdefault(m, x.shape[1]) != x.shape[1]:
                        raise ConfigError(f"{path}: '{MELD_KEYS[m]}' vectors have sizes {dims[m]} and {x.shape[1]}")
                    rows[m].append(x)
            lab.append(y)
        y_all = np.concatenate(lab) if lab else np.zeros(0)
        if y_all.size and (y_all.min() < 0 or y_all.max() >= num_classes or (y_all != np.round(y_all)).any()):
            raise ConfigError(f"{path}: '{label_key}' holds values outside 0..{num_classes - 1}; expected {labels} "
                              "class indices")
        ys[s] = y_all.astype(np.int64)
        arrays[s] = {m: (np.concatenate(rows[m]).astype(np.float32) if rows[m]
                         else np.zeros((0, dims.get(m, 1)), dtype=np.float32)) for m in mods}
    replaced = {m: 0 for m in mods}
    for s in SPLITS:
        for m in mods:
            arrays[s][m], k = _finite(arrays[s][m])
            replaced[m] += k
    if standardize:
        for m in mods:
            tr = arrays["train"][m]
            if len(tr):
                mean, std = tr.mean(axis=0, dtype=np.float64), tr.std(axis=0, dtype=np.float64)
                std[~(std >= 1e-8)] = 1.0
                for s in SPLITS:
                    arrays[s][m] = ((arrays[s][m] - mean) / std).astype(np.float32)
    info = {"file": path.name, "labels": labels, "dialogues": {s: len(v) for s, v in split_ids.items()},
            "nonfinite_replaced": replaced}
    return _splits("meld", arrays, ys, mods, num_classes, class_names, "mlp", info, "meld")


@register_dataset("meld", summary="MELD utterances (7 emotions or 3 sentiments), text + audio + visual feature vectors (MMGCN/DialogueRNN pickle)")
def meld(root: str | None = None, modalities: list[str] | None = None,
         labels: Literal["emotion", "sentiment"] = "emotion", val_fraction: ValFraction = 0.1,
         standardize: bool = False, file: str | None = None) -> DataSplits:
    """MELD from the DialogueRNN / MMGCN utterance-feature pickle.

    Options:
        root: folder with MELD_features_raw1.pkl (MMGCN) or MELD_features_raw.pkl (DialogueRNN), or the file.
        modalities: any of text, audio, visual (default: all the file has).
        labels: emotion (7 classes) or sentiment (3 classes).
        val_fraction: fraction of the training dialogues held out for validation (fixed seed).
        standardize: standardise every feature with training statistics.
        file: the pickle's name inside root, when it is neither of the two above.
    """
    return meld_dataset(root, modalities, labels, val_fraction, standardize, file)
