"""Loaders for the field's audio-visual benchmarks: ``crema_d``, ``kinetics_sounds``, ``ave``.

They read the layout written by ``mmbalance preprocess`` (see :mod:`mmbalance.data.preprocess`)
from ``root``:

* **audio**: ``audio/<clip>.npy``, the dataset's spectrogram recipe, fed as ``(1, *shape)``
  in the recipe's own axis order (the field's code): CREMA-D ``(1, 257, 188)`` and AVE
  ``(1, 257, 1004)`` are frequency x time; Kinetics-Sounds ``(1, 1024, 128)`` is time x mel.
* **visual**: ``num_frames`` frames of ``visual/<clip>/*.jpg`` (the list sorted by name), one
  per equal segment of the clip: a random frame of each segment in training, the segment's
  middle frame at evaluation; clips with fewer frames than segments repeat frames (padding,
  never rejection). Transforms as the field's code: training ``RandomResizedCrop(image_size)``
  + ``RandomHorizontalFlip`` (drawn per frame, as there) + ImageNet normalisation; evaluation
  ``Resize((image_size, image_size))`` + the same normalisation. Output ``(3, T, H, W)``.

Splits come from the ``train.txt`` / ``val.txt`` / ``test.txt`` lists; without ``val.txt`` a
validation split is carved from train (``val_fraction``, stratified, fixed seed), so model
selection never looks at the test set. ``train_eval`` is the training split with evaluation
transforms. The class list is ``classes.txt`` or the file named by ``classes`` (e.g. the 31-
or 34-class Kinetics-Sounds lists; clips of other classes are dropped).

CREMA-D's usual split shares its 91 actors between train and test; ``actor_disjoint=True``
re-splits all clips by actor (the actor id is the first field of the clip name,
``1001_DFA_ANG_XX``): 10% of actors for test, 10% for validation, fixed seed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from . import register_dataset
from .base import DataSplits, stratified_split

__all__ = ["AVClipDataset", "sample_frame_indices", "load_av_layout", "crema_d", "kinetics_sounds", "ave",
           "actor_disjoint_split", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_SEED = 0

# the option types the three loaders share
AVModality = Literal["audio", "visual"]
Frames = Annotated[int, Interval(1, None)]
ImageSize = Annotated[int, Interval(1, None)]
ValFraction = Annotated[float, Interval(0, 1, closed="neither")]


def sample_frame_indices(n_frames: int, num_segments: int, train: bool,
                         generator: torch.Generator | None = None) -> list[int]:
    """Indices of one frame per equal segment of ``n_frames``: random (train) or middle (eval).

    Segment ``i`` holds frames ``floor(i n / T) .. max(that, floor((i + 1) n / T) - 1)``; with
    fewer frames than segments, frames repeat.

    >>> sample_frame_indices(10, 3, train=False)
    [1, 4, 7]
    >>> sample_frame_indices(2, 3, train=False)
    [0, 0, 1]
    """
    if n_frames < 1:
        raise ValueError("a clip needs at least one frame")
    out = []
    for i in range(num_segments):
        lo = (i * n_frames) // num_segments
        hi = max(lo, ((i + 1) * n_frames) // num_segments - 1)
        if train:
            out.append(lo + int(torch.randint(0, hi - lo + 1, (1,), generator=generator)))
        else:
            out.append((lo + hi) // 2)
    return out


def _transforms(train: bool, image_size: int):
    from torchvision import transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), norm])


class AVClipDataset(Dataset):
    """Clips of a preprocessed audio-visual dataset; samples follow the batch contract."""

    def __init__(self, root: str | os.PathLike, clips: Sequence[str], labels: Sequence[int], modalities: Sequence[str],
                 num_frames: int, train: bool, image_size: int = 224):
        self.root = Path(root)
        self.clips = list(clips)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.modalities = list(modalities)
        self.num_frames = int(num_frames)
        self.train = bool(train)
        self.image_size = int(image_size)
        self.transform = _transforms(self.train, self.image_size)

    def __len__(self) -> int:
        return len(self.clips)

    def frame_files(self, i: int) -> list[Path]:
        """The sorted frame files of clip ``i``."""
        folder = self.root / "visual" / self.clips[i]
        try:
            names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        except FileNotFoundError:
            names = []
        if not names:
            raise ConfigError(f"clip {self.clips[i]} has no frames in {folder}; rerun mmbalance preprocess")
        return [folder / f for f in names]

    def load_audio(self, i: int) -> torch.Tensor:
        spec = np.load(self.root / "audio" / f"{self.clips[i]}.npy").astype(np.float32)
        return torch.from_numpy(spec).unsqueeze(0)

    def load_visual(self, i: int) -> torch.Tensor:
        from PIL import Image

        files = self.frame_files(i)
        idx = sample_frame_indices(len(files), self.num_frames, self.train)
        frames = []
        for k in idx:
            with Image.open(files[k]) as img:
                frames.append(self.transform(img.convert("RGB")))
        return torch.stack(frames, dim=1)  # (3, T, H, W)

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {m: (self.load_audio(i) if m == "audio" else self.load_visual(i)) for m in self.modalities}
        return {"inputs": inputs, "label": self.labels[i], "index": torch.tensor(i, dtype=torch.long),
                "present": {m: torch.tensor(True) for m in self.modalities}}


def _read_list(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        clip, _, label = line.strip().partition(",")
        rows.append((clip.strip(), label.strip()))
    return rows


def load_av_layout(dataset: str, root: str | None, classes: str | None = None) -> tuple[dict[str, Any], list[str], dict[str, list[tuple[str, str]]]]:
    """Read ``meta.json``, the class list and the split lists of a preprocessed folder."""
    hint = f"make it with: mmbalance preprocess {dataset} --source RAW_DIR --output DIR, then pass --dataset.root DIR"
    if not root:
        raise ConfigError(f"{dataset} needs the option root (a folder made by mmbalance preprocess); {hint}")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise ConfigError(f"{dataset} root {root} is not a folder; {hint}")
    missing = [n for n in ("classes.txt", "train.txt", "test.txt", "audio", "visual") if not (r / n).exists()]
    if missing:
        raise ConfigError(f"{dataset} root {root} lacks {', '.join(missing)}; {hint}")
    meta = json.loads((r / "meta.json").read_text()) if (r / "meta.json").is_file() else {}
    if meta.get("dataset", dataset) != dataset:
        raise ConfigError(f"{root} holds preprocessed {meta['dataset']}, not {dataset}")
    if classes:
        if not os.path.isfile(classes):
            raise ConfigError(f"{dataset} class list file not found: {classes}")
        class_names = [ln.strip() for ln in Path(classes).read_text().splitlines() if ln.strip()]
    else:
        class_names = [ln.strip() for ln in (r / "classes.txt").read_text().splitlines() if ln.strip()]
    if not class_names:
        raise ConfigError(f"{dataset}: the class list is empty")
    lists = {s: _read_list(r / f"{s}.txt") for s in ("train", "val", "test") if (r / f"{s}.txt").is_file()}
    return meta, class_names, lists


def actor_disjoint_split(clips: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                         seed: int = SPLIT_SEED) -> list[list[int]]:
    """Split clip indices into train/val/test so that no actor (first ``_`` field) is in two splits."""
    actors = sorted({c.split("_")[0] for c in clips})
    rng = np.random.default_rng(seed)
    order = [actors[i] for i in rng.permutation(len(actors))]
    n = len(order)
    n_test = max(1, round(fractions[2] * n))
    n_val = max(1, round(fractions[1] * n)) if n - n_test > 1 else 0
    test_a, val_a = set(order[:n_test]), set(order[n_test:n_test + n_val])
    parts: list[list[int]] = [[], [], []]
    for i, c in enumerate(clips):
        a = c.split("_")[0]
        parts[2 if a in test_a else 1 if a in val_a else 0].append(i)
    return parts


def _build(dataset: str, root: str | None, modalities: list[str] | None, num_frames: int, image_size: int,
           classes: str | None, val_fraction: float, actor_disjoint: bool = False) -> DataSplits:
    mods = list(modalities) if modalities else ["audio", "visual"]
    if len(set(mods)) != len(mods):  # repeated names: not expressible as a type
        raise ConfigError(f"{dataset} option 'modalities' names a modality twice: {modalities!r}")
    meta, class_names, lists = load_av_layout(dataset, root, classes)
    index = {c: k for k, c in enumerate(class_names)}
    splits = {s: [(c, index[lab]) for c, lab in rows if lab in index] for s, rows in lists.items()}

    if actor_disjoint:
        pool = [x for s in ("train", "val", "test") for x in splits.get(s, [])]
        if len({c.split("_")[0] for c, _ in pool}) < 3:
            raise ConfigError(f"{dataset}: actor_disjoint needs clips of at least 3 actors in {root}")
        parts = actor_disjoint_split([c for c, _ in pool], (1 - 2 * val_fraction, val_fraction, val_fraction))
        splits = {s: [pool[i] for i in idx] for s, idx in zip(("train", "val", "test"), parts)}
    elif "val" not in splits or not splits["val"]:
        train = splits.get("train", [])
        tr_idx, va_idx = stratified_split(np.array([lab for _, lab in train], dtype=np.int64),
                                          [1 - val_fraction, val_fraction], SPLIT_SEED)
        if len(va_idx) == 0 and len(train) >= 2:  # tiny data: still hold one clip out
            va_idx, tr_idx = tr_idx[-1:], tr_idx[:-1]
        splits["val"] = [train[i] for i in va_idx]
        splits["train"] = [train[i] for i in tr_idx]
    for s in ("train", "val", "test"):
        if not splits.get(s):
            raise ConfigError(f"{dataset}: the {s} split of {root} is empty (check the split lists and the class list)")

    def make(s: str, train: bool) -> AVClipDataset:
        rows = splits[s]
        return AVClipDataset(root, [c for c, _ in rows], [lab for _, lab in rows], mods, num_frames, train, image_size)

    from .audio import RECIPES

    audio_shape = tuple(meta.get("audio_shape") or RECIPES[dataset].shape)
    shapes = {"audio": (1, *audio_shape), "visual": (3, num_frames, image_size, image_size)}
    return DataSplits(
        train=make("train", True), val=make("val", False), test=make("test", False), train_eval=make("train", False),
        modalities=mods, num_classes=len(class_names), input_shapes={m: shapes[m] for m in mods},
        default_encoders={m: f"resnet18_{m}" for m in mods}, encoder_options={m: {} for m in mods},
        class_names=class_names,
        info={"root": str(root), "num_frames": num_frames, "image_size": image_size, "actor_disjoint": actor_disjoint,
              "sizes": {s: len(splits[s]) for s in ("train", "val", "test")}},
    )


@register_dataset("crema_d", summary="CREMA-D emotions (6 classes), audio + visual, from a folder made by mmbalance preprocess")
def crema_d(root: str | None = None, modalities: list[AVModality] | None = None, num_frames: Frames = 1,
            image_size: ImageSize = 224, classes: str | None = None, val_fraction: ValFraction = 0.1,
            actor_disjoint: bool = False) -> DataSplits:
    """CREMA-D: 257 x 188 log STFT + ``num_frames`` frames (OGM-GE uses 1; PMR 3; MMPareto 2).

    Options:
        root: the folder made by ``mmbalance preprocess`` (required).
        modalities: which of ``audio``, ``visual`` to load (default both).
        num_frames: video frames per clip, one per equal segment (default 1).
        image_size: side in pixels of the frames after cropping / resizing (default 224).
        classes: a class-list file instead of the folder's ``classes.txt`` (clips of other classes are dropped).
        val_fraction: share of the training list held out for validation when there is no ``val.txt`` (default 0.1).
        actor_disjoint: re-split all clips by actor, 10% of actors for test and 10% for validation (default False).
    """
    return _build("crema_d", root, modalities, num_frames, image_size, classes, val_fraction, actor_disjoint)


@register_dataset("kinetics_sounds", summary="Kinetics-Sounds (31 or 34 classes from classes.txt), audio + visual, from mmbalance preprocess")
def kinetics_sounds(root: str | None = None, modalities: list[AVModality] | None = None, num_frames: Frames = 3,
                    image_size: ImageSize = 224, classes: str | None = None,
                    val_fraction: ValFraction = 0.1) -> DataSplits:
    """Kinetics-Sounds: 1024 x 128 Kaldi fbank + 3 frames (OGM-GE).

    Options:
        root: the folder made by ``mmbalance preprocess`` (required).
        modalities: which of ``audio``, ``visual`` to load (default both).
        num_frames: video frames per clip, one per equal segment (default 3).
        image_size: side in pixels of the frames after cropping / resizing (default 224).
        classes: a class-list file instead of the folder's ``classes.txt`` (clips of other classes are dropped).
        val_fraction: share of the training list held out for validation when there is no ``val.txt`` (default 0.1).
    """
    return _build("kinetics_sounds", root, modalities, num_frames, image_size, classes, val_fraction)


@register_dataset("ave", summary="AVE audio-visual events (28 classes), audio + visual, from mmbalance preprocess")
def ave(root: str | None = None, modalities: list[AVModality] | None = None, num_frames: Frames = 3,
        image_size: ImageSize = 224, classes: str | None = None, val_fraction: ValFraction = 0.1) -> DataSplits:
    """AVE: 257 x 1004 log spectrogram + 3 frames (OGM-GE; PMR uses 4); its own val split.

    Options:
        root: the folder made by ``mmbalance preprocess`` (required).
        modalities: which of ``audio``, ``visual`` to load (default both).
        num_frames: video frames per clip, one per equal segment (default 3).
        image_size: side in pixels of the frames after cropping / resizing (default 224).
        classes: a class-list file instead of the folder's ``classes.txt`` (clips of other classes are dropped).
        val_fraction: share of the training list held out for validation when there is no ``val.txt`` (default 0.1).
    """
    return _build("ave", root, modalities, num_frames, image_size, classes, val_fraction)
