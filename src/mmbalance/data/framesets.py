"""Frame-folder video datasets: ``ucf101`` (RGB + optical flow) and ``nvgesture`` (RGB, depth, flow).

Both read folders of JPEG frames (sorted by name) with the split lists the papers use, and
give each stream as a clip tensor ``(C, T, H, W)``: RGB ``C = 3`` (ImageNet-normalised),
depth ``C = 1`` and flow ``C = 2`` (the u and v images, in [0, 1] as stored; 0.5 = no motion).

**UCF-101** (BalanceBenchmark ``balancemm/datasets/ucf101_dataset.py``; the valuation and MLA
papers' UCF-101 runs)::

    ROOT/classInd.txt                 "1 ApplyEyeMakeup" (also under ROOT/ucfTrainTestlist/)
    ROOT/trainlist01.txt              "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
    ROOT/testlist01.txt               "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"
    ROOT/rgb/<video>/*.jpg            frames (BalanceBenchmark: 1 fps)
    ROOT/flow/u/<video>/*.jpg         horizontal flow, ROOT/flow/v/<video>/*.jpg vertical flow

(``rgb_dir``, ``flow_u_dir``, ``flow_v_dir`` name other folders, e.g. the TV-L1 release's
``jpegs_256``, ``tvl1_flow/u``, ``tvl1_flow/v``). ``split`` picks the official split 1, 2 or 3.
Each stream takes ``num_frames`` frames (BalanceBenchmark: 3), one per equal segment of its
own frame list: random in training, the segment middle at evaluation (as
:func:`~mmbalance.data.audiovisual.sample_frame_indices`). Frames are resized to
``image_size`` squared; training flips horizontally. Departures from BalanceBenchmark, which
draws a flip per image (RGB frames, u and v independently) and hard-codes 6 RGB frames: here
one flip is drawn per clip and applied to every frame of every stream, and flipping negates the
horizontal flow (u -> 1 - u), so motion stays consistent with the mirrored image. Videos
listed but missing a folder are dropped (as BalanceBenchmark does) and counted in ``info``.
UCF-101 has no validation split: one is carved from the training list by *group* (the
``_gNN_`` of the clip name: clips of one group come from one long video), ``val_fraction``
of the groups with a fixed seed, so near-duplicate clips never straddle train and validation.

**NVGesture** (MIE/IGM code ``njustkmg/IJCAI25-IGM`` ``datasets/nvGesture.py``; 25 classes,
1,050 / 482 clips)::

    ROOT/nvgesture_train_correct_cvpr2016.lst   the release's lists, lines "path:./Video_data/class_01/subject1_r0
    ROOT/nvgesture_test_correct_cvpr2016.lst      depth:sk_depth:138:218 color:sk_color:138:218 ... label:1"
    ROOT/frames/class_01/subject1_r0/rgb/*.jpg    the colour frames of the annotated range
    ROOT/frames/class_01/subject1_r0/depth/*.jpg  the depth frames (grayscale)
    ROOT/frames/class_01/subject1_r0/flow/u/*.jpg and .../flow/v/*.jpg

(``train_list`` / ``test_list`` name other list files, e.g. the ``_v2`` lists IGM uses.)
As IGM: every stream takes ``num_frames`` *consecutive* frames (IGM: 64 of the 80 annotated)
from one start shared by all streams, random in training; frames are resized to ``resize``
squared (IGM 256) and cropped to ``image_size`` (224) at one offset shared by all streams,
random in training and central at evaluation; no flips (IGM's flip probability is 0); RGB
ImageNet-normalised, depth and flow not. Departures: IGM evaluates on all 80 frames, which
the batch contract (one input shape per modality) does not allow, so evaluation takes the
central ``num_frames``; clips shorter than ``num_frames`` repeat their last frame (IGM pads
black frames); IGM reads flow from ``.npy`` files it does not say how it made, here flow is
u/v JPEGs like UCF-101's. Validation: ``val_fraction`` of the training *subjects* (fixed seed).

**Preprocessing** (``mmbalance preprocess ucf101|nvgesture --source RAW --output ROOT``):
PyAV decodes the videos (UCF-101: ``RAW/UCF-101/<Class>/<video>.avi`` with the official
``ucfTrainTestlist/``; NVGesture: the release's ``Video_data/`` and ``.lst`` files). UCF-101
frames are kept at ``--fps`` (default 1, BalanceBenchmark's); NVGesture keeps every frame of
the annotated colour and depth ranges. Optical flow is computed only when asked:
``--flow raft_small|raft_large --flow-weights FILE`` runs torchvision's RAFT with weights from
that local file (e.g. ``torchvision.models.optical_flow.raft_small(weights="DEFAULT")
.state_dict()`` saved where downloading works); for every kept frame, the flow to the next
decoded frame, stored like the TV-L1 JPEG releases: ``round(127.5 + 127.5 * flow / bound)``
clipped to [0, 255], ``bound`` 20 pixels. OpenCV's TV-L1 / Farneback are not used (OpenCV is
not a dependency); without ``--flow``, flow must be precomputed into the flow folders.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..options import Interval
from ..registry import ConfigError
from . import register_dataset
from .audiovisual import IMAGENET_MEAN, IMAGENET_STD, sample_frame_indices
from .base import DataSplits, stratified_split

__all__ = ["Stream", "FrameClips", "window_indices", "group_of", "subject_of", "read_ucf_lists",
           "read_nvgesture_list", "ucf101", "nvgesture", "add_preprocess_arguments", "run_preprocess",
           "quantize_flow", "PREPROCESS_DATASETS"]

log = logging.getLogger("mmbalance")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
SPLIT_SEED = 0
NV_LISTS = ("nvgesture_train_correct_cvpr2016.lst", "nvgesture_test_correct_cvpr2016.lst")
PREPROCESS_DATASETS = ("ucf101", "nvgesture")
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
PosInt = Annotated[int, Interval(1, None)]
ValFraction = Annotated[float, Interval(0, 1, closed="neither")]


# ----------------------------------------------------------------------------- clips

@dataclass(frozen=True)
class Stream:
    """One modality: its frame folders (``{id}`` is the clip id; one folder per image kind, the
    images' channels are concatenated), how images are read, whether it is ImageNet-normalised,
    and which channel a horizontal flip negates (flow u)."""

    folders: tuple[str, ...]
    gray: bool = False
    imagenet: bool = False
    negate_on_flip: int | None = None

    @property
    def channels(self) -> int:
        return len(self.folders) * (1 if self.gray else 3)


def window_indices(n_frames: int, length: int, train: bool, generator: torch.Generator | None = None,
                   start: int | None = None) -> list[int]:
    """``length`` consecutive frame indices out of ``n_frames``: a random start in training, the
    central window at evaluation; a short clip repeats its last frame.

    >>> window_indices(10, 4, train=False)
    [3, 4, 5, 6]
    >>> window_indices(2, 4, train=False)
    [0, 1, 1, 1]
    """
    if n_frames < 1:
        raise ValueError("a clip needs at least one frame")
    span = max(0, n_frames - length)
    if start is None:
        start = int(torch.randint(0, span + 1, (1,), generator=generator)) if train else span // 2
    return [min(start + k, n_frames - 1) for k in range(length)]


class FrameClips(Dataset):
    """Clips of frame folders; samples follow the batch contract.

    ``sampling``: ``segments`` (each stream: one frame per equal segment of its own frames,
    random in training, middle at evaluation) or ``window`` (consecutive frames from one start
    shared by all streams). Spatially: resize to ``resize`` squared (``None``: to
    ``image_size``), then a crop of ``image_size`` shared by all streams (random in training,
    central at evaluation), then, in training with ``flip``, one horizontal flip per clip.
    """

    def __init__(self, root: str | os.PathLike, ids: Sequence[str], labels: Sequence[int], streams: dict[str, Stream],
                 num_frames: int, train: bool, image_size: int, sampling: str = "segments",
                 resize: int | None = None, flip: bool = True):
        self.root = Path(root)
        self.ids = list(ids)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.streams = dict(streams)
        self.modalities = list(streams)
        self.num_frames = int(num_frames)
        self.train = bool(train)
        self.image_size = int(image_size)
        self.resize = int(resize) if resize else self.image_size
        self.sampling = sampling
        self.flip = bool(flip) and self.train
        self._files: dict[tuple[int, str], list[Path]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def folder(self, i: int, pattern: str) -> Path:
        return self.root / pattern.format(id=self.ids[i])

    def frame_files(self, i: int, pattern: str) -> list[Path]:
        """The sorted image files of one folder of clip ``i`` (cached)."""
        key = (i, pattern)
        if key not in self._files:
            folder = self.folder(i, pattern)
            try:
                names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
            except (FileNotFoundError, NotADirectoryError):
                names = []
            if not names:
                raise ConfigError(f"clip {self.ids[i]} has no frames in {folder} (expected {pattern.format(id='<clip>')}/"
                                  "*.jpg); rerun mmbalance preprocess")
            self._files[key] = [folder / f for f in names]
        return self._files[key]

    def _load(self, path: Path, gray: bool) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        with Image.open(path) as img:
            img = img.convert("L" if gray else "RGB").resize((self.resize, self.resize), Image.BILINEAR)
            return TF.to_tensor(img)

    def __getitem__(self, i: int) -> dict[str, Any]:
        # one draw per clip, shared by every stream: window start, crop offset, flip
        off = self.resize - self.image_size
        start = None
        if self.sampling == "window":
            span = max(0, min(len(self.frame_files(i, s.folders[0])) for s in self.streams.values()) - self.num_frames)
            start = int(torch.randint(0, span + 1, (1,))) if self.train else span // 2
        if self.train:
            top, left = (int(v) for v in torch.randint(0, off + 1, (2,)))
            flip = self.flip and bool(torch.rand(()) < 0.5)
        else:
            top = left = off // 2
            flip = False
        inputs = {}
        for m, s in self.streams.items():
            n = len(self.frame_files(i, s.folders[0]))
            if self.sampling == "window":
                idx = window_indices(n, self.num_frames, self.train, start=start)
            else:
                idx = sample_frame_indices(n, self.num_frames, self.train)
            frames = []
            for k in idx:
                chans = []
                for pattern in s.folders:
                    files = self.frame_files(i, pattern)
                    chans.append(self._load(files[min(k, len(files) - 1)], s.gray))
                x = torch.cat(chans, dim=0)[:, top:top + self.image_size, left:left + self.image_size]
                if flip:
                    x = x.flip(-1)
                    if s.negate_on_flip is not None:
                        x[s.negate_on_flip] = 1.0 - x[s.negate_on_flip]
                if s.imagenet:
                    x = (x - _MEAN.repeat(len(s.folders), 1, 1)) / _STD.repeat(len(s.folders), 1, 1)
                frames.append(x)
            inputs[m] = torch.stack(frames, dim=1)  # (C, T, H, W)
        return {"inputs": inputs, "label": self.labels[i], "index": torch.tensor(i, dtype=torch.long),
                "present": {m: torch.tensor(True) for m in self.streams}}


def _drop_missing(dataset: str, root: Path, rows: list[tuple[str, int]], streams: dict[str, Stream],
                  layout: str) -> tuple[list[tuple[str, int]], list[str]]:
    """Keep the clips whose every stream folder exists; ConfigError when none does."""
    kept, missing = [], []
    for cid, lab in rows:
        if all((root / p.format(id=cid)).is_dir() for s in streams.values() for p in s.folders):
            kept.append((cid, lab))
        else:
            missing.append(cid)
    if rows and not kept:
        first = rows[0][0]
        absent = [p.format(id=first) for s in streams.values() for p in s.folders if not (root / p.format(id=first)).is_dir()]
        raise ConfigError(f"{dataset}: no listed clip has all its frame folders under {root} (e.g. {absent[0]} is "
                          f"missing); expected {layout}")
    return kept, missing


def _carve_by_key(rows: list[tuple[str, int]], key, val_fraction: float) -> tuple[list, list]:
    """Split rows into (train, val) by whole groups ``key(id)`` (fixed seed); falls back to a
    stratified split by clip when fewer than two groups can be told apart."""
    keys = [key(cid) for cid, _ in rows]
    groups = sorted({k for k in keys if k is not None})
    if len(groups) >= 2 and all(k is not None for k in keys):
        rng = np.random.default_rng(SPLIT_SEED)
        n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
        val_groups = {groups[j] for j in rng.permutation(len(groups))[:n_val]}
        return ([r for r, k in zip(rows, keys) if k not in val_groups],
                [r for r, k in zip(rows, keys) if k in val_groups])
    tr, va = stratified_split(np.array([lab for _, lab in rows], dtype=np.int64), [1 - val_fraction, val_fraction],
                              SPLIT_SEED)
    if len(va) == 0 and len(rows) >= 2:
        va, tr = tr[-1:], tr[:-1]
    return [rows[j] for j in tr], [rows[j] for j in va]


def _splits(dataset: str, root: Path, rows: dict[str, list[tuple[str, int]]], streams: dict[str, Stream],
            class_names: list[str], num_frames: int, image_size: int, encoders: dict[str, str],
            info: dict[str, Any], sampling: str, resize: int | None, flip: bool) -> DataSplits:
    for s in ("train", "val", "test"):
        if not rows[s]:
            raise ConfigError(f"{dataset}: the {s} split of {root} is empty (check the split lists)")

    def make(s: str, train: bool) -> FrameClips:
        return FrameClips(root, [c for c, _ in rows[s]], [lab for _, lab in rows[s]], streams, num_frames, train,
                          image_size, sampling, resize, flip)

    shapes = {m: (st.channels, num_frames, image_size, image_size) for m, st in streams.items()}
    return DataSplits(
        train=make("train", True), val=make("val", False), test=make("test", False), train_eval=make("train", False),
        modalities=list(streams), num_classes=len(class_names), input_shapes=shapes,
        default_encoders={m: encoders[m] for m in streams}, encoder_options={m: {} for m in streams},
        class_names=class_names,
        info={"name": dataset, "root": str(root), "num_frames": num_frames, "image_size": image_size,
              "sizes": {s: len(rows[s]) for s in ("train", "val", "test")}, **info})


def _pick_modalities(dataset: str, requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    mods = list(requested) if requested else list(available)
    if not mods or len(set(mods)) != len(mods) or any(m not in available for m in mods):
        raise ConfigError(f"{dataset} has modalities {', '.join(available)}; got {list(requested or [])!r}")
    return mods


def _root(dataset: str, root: str | None, layout: str) -> Path:
    if not root:
        raise ConfigError(f"{dataset} needs the option root, a folder with {layout}; pass --dataset.root DIR "
                          f"(make it with: mmbalance preprocess {dataset} --source RAW_DIR --output DIR)")
    r = Path(root).expanduser()
    if not r.is_dir():
        raise ConfigError(f"{dataset} root {root} is not a folder; expected {layout}")
    return r


# ----------------------------------------------------------------------------- UCF-101

UCF_LAYOUT = ("classInd.txt, trainlistNN.txt and testlistNN.txt (in ROOT or ROOT/ucfTrainTestlist), frames "
              "{rgb}/<video>/*.jpg and flow {u}/<video>/*.jpg, {v}/<video>/*.jpg")


def group_of(clip: str) -> str | None:
    """The UCF-101 group of a clip id (``v_ApplyEyeMakeup_g08_c01`` -> ``g08``)."""
    m = re.search(r"_(g\d+)_c\d+$", clip)
    return m.group(1) if m else None


def _list_dir(root: Path, name: str) -> Path | None:
    for p in (root / name, root / "ucfTrainTestlist" / name):
        if p.is_file():
            return p
    return None


def read_ucf_lists(root: Path, split: int, layout: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """UCF-101's class list and split ``split``'s train/test lists: ``(classes, {train, test: [(video, label)]})``."""
    names = {"classes": "classInd.txt", "train": f"trainlist0{split}.txt", "test": f"testlist0{split}.txt"}
    paths = {k: _list_dir(root, n) for k, n in names.items()}
    missing = [names[k] for k, p in paths.items() if p is None]
    if missing:
        raise ConfigError(f"ucf101: {root} lacks {', '.join(missing)}; expected {layout}")
    index: dict[int, str] = {}
    for ln in paths["classes"].read_text().splitlines():
        parts = ln.split()
        if len(parts) >= 2 and parts[0].isdigit():
            index[int(parts[0])] = parts[1]
    if not index:
        raise ConfigError(f"ucf101: {paths['classes']} has no '<index> <class>' lines")
    classes = [index[k] for k in sorted(index)]
    pos = {c.lower(): j for j, c in enumerate(classes)}
    rows: dict[str, list[tuple[str, int]]] = {}
    for s in ("train", "test"):
        out = []
        for ln in paths[s].read_text().splitlines():
            parts = ln.strip().split()
            if not parts:
                continue
            rel = parts[0].replace("\\", "/")
            cls, _, fname = rel.rpartition("/")
            if cls.lower() not in pos:
                raise ConfigError(f"ucf101: {paths[s].name} lists {rel}, whose class folder '{cls}' is not in "
                                  f"{paths['classes'].name}")
            out.append((Path(fname).stem, pos[cls.lower()]))
        rows[s] = out
    return classes, rows


@register_dataset("ucf101", summary="UCF-101 actions (101 classes), RGB + optical flow frame folders, official splits 1-3")
def ucf101(root: str | None = None, modalities: list[str] | None = None, split: Literal[1, 2, 3] = 1,
           num_frames: PosInt = 3, image_size: PosInt = 224, val_fraction: ValFraction = 0.1,
           rgb_dir: str = "rgb", flow_u_dir: str = "flow/u", flow_v_dir: str = "flow/v") -> DataSplits:
    """UCF-101 from frame folders and the official split lists.

    Options:
        root: the folder with the split lists and the frame folders.
        modalities: rgb and/or flow (default both).
        split: the official split (trainlist0N.txt / testlist0N.txt).
        num_frames: frames per stream, one per equal segment (BalanceBenchmark: 3).
        image_size: frames are resized to this many pixels squared.
        val_fraction: fraction of the training groups held out for validation (fixed seed).
        rgb_dir: the RGB frame folders, relative to root.
        flow_u_dir: the horizontal-flow frame folders, relative to root.
        flow_v_dir: the vertical-flow frame folders, relative to root.
    """
    layout = UCF_LAYOUT.format(rgb=rgb_dir, u=flow_u_dir, v=flow_v_dir)
    r = _root("ucf101", root, layout)
    mods = _pick_modalities("ucf101", modalities, ["rgb", "flow"])
    all_streams = {"rgb": Stream((f"{rgb_dir}/{{id}}",), imagenet=True),
                   "flow": Stream((f"{flow_u_dir}/{{id}}", f"{flow_v_dir}/{{id}}"), gray=True, negate_on_flip=0)}
    streams = {m: all_streams[m] for m in mods}
    classes, lists = read_ucf_lists(r, split, layout)
    kept: dict[str, list[tuple[str, int]]] = {}
    dropped: dict[str, int] = {}
    for s in ("train", "test"):
        kept[s], miss = _drop_missing("ucf101", r, lists[s], streams, layout)
        dropped[s] = len(miss)
        if miss:
            log.warning("ucf101: %d %s clip(s) lack a frame folder and are dropped (first: %s)", len(miss), s, miss[0])
    train, val = _carve_by_key(kept["train"], group_of, val_fraction)
    rows = {"train": train, "val": val, "test": kept["test"]}
    return _splits("ucf101", r, rows, streams, classes, num_frames, image_size,
                   {"rgb": "resnet18_visual", "flow": "resnet18_visual"},
                   {"split": split, "dropped": dropped}, "segments", None, True)


# ----------------------------------------------------------------------------- NVGesture

NV_LAYOUT = ("the lists {train} and {test} (lines 'path:./Video_data/class_01/subject1_r0 ... label:1') and frames "
             "frames/<class>/<subject_r>/rgb/*.jpg, depth/*.jpg, flow/u/*.jpg, flow/v/*.jpg")


def subject_of(clip: str) -> str | None:
    """The NVGesture subject of a clip id (``class_01/subject13_r0`` -> ``subject13``)."""
    m = re.search(r"(subject\d+)", clip)
    return m.group(1) if m else None


def read_nvgesture_list(path: Path) -> list[dict[str, Any]]:
    """Parse an NVGesture ``.lst`` file: one dict per line with ``id`` (``class_01/subject1_r0``),
    ``path`` (as written), ``label`` (0-based) and per sensor ``(folder, start, end)``."""
    out = []
    for n, ln in enumerate(path.read_text().splitlines(), start=1):
        parts = ln.split()
        if not parts:
            continue
        entry: dict[str, Any] = {}
        for tok in parts:
            key, _, rest = tok.partition(":")
            if key == "path":
                entry["path"] = rest
            elif key == "label":
                entry["label"] = int(rest) - 1
            elif rest.count(":") == 2:
                folder, start, end = rest.split(":")
                entry[key] = (folder, int(start), int(end))
        if "path" not in entry or "label" not in entry:
            raise ConfigError(f"nvgesture: line {n} of {path.name} has no path:... or label:... field; expected lines "
                              "'path:./Video_data/class_01/subject1_r0 depth:sk_depth:138:218 color:sk_color:138:218 label:1'")
        rel = entry["path"].replace("\\", "/")
        rel = re.sub(r"^(\./)?(Video_data/)?", "", rel).strip("/")
        entry["id"] = rel
        out.append(entry)
    return out


@register_dataset("nvgesture", summary="NVGesture (25 gestures), RGB + depth + optical flow frame folders, the release's split lists")
def nvgesture(root: str | None = None, modalities: list[str] | None = None, num_frames: PosInt = 64,
              image_size: PosInt = 224, resize: PosInt = 256, val_fraction: ValFraction = 0.1,
              train_list: str = NV_LISTS[0], test_list: str = NV_LISTS[1]) -> DataSplits:
    """NVGesture from frame folders and the release's split lists.

    Options:
        root: the folder with the lists and frames/<class>/<subject_r>/{rgb,depth,flow/u,flow/v}/.
        modalities: any of rgb, depth, flow (default all three, MIE's setting).
        num_frames: consecutive frames per stream (IGM: 64).
        image_size: the crop size (IGM: 224).
        resize: frames are resized to this many pixels squared before cropping (IGM: 256).
        val_fraction: fraction of the training subjects held out for validation (fixed seed).
        train_list: the training list file in root.
        test_list: the test list file in root.
    """
    layout = NV_LAYOUT.format(train=train_list, test=test_list)
    r = _root("nvgesture", root, layout)
    if resize < image_size:
        raise ConfigError(f"nvgesture: resize ({resize}) must be at least image_size ({image_size})")
    mods = _pick_modalities("nvgesture", modalities, ["rgb", "depth", "flow"])
    all_streams = {"rgb": Stream(("frames/{id}/rgb",), imagenet=True), "depth": Stream(("frames/{id}/depth",), gray=True),
                   "flow": Stream(("frames/{id}/flow/u", "frames/{id}/flow/v"), gray=True, negate_on_flip=0)}
    streams = {m: all_streams[m] for m in mods}
    missing = [n for n in (train_list, test_list) if not (r / n).is_file()]
    if missing:
        raise ConfigError(f"nvgesture: {r} lacks {', '.join(missing)}; expected {layout}")
    entries = {s: read_nvgesture_list(r / n) for s, n in (("train", train_list), ("test", test_list))}
    labels = [e["label"] for es in entries.values() for e in es]
    if not labels or min(labels) < 0:
        raise ConfigError("nvgesture: the lists hold no clip, or a label below 1 (labels are 1-based: label:1 .. label:25)")
    num_classes = max(labels) + 1  # 25 with the release's lists
    kept, dropped = {}, {}
    for s in ("train", "test"):
        kept[s], miss = _drop_missing("nvgesture", r, [(e["id"], e["label"]) for e in entries[s]], streams, layout)
        dropped[s] = len(miss)
        if miss:
            log.warning("nvgesture: %d %s clip(s) lack a frame folder and are dropped (first: %s)", len(miss), s, miss[0])
    train, val = _carve_by_key(kept["train"], subject_of, val_fraction)
    rows = {"train": train, "val": val, "test": kept["test"]}
    names = [f"class_{k + 1:02d}" for k in range(num_classes)]
    return _splits("nvgesture", r, rows, streams, names, num_frames, image_size,
                   {m: "r3d_18" for m in ("rgb", "depth", "flow")}, {"dropped": dropped, "resize": resize},
                   "window", resize, False)


# ----------------------------------------------------------------------------- preprocessing

def quantize_flow(flow: np.ndarray, bound: float = 20.0) -> np.ndarray:
    """Flow in pixels -> uint8 as the TV-L1 JPEG releases store it (``bound`` pixels -> 255).

    >>> quantize_flow(np.array([-30.0, -20.0, 0.0, 10.0]), 20.0).tolist()
    [0, 0, 128, 191]
    """
    q = np.round(127.5 + 127.5 * np.asarray(flow, dtype=np.float64) / bound)
    return np.clip(q, 0, 255).astype(np.uint8)


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """The extra ``mmbalance preprocess`` flags of the frame datasets (ignored by the others)."""
    parser.add_argument("--flow", choices=["none", "raft_small", "raft_large"], default="none",
                        help="ucf101/nvgesture: compute optical flow with torchvision's RAFT (needs --flow-weights); "
                             "default none: flow frames must be precomputed")
    parser.add_argument("--flow-weights", dest="flow_weights", default=None,
                        help="local RAFT state dict file (never downloaded)")
    parser.add_argument("--flow-bound", dest="flow_bound", type=float, default=20.0,
                        help="flow magnitude (pixels) mapped to 0/255 in the u/v JPEGs (default 20, as TV-L1 releases)")


_RAFT: dict[str, Any] = {}


def _raft(kind: str, weights: str):
    """torchvision's RAFT with local weights, loaded once per process."""
    key = f"{kind}:{weights}"
    if key not in _RAFT:
        from torchvision.models import optical_flow

        model = getattr(optical_flow, kind)(weights=None)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--flow-weights {weights} is not a {kind} state dict ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        _RAFT[key] = model.eval()
    return _RAFT[key]


def raft_flow(model, img1, img2) -> np.ndarray:
    """Flow (2, H, W) in pixels from PIL image ``img1`` to ``img2`` with a RAFT model. Frames are
    resized to multiples of 8 (at least 128, RAFT's smallest) for RAFT and the flow back, vectors rescaled."""
    import torch.nn.functional as F
    from torchvision.transforms import functional as TF

    w, h = img1.size
    h8, w8 = max(128, math.ceil(h / 8) * 8), max(128, math.ceil(w / 8) * 8)
    a = TF.to_tensor(img1.convert("RGB")).unsqueeze(0) * 2 - 1
    b = TF.to_tensor(img2.convert("RGB")).unsqueeze(0) * 2 - 1
    if (h8, w8) != (h, w):
        a = F.interpolate(a, size=(h8, w8), mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=(h8, w8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        flow = model(a, b)[-1]
    if (h8, w8) != (h, w):
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
        flow = flow * torch.tensor([w / w8, h / h8]).view(1, 2, 1, 1)
    return flow[0].numpy()


def _decode(path: str, keep, short_side: int | None, gray: bool = False) -> list:
    """PIL frames of ``path`` whose (index, time) ``keep`` accepts, plus each one's next frame."""
    import av

    frames, nexts = [], []
    want_next = False
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base is not None else None
            if want_next:
                nexts.append(_resized(frame.to_image(), short_side, gray))
                want_next = False
            verdict = keep(i, t)
            if verdict == "stop":
                break
            if verdict:
                frames.append(_resized(frame.to_image(), short_side, gray))
                want_next = True
    while len(nexts) < len(frames):  # the last kept frame had no successor: reuse it
        nexts.append(frames[len(nexts)])
    return list(zip(frames, nexts))


def _resized(img, short_side: int | None, gray: bool):
    img = img.convert("L" if gray else "RGB")
    if short_side:
        w, h = img.size
        s = short_side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))))
    return img


def _every(fps: float):
    """A keep-rule: the first frame of each 1/fps interval (the 1-fps frames of the field)."""
    state = {"next": 0.0, "start": None}

    def keep(i: int, t: float | None) -> bool:
        t = i / 25.0 if t is None else t
        if state["start"] is None:
            state["start"] = t
        t -= state["start"]
        if t + 1e-6 >= state["next"]:
            while state["next"] <= t + 1e-6:
                state["next"] += 1.0 / fps
            return True
        return False

    return keep


def _range(start: int, end: int):
    def keep(i: int, t: float | None):
        if i >= end:
            return "stop"
        return start <= i

    return keep


def _write_frames(pairs: list, folder: Path, flow_model, bound: float, flow_dir: Path | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (img, nxt) in enumerate(pairs, start=1):
        img.save(folder / f"{k:05d}.jpg", quality=95)
        if flow_model is not None and flow_dir is not None:
            from PIL import Image

            fl = raft_flow(flow_model, img, nxt)
            for c, sub in enumerate(("u", "v")):
                (flow_dir / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(quantize_flow(fl[c], bound), mode="L").save(flow_dir / sub / f"{k:05d}.jpg", quality=95)


@dataclass(frozen=True)
class _Job:
    dataset: str
    clip: str
    video: str
    depth: str | None = None
    color_range: tuple[int, int] | None = None
    depth_range: tuple[int, int] | None = None


def _process(job: _Job, out: str, fps: float, short_side: int | None, flow: str, weights: str | None,
             bound: float) -> tuple[str, str, str]:
    """Preprocess one clip (frames first into temporary folders, then renamed): (clip, status, reason)."""
    o = Path(out)
    model = _raft(flow, weights) if flow != "none" else None
    if job.dataset == "ucf101":
        final = {"rgb": o / "rgb" / job.clip}
        if model is not None:
            final.update({"u": o / "flow" / "u" / job.clip, "v": o / "flow" / "v" / job.clip})
    else:
        base = o / "frames" / job.clip
        final = {"rgb": base / "rgb", "depth": base / "depth"}
        if model is not None:
            final.update({"u": base / "flow" / "u", "v": base / "flow" / "v"})
    if all(p.is_dir() for p in final.values()):
        return job.clip, "exists", ""
    tmp = o / ".tmp" / job.clip.replace("/", "__")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        if job.dataset == "ucf101":
            pairs = _decode(job.video, _every(fps), short_side)
            if not pairs:
                raise ValueError("no decodable video frames")
            _write_frames(pairs, tmp / "rgb", model, bound, tmp / "flow")
        else:
            pairs = _decode(job.video, _range(*job.color_range), short_side)
            if not pairs:
                raise ValueError(f"no colour frames in {job.color_range}")
            _write_frames(pairs, tmp / "rgb", model, bound, tmp / "flow")
            dpairs = _decode(job.depth, _range(*job.depth_range), short_side, gray=True)
            if not dpairs:
                raise ValueError(f"no depth frames in {job.depth_range}")
            _write_frames(dpairs, tmp / "depth", None, bound, None)
        sources = {"rgb": tmp / "rgb", "depth": tmp / "depth", "u": tmp / "flow" / "u", "v": tmp / "flow" / "v"}
        for k in sorted(final, key=lambda k: k == "rgb"):  # rgb last: it marks the clip as done
            if final[k].exists():
                shutil.rmtree(final[k])
            final[k].parent.mkdir(parents=True, exist_ok=True)
            os.replace(sources[k], final[k])
        shutil.rmtree(tmp, ignore_errors=True)
        return job.clip, "done", ""
    except ConfigError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable video is reported, never fatal
        shutil.rmtree(tmp, ignore_errors=True)
        return job.clip, "failed", f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")


def _star(args: tuple) -> tuple[str, str, str]:
    return _process(*args)


def _init_worker() -> None:
    torch.set_num_threads(1)


def _ucf_jobs(src: Path) -> tuple[list[_Job], list[Path], list[tuple[str, str]]]:
    lists_dir = src / "ucfTrainTestlist" if (src / "ucfTrainTestlist").is_dir() else src
    if not (lists_dir / "classInd.txt").is_file():
        raise ConfigError(f"ucf101: {src} has no ucfTrainTestlist/classInd.txt (expected RAW/UCF-101/<Class>/<video>.avi "
                          "and RAW/ucfTrainTestlist/ with classInd.txt, trainlist0N.txt, testlist0N.txt)")
    videos = src / "UCF-101" if (src / "UCF-101").is_dir() else src
    lists = sorted(p for p in lists_dir.iterdir() if re.fullmatch(r"(train|test)list0\d\.txt|classInd\.txt", p.name))
    jobs, rejected, seen = [], [], set()
    for p in lists:
        if p.name == "classInd.txt":
            continue
        for ln in p.read_text().splitlines():
            parts = ln.strip().split()
            if not parts:
                continue
            rel = parts[0].replace("\\", "/")
            clip = Path(rel).stem
            if clip in seen:
                continue
            seen.add(clip)
            video = videos / rel
            if video.is_file():
                jobs.append(_Job("ucf101", clip, str(video)))
            else:
                rejected.append((clip, f"video file missing: {rel}"))
    return jobs, lists, rejected


def _nv_jobs(src: Path) -> tuple[list[_Job], list[Path], list[tuple[str, str]]]:
    lists = sorted(src.glob("nvgesture_*.lst"))
    if not lists:
        raise ConfigError(f"nvgesture: {src} has no nvgesture_*.lst list (expected the release's "
                          f"{NV_LISTS[0]}, {NV_LISTS[1]} and Video_data/class_NN/subjectN_rN/sk_color.avi, sk_depth.avi)")
    jobs, rejected, seen = [], [], set()
    for p in lists:
        for e in read_nvgesture_list(p):
            if e["id"] in seen:
                continue
            seen.add(e["id"])
            if "color" not in e or "depth" not in e:
                rejected.append((e["id"], "the list line has no color:... or depth:... field"))
                continue
            folder = src / "Video_data" / e["id"]
            color = folder / f"{e['color'][0]}.avi"
            depth = folder / f"{e['depth'][0]}.avi"
            if not color.is_file() or not depth.is_file():
                rejected.append((e["id"], f"video missing: {color if not color.is_file() else depth}"))
                continue
            jobs.append(_Job("nvgesture", e["id"], str(color), str(depth), e["color"][1:], e["depth"][1:]))
    return jobs, lists, rejected


def run_preprocess(args: argparse.Namespace) -> int:
    """``mmbalance preprocess ucf101|nvgesture``; returns the exit code (1 when nothing was made)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    src = Path(args.source)
    if not src.is_dir():
        raise ConfigError(f"--source {args.source} is not a folder")
    flow = getattr(args, "flow", "none") or "none"
    weights = getattr(args, "flow_weights", None)
    bound = float(getattr(args, "flow_bound", 20.0) or 20.0)
    if flow != "none":
        if not weights or not os.path.isfile(weights):
            raise ConfigError(f"--flow {flow} needs --flow-weights FILE, a local {flow} state dict (never downloaded); "
                              f"got {weights!r}")
        _raft(flow, weights)  # fail now, in one line, if the file does not fit
    jobs, lists, rejected = (_ucf_jobs if args.dataset == "ucf101" else _nv_jobs)(src)
    if getattr(args, "limit", None):
        jobs = jobs[: args.limit]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for p in lists:
        shutil.copyfile(p, out / p.name)
    fps = float(getattr(args, "fps", 1.0) or 1.0)
    short = getattr(args, "short_side", None)
    meta = {"dataset": args.dataset, "fps": fps if args.dataset == "ucf101" else "all frames of the annotated range",
            "flow": flow, "flow_bound": bound, "short_side": short, "format": 1}
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    work = [(j, str(out), fps, short, flow, weights, bound) for j in jobs]
    results: dict[str, tuple[str, str]] = {}
    workers = getattr(args, "workers", None) or os.cpu_count() or 1
    progress = not getattr(args, "no_progress", False)
    with tqdm(total=len(work), desc=f"preprocess {args.dataset}", unit="clip", disable=None if progress else True) as bar:
        if workers <= 1 or len(work) <= 1:
            for w in work:
                clip, status, reason = _star(w)
                results[clip] = (status, reason)
                bar.update(1)
        else:
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(min(workers, len(work)), initializer=_init_worker) as pool:
                for clip, status, reason in pool.imap_unordered(_star, work, chunksize=4):
                    results[clip] = (status, reason)
                    bar.update(1)
    shutil.rmtree(out / ".tmp", ignore_errors=True)
    failed = [(c, r) for c, (s, r) in results.items() if s == "failed"] + rejected
    (out / "skipped.txt").write_text("".join(f"{c}\t{r}\n" for c, r in sorted(failed)))
    n_done = sum(1 for s, _ in results.values() if s == "done")
    n_exist = sum(1 for s, _ in results.values() if s == "exists")
    print(f"preprocess {args.dataset}: {n_done} processed, {n_exist} already done, {len(failed)} skipped "
          f"(listed in {out / 'skipped.txt'}); flow: {flow}; {time.time() - t0:.1f}s", file=sys.stderr)
    for c, r in sorted(failed)[:5]:
        print(f"  skipped {c}: {r}", file=sys.stderr)
    return 0 if n_done + n_exist else 1
