"""``mmbalance extract-features``: run frozen encoders once over a dataset and write the ``.npz``
features format (:mod:`mmbalance.data.features`), so every method then trains on features in
minutes (``mmbalance train --dataset FILE.npz``).

The dataset and its encoders are chosen exactly as for ``mmbalance train`` (``--config FILE``,
``--dataset NAME`` and dotted ``--dataset.*`` / ``--model.*`` overrides; a recipe of
``configs/`` works as it is), and every encoder runs frozen, in eval mode, under ``no_grad``::

    mmbalance extract-features --dataset twitter2015 --dataset.root DATA \\
        --model.encoders.text.path BERT_DIR --model.encoders.image.weights resnet50-0676ba61.pth \\
        --output twitter2015-bert-r50.npz

Every split uses its evaluation transforms (the training split too: no augmentation). The
output holds ``labels``, ``split`` (train/val/test, the dataset's own splits), one float32
array per modality, ``present_<modality>`` where a modality is missing for some samples (their
rows are zeros), ``modality_names`` and ``class_names``.

Work is cut into shards of ``--shard-size`` samples per split, each written atomically (temporary
file + rename) into ``OUTPUT.parts/`` and skipped when present, so an interrupted extraction
resumes where it stopped. ``OUTPUT.parts/meta.json`` records what the shards were computed from
(dataset, options, encoders, shard size); a rerun with other settings refuses to mix them
(``--restart`` discards the shards). The final file is written atomically and the shards are then
removed. Batched (``--batch-size``), on the GPU when there is one (``--device``), with
``--workers`` DataLoader processes decoding images, and a progress bar.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..registry import ConfigError

__all__ = ["HELP", "add_arguments", "run", "extract_features"]

HELP = "run frozen encoders once over a dataset and write a .npz features file"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
log = logging.getLogger("mmbalance")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``mmbalance extract-features`` (dotted ``--dataset.*`` / ``--model.*`` overrides
    are read from the remaining arguments, as ``mmbalance train`` does)."""
    p.description = ("Run the dataset's encoders frozen over every split and write the .npz features format. "
                     "Choose the dataset and encoders as for `mmbalance train`: --config FILE, --dataset NAME, "
                     "--dataset.root DIR, --model.encoders.text.path DIR, --model.encoders.image.weights FILE.")
    p.add_argument("--config", action="append", help="YAML config file(s), e.g. a recipe of configs/ (only its "
                   "dataset and model sections are used)")
    p.add_argument("--dataset", help="registered dataset name")
    p.add_argument("--output", required=True, metavar="FILE.npz", help="features file to write")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="samples per batch (default 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: the GPU when present)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default) or bf16 autocast on CUDA; features are stored as float32")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes (default: up to 4)")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=2048,
                   help="samples per resumable shard (default 2048)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto", help="progress bar (default: when a terminal)")
    p.add_argument("--restart", action="store_true", help="discard shards of an earlier run with other settings")


def run(args: argparse.Namespace, rest: Sequence[str] = ()) -> int:
    """``mmbalance extract-features``: parse, extract, print where the file is."""
    from ..config import load_config, parse_overrides

    overrides = parse_overrides(list(rest))
    bad = [k for k in overrides if not k.startswith(("dataset.", "model."))]
    if bad:
        raise ConfigError(f"extract-features takes --dataset.* and --model.* overrides only, got {', '.join(bad)}")
    if args.dataset:
        overrides["dataset.name"] = args.dataset
    elif not args.config:
        raise ConfigError("extract-features needs a dataset: --dataset NAME or --config FILE (e.g. configs/twitter2015/base.yaml)")
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--shard-size", args.shard_size, 1),
                             ("--workers", args.workers, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    cfg = load_config(args.config, overrides)
    if cfg.dataset.name.endswith(".npz"):
        raise ConfigError("extract-features reads a registered dataset (raw images, text, ...), not a .npz file")
    show = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
    out = extract_features(cfg, args.output, batch_size=args.batch_size, device=args.device,
                           precision=args.precision, workers=args.workers, shard_size=args.shard_size,
                           progress=show, restart=args.restart)
    with np.load(out, allow_pickle=False) as z:
        mods = [str(m) for m in z["modality_names"]]
        split = z["split"]
        dims = ", ".join(f"{m} {int(np.prod(z[m].shape[1:]))}-d" for m in mods)
        sizes = " / ".join(f"{s} {int((split == s).sum())}" for s in SPLITS)
    print(f"wrote {out}: {len(split)} samples ({sizes}); {dims}")
    print(f"train on it: mmbalance train --dataset {out} --method joint")
    return 0


# ----------------------------------------------------------------------------- the extraction
def _fingerprint(cfg: Any, spec: Any, shard_size: int) -> dict[str, Any]:
    from ..config import to_dict

    d = to_dict(cfg)
    return json.loads(json.dumps({"format": FORMAT_VERSION, "dataset": d["dataset"],
                                  "encoders": {m: [n, o] for m, (n, o) in spec.encoders.items()},
                                  "shard_size": shard_size}, sort_keys=True, default=str))


def _frozen_encoders(spec: Any) -> dict[str, torch.nn.Module]:
    """The spec's encoders with ``freeze=True`` where the encoder has that option; eval mode."""
    from ..models import ENCODERS, create_encoder, list_encoders

    list_encoders()  # every encoder module registered
    encoders = {}
    for m, (name, opts) in spec.encoders.items():
        opts = dict(opts)
        if "freeze" in inspect.signature(ENCODERS.get(name)).parameters:
            opts["freeze"] = True
        enc = create_encoder(name, spec.input_shapes[m], **opts)
        enc.eval()
        encoders[m] = enc
    return encoders


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _prepare_parts(parts: Path, meta: dict[str, Any], restart: bool) -> None:
    meta_file = parts / "meta.json"
    if parts.exists() and restart:
        shutil.rmtree(parts)
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old != meta:
            raise ConfigError(f"{parts} holds shards of an extraction with other settings (dataset, encoders or "
                              "shard size); rerun with --restart to discard them, or choose another --output")
        return
    if parts.exists() and any(parts.iterdir()):
        raise ConfigError(f"{parts} exists without meta.json; remove it or rerun with --restart")
    parts.mkdir(parents=True, exist_ok=True)
    meta_file.write_text(json.dumps(meta, indent=1, sort_keys=True))


def extract_features(cfg: Any, output: str | os.PathLike, batch_size: int = 64, device: str = "auto",
                     precision: str = "fp32", workers: int | None = None, shard_size: int = 2048,
                     progress: bool = False, restart: bool = False) -> Path:
    """Extract features of ``cfg``'s dataset with its (frozen) encoders into ``output``; returns it."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from ..data import build_dataset, validate_splits
    from ..engine.assembly import model_spec, resolve_device
    from ..utils import to_device

    out = Path(output)
    if out.suffix != ".npz":
        raise ConfigError(f"--output must name a .npz file, got {output}")
    out.parent.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    data = validate_splits(build_dataset(cfg.dataset.name, **cfg.dataset.options), source=cfg.dataset.name)
    spec = model_spec(cfg, data, list(data.modalities))
    encoders = _frozen_encoders(spec)
    for enc in encoders.values():
        enc.to(dev)
    meta = _fingerprint(cfg, spec, shard_size)
    parts = out.with_name(out.stem + ".parts")
    _prepare_parts(parts, meta, restart)

    nw = min(4, os.cpu_count() or 1) if workers is None else workers
    splits = {"train": data.train_eval, "val": data.val, "test": data.test}
    todo = [(s, k) for s, ds in splits.items() for k in range(math.ceil(len(ds) / shard_size))
            if not (parts / f"{s}-{k:05d}.npz").is_file()]
    total = sum(min(shard_size, len(splits[s]) - k * shard_size) for s, k in todo)
    if total:
        log.info("extracting %s features of %d samples on %s into %s", ", ".join(data.modalities), total, dev, out)
    autocast = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if precision == "bf16" and dev.type == "cuda"
                else None)
    bar = tqdm(total=total, disable=not progress, unit="sample", dynamic_ncols=True, desc="extract-features")
    try:
        for s, k in todo:
            ds = splits[s]
            idx = range(k * shard_size, min(len(ds), (k + 1) * shard_size))
            loader = DataLoader(Subset(ds, list(idx)), batch_size=batch_size, shuffle=False, num_workers=nw,
                                pin_memory=dev.type == "cuda")
            feats: dict[str, list[np.ndarray]] = {m: [] for m in data.modalities}
            pres: dict[str, list[np.ndarray]] = {m: [] for m in data.modalities}
            labels: list[np.ndarray] = []
            with torch.no_grad():
                for batch in loader:
                    batch = to_device(batch, dev)
                    for m, enc in encoders.items():
                        with autocast if autocast is not None else torch.autocast(dev.type, enabled=False):
                            f = enc(batch["inputs"][m]).float()
                        p = batch["present"][m].bool()
                        f = f.reshape(len(f), -1) * p.view(-1, 1).to(f.dtype)  # absent rows: zeros
                        feats[m].append(f.cpu().numpy())
                        pres[m].append(p.cpu().numpy())
                    labels.append(batch["label"].cpu().numpy())
                    bar.update(len(batch["label"]))
            arrays = {f"feat_{m}": np.concatenate(v).astype(np.float32) for m, v in feats.items()}
            arrays.update({f"present_{m}": np.concatenate(v) for m, v in pres.items()})
            _atomic_savez(parts / f"{s}-{k:05d}.npz", labels=np.concatenate(labels).astype(np.int64), **arrays)
    finally:
        bar.close()

    merged: dict[str, list[np.ndarray]] = {"labels": [], "split": []}
    for m in data.modalities:
        merged[m], merged[f"present_{m}"] = [], []
    for s, ds in splits.items():
        for k in range(math.ceil(len(ds) / shard_size)):
            with np.load(parts / f"{s}-{k:05d}.npz", allow_pickle=False) as z:
                merged["labels"].append(z["labels"])
                merged["split"].append(np.full(len(z["labels"]), s, dtype="<U5"))
                for m in data.modalities:
                    merged[m].append(z[f"feat_{m}"])
                    merged[f"present_{m}"].append(z[f"present_{m}"])
    final = {k: np.concatenate(v) for k, v in merged.items()}
    for m in data.modalities:
        if final[f"present_{m}"].all():
            del final[f"present_{m}"]  # the format's default: present everywhere
    final["modality_names"] = np.asarray(list(data.modalities))
    if data.class_names:
        final["class_names"] = np.asarray([str(c) for c in data.class_names])
    _atomic_savez(out, **final)
    shutil.rmtree(parts, ignore_errors=True)
    return out
