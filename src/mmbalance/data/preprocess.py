"""``mmbalance preprocess DATASET --source RAW_DIR --output DIR``: raw videos -> the loaders' layout.

Raw layouts accepted (the datasets' own distributions):

``crema_d``
    ``RAW/VideoFlash/<clip>.flv`` (also ``.mp4``) and ``RAW/AudioWAV/<clip>.wav``; a clip without
    a WAV file takes its audio from the video. Clip names are ``<actor>_<sentence>_<EMO>_<level>``
    (``1001_DFA_ANG_XX``); the label is the emotion (NEU, HAP, SAD, FEA, DIS, ANG). The split is
    read from ``RAW/train.csv`` and ``RAW/test.csv`` (OGM-GE's lists, lines ``clip,EMO``) when
    present, else a fixed seeded stratified 90/10 train/test split is made.
``kinetics_sounds``
    ``RAW/<split>/<class name>/<clip>.mp4`` (also .mkv/.webm/.avi) with split folders ``train``
    and ``val`` (and optionally ``test``), the Kinetics download layout. Without a ``test``
    folder, Kinetics ``val`` becomes the test split (as in the Kinetics-Sounds papers).
    ``--classes FILE`` (one class name per line: the 31- or 34-class lists) restricts and orders
    the classes; by default every class folder of ``train`` is used.
``ave``
    ``RAW/AVE/<VideoID>.mp4`` with ``RAW/Annotations.txt`` and ``RAW/trainSet.txt``,
    ``valSet.txt``, ``testSet.txt`` (lines ``Category&VideoID&Quality&StartTime&EndTime``, the
    AVE release). Classes are the sorted categories of ``Annotations.txt`` (28).

Output layout (what :mod:`mmbalance.data.audiovisual` reads)::

    OUT/meta.json               dataset, audio recipe and shape, fps
    OUT/classes.txt             one class name per line (line number = label)
    OUT/train.txt, test.txt     (and val.txt for AVE) lines "clip,class name"
    OUT/visual/<clip>/00001.jpg frames at 1 fps (first frame of each second)
    OUT/audio/<clip>.npy        float32 spectrogram of the dataset's recipe (see data/audio.py)
    OUT/skipped.txt             "clip<TAB>reason" for every input that could not be read

Items are processed in parallel (``--workers``, default all CPU cores) with a progress bar. A
rerun skips finished items (an item is finished when its ``.npy`` exists: frames are written
first, then the spectrogram atomically). Unreadable files are skipped and reported, never
fatal; short clips are padded by the audio recipe and give at least one frame.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from ..registry import ConfigError

__all__ = ["Item", "add_arguments", "run", "discover", "process_item", "DATASETS", "CREMA_D_CLASSES"]

CREMA_D_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # OGM-GE's class order
VIDEO_EXTS = (".mp4", ".flv", ".mkv", ".webm", ".avi", ".mov")
DATASETS = ["crema_d", "kinetics_sounds", "ave", "ucf101", "nvgesture"]


@dataclass(frozen=True)
class Item:
    """One clip to preprocess: output name, class name, split, and its raw files."""

    clip: str
    label: str
    split: str
    video: str
    audio: str | None = None  # a separate audio file (else the video's audio track)


# ----------------------------------------------------------------------------- discovery

def _videos_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS)


def _stratified_two_way(items: list[tuple[str, str]], test_fraction: float, seed: int = 0) -> dict[str, str]:
    """Seeded per-class split into train/test; every class with >= 2 clips gets >= 1 test clip."""
    rng = np.random.default_rng(seed)
    split_of = {}
    for lab in sorted({lab for _, lab in items}):
        clips = sorted(c for c, l in items if l == lab)
        order = [clips[i] for i in rng.permutation(len(clips))]
        n_test = max(1, round(test_fraction * len(clips))) if len(clips) >= 2 else 0
        split_of.update({c: ("test" if k < n_test else "train") for k, c in enumerate(order)})
    return split_of


def discover_crema_d(source: Path, classes_file: str | None = None) -> tuple[list[str], list[Item], list[tuple[str, str]]]:
    """CREMA-D items from ``VideoFlash/`` + ``AudioWAV/``; returns (classes, items, rejected)."""
    vdir = source / "VideoFlash"
    if not vdir.is_dir():
        raise ConfigError(f"crema_d: {source} has no VideoFlash/ folder (expected VideoFlash/*.flv and AudioWAV/*.wav)")
    adir = source / "AudioWAV"
    classes = _read_class_file(classes_file) if classes_file else list(CREMA_D_CLASSES)
    found: list[tuple[str, str, Path]] = []
    rejected: list[tuple[str, str]] = []
    for v in _videos_in(vdir):
        parts = v.stem.split("_")
        if len(parts) < 3 or parts[2] not in classes:
            rejected.append((v.stem, f"name does not follow <actor>_<sentence>_<EMO>_<level> with EMO in {classes}"))
            continue
        found.append((v.stem, parts[2], v))
    split_of: dict[str, str] = {}
    lists = {s: source / f"{s}.csv" for s in ("train", "test")}
    if all(p.is_file() for p in lists.values()):
        for s, p in lists.items():
            with open(p, newline="") as f:
                for row in csv.reader(f):
                    if row and row[0].strip():
                        split_of[row[0].strip()] = s
        unlisted = [c for c, _, _ in found if c not in split_of]
        rejected += [(c, "not in train.csv or test.csv") for c in unlisted]
        found = [x for x in found if x[0] in split_of]
    else:
        split_of = _stratified_two_way([(c, lab) for c, lab, _ in found], 0.1)
    items = []
    for clip, lab, v in found:
        wav = adir / f"{clip}.wav"
        items.append(Item(clip, lab, split_of[clip], str(v), str(wav) if wav.is_file() else None))
    return classes, items, rejected


def discover_kinetics_sounds(source: Path, classes_file: str | None = None) -> tuple[list[str], list[Item], list[tuple[str, str]]]:
    """Kinetics-Sounds items from ``<split>/<class>/<clip>.mp4``."""
    if not (source / "train").is_dir():
        raise ConfigError(f"kinetics_sounds: {source} has no train/ folder (expected <split>/<class>/<clip>.mp4)")
    split_dirs = {"train": source / "train"}
    if (source / "test").is_dir():
        split_dirs["test"] = source / "test"
        if (source / "val").is_dir():
            split_dirs["val"] = source / "val"
    elif (source / "val").is_dir():
        split_dirs["test"] = source / "val"
    else:
        raise ConfigError(f"kinetics_sounds: {source} has no val/ or test/ folder")
    if classes_file:
        classes = _read_class_file(classes_file)
    else:
        classes = sorted(p.name for p in split_dirs["train"].iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"kinetics_sounds: no class folders under {split_dirs['train']}")
    items, rejected, seen = [], [], set()
    for split, d in split_dirs.items():
        for c in classes:
            cdir = d / c
            if not cdir.is_dir():
                continue
            for v in _videos_in(cdir):
                clip = v.stem
                if clip in seen:
                    rejected.append((clip, "duplicate clip name"))
                    continue
                seen.add(clip)
                items.append(Item(clip, c, split, str(v)))
    return classes, items, rejected


def _read_ave_list(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split("&")
        if len(parts) < 2 or parts[0] == "Category":
            continue
        rows.append((parts[1].strip(), parts[0].strip()))
    return rows


def discover_ave(source: Path, classes_file: str | None = None) -> tuple[list[str], list[Item], list[tuple[str, str]]]:
    """AVE items from ``AVE/*.mp4`` + ``Annotations.txt`` + ``{train,val,test}Set.txt``."""
    need = [source / "AVE", source / "Annotations.txt"] + [source / f"{s}Set.txt" for s in ("train", "val", "test")]
    missing = [p.name for p in need if not p.exists()]
    if missing:
        raise ConfigError(f"ave: {source} lacks {', '.join(missing)} (expected AVE/*.mp4, Annotations.txt, "
                          "trainSet.txt, valSet.txt, testSet.txt)")
    classes = _read_class_file(classes_file) if classes_file else sorted({c for _, c in _read_ave_list(source / "Annotations.txt")})
    items, rejected, seen = [], [], set()
    for split in ("train", "val", "test"):
        for vid, cat in _read_ave_list(source / f"{split}Set.txt"):
            if vid in seen:  # the field drops duplicate ids
                continue
            seen.add(vid)
            video = source / "AVE" / f"{vid}.mp4"
            if cat not in classes:
                rejected.append((vid, f"category {cat!r} not in the class list"))
            elif not video.is_file():
                rejected.append((vid, "video file missing"))
            else:
                items.append(Item(vid, cat, split, str(video)))
    return classes, items, rejected


def _read_class_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"class list file not found: {path}")
    names = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not names:
        raise ConfigError(f"class list file {path} is empty")
    return names


DISCOVER = {"crema_d": discover_crema_d, "kinetics_sounds": discover_kinetics_sounds, "ave": discover_ave}


def discover(dataset: str, source: str | os.PathLike, classes_file: str | None = None):
    """Find the items of a raw dataset folder: ``(classes, items, rejected)``."""
    if dataset not in DISCOVER:
        raise ConfigError(f"unknown dataset '{dataset}' for preprocess; valid: {', '.join(DATASETS)}")
    src = Path(source)
    if not src.is_dir():
        raise ConfigError(f"--source {source} is not a folder")
    return DISCOVER[dataset](src, classes_file)


# ----------------------------------------------------------------------------- per item

def is_done(output: Path, clip: str) -> bool:
    """True when the item's spectrogram (written last) and frame folder exist."""
    return (output / "audio" / f"{clip}.npy").is_file() and (output / "visual" / clip).is_dir()


def process_item(item: Item, output: str, dataset: str, fps: float = 1.0, short_side: int | None = None) -> tuple[str, str, str]:
    """Preprocess one clip; returns ``(clip, status, reason)`` with status done | exists | failed."""
    from .audio import RECIPES
    from .video import decode_audio, extract_frames

    out = Path(output)
    if is_done(out, item.clip):
        return item.clip, "exists", ""
    vdir = out / "visual" / item.clip
    tmp_v = out / "visual" / f".{item.clip}.tmp"
    tmp_a = out / "audio" / f".{item.clip}.tmp.npy"
    try:
        shutil.rmtree(tmp_v, ignore_errors=True)
        if vdir.exists():
            shutil.rmtree(vdir)
        extract_frames(item.video, str(tmp_v), fps=fps, short_side=short_side)
        recipe = RECIPES[dataset]
        wave = decode_audio(item.audio or item.video, recipe.sample_rate)
        spec = recipe(wave).numpy().astype(np.float32)
        if not np.isfinite(spec).all():
            raise ValueError("non-finite values in the spectrogram")
        os.replace(tmp_v, vdir)
        np.save(tmp_a, spec)
        os.replace(tmp_a, out / "audio" / f"{item.clip}.npy")
        return item.clip, "done", ""
    except Exception as e:  # noqa: BLE001 - any unreadable input is reported, never fatal
        shutil.rmtree(tmp_v, ignore_errors=True)
        if tmp_a.exists():
            tmp_a.unlink()
        msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
        return item.clip, "failed", msg


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _process_star(args: tuple) -> tuple[str, str, str]:
    return process_item(*args)


# ----------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``preprocess`` arguments to a parser."""
    parser.add_argument("dataset", choices=DATASETS, help="which dataset's raw layout and audio recipe")
    parser.add_argument("--source", required=True, help="folder with the raw dataset (see docs/datasets.md)")
    parser.add_argument("--output", required=True, help="folder to write the preprocessed layout into")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all CPU cores)")
    parser.add_argument("--classes", default=None, help="class list file (one name per line), e.g. the 31 or 34 Kinetics-Sounds classes")
    parser.add_argument("--fps", type=float, default=1.0, help="frames kept per second (default 1)")
    parser.add_argument("--short-side", type=int, default=None, help="resize frames so the shorter side has this many pixels (default: keep)")
    parser.add_argument("--limit", type=int, default=None, help="process only the first N items (a quick trial)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .framesets import add_preprocess_arguments

    add_preprocess_arguments(parser)  # the frame-folder datasets' options (flow)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{ln}\n" for ln in lines))
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    """Run the preprocessing; returns the exit code (0, or 1 when nothing could be processed)."""
    from tqdm.auto import tqdm

    if args.dataset in ("ucf101", "nvgesture"):
        from .framesets import run_preprocess

        return run_preprocess(args)
    from .audio import RECIPES

    t0 = time.time()
    classes, items, rejected = discover(args.dataset, args.source, args.classes)
    if args.limit:
        items = items[: args.limit]
    out = Path(args.output)
    (out / "visual").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[args.dataset]
    meta = {"dataset": args.dataset, "recipe": recipe.name, "audio_shape": list(recipe.shape),
            "sample_rate": recipe.sample_rate, "fps": args.fps, "format": 1}
    _write_lines(out / "classes.txt", classes)
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    workers = args.workers or os.cpu_count() or 1
    results: dict[str, tuple[str, str]] = {it.clip: ("exists", "") for it in items if is_done(out, it.clip)}
    jobs = [(it, str(out), args.dataset, args.fps, args.short_side) for it in items if it.clip not in results]
    progress = not getattr(args, "no_progress", False)
    with tqdm(total=len(jobs), desc=f"preprocess {args.dataset}", unit="clip", disable=None if progress else True) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                clip, status, reason = _process_star(job)
                results[clip] = (status, reason)
                bar.update(1)
        else:
            import multiprocessing as mp

            # fork (as torch's DataLoader does) starts workers fast; each worker uses one thread
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
                for clip, status, reason in pool.imap_unordered(_process_star, jobs, chunksize=4):
                    results[clip] = (status, reason)
                    bar.update(1)

    failed = [(c, r) for c, (s, r) in results.items() if s == "failed"] + list(rejected)
    finished = {it.clip for it in items if results.get(it.clip, ("",))[0] in ("done", "exists")}
    by_split: dict[str, list[str]] = {}
    for it in items:
        if it.clip in finished:
            by_split.setdefault(it.split, []).append(f"{it.clip},{it.label}")
    for split in ("train", "val", "test"):
        if split in by_split:
            _write_lines(out / f"{split}.txt", by_split[split])
    _write_lines(out / "skipped.txt", (f"{c}\t{r}" for c, r in sorted(failed)))
    n_done = sum(1 for s, _ in results.values() if s == "done")
    n_exist = sum(1 for s, _ in results.values() if s == "exists")
    sizes = ", ".join(f"{s} {len(v)}" for s, v in by_split.items())
    print(f"preprocess {args.dataset}: {n_done} processed, {n_exist} already done, {len(failed)} skipped "
          f"(listed in {out / 'skipped.txt'}); splits: {sizes or 'none'}; {time.time() - t0:.1f}s", file=sys.stderr)
    for c, r in sorted(failed)[:5]:
        print(f"  skipped {c}: {r}", file=sys.stderr)
    return 0 if finished else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m mmbalance.data.preprocess``)."""
    parser = argparse.ArgumentParser(prog="mmbalance preprocess", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
