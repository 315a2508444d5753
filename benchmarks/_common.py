"""Shared pieces of the benchmarks: quiet trainers on the embedded data or on A/V-shaped inputs,
method options that make every rule active from the first epoch, and CSV writing."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from mmbalance.config import load_config  # noqa: E402
from mmbalance.data.base import ArrayDataset, DataSplits  # noqa: E402
from mmbalance.engine import Trainer  # noqa: E402
from mmbalance.methods import list_methods  # noqa: E402

#: options that make each method's rule act from the first step / epoch
ACTIVE = {"arl": {"warmup_epochs": 0}, "sample_valuation": {"warmup_epochs": 0},
          "modality_valuation": {"warmup_epochs": 0}, "gblending": {"estimate_epochs": 1},
          "greedy": {"start_epoch": 0}}


def av_data(n: int = 64, classes: int = 6, spec=(1, 128, 96), frames=(3, 1, 112, 112), seed: int = 0) -> DataSplits:
    """Random data shaped like the audio-visual datasets (a spectrogram and one frame)."""
    rng = np.random.default_rng(seed)

    def split(k):
        y = np.arange(k) % classes
        return ArrayDataset({"audio": rng.standard_normal((k, *spec)).astype(np.float32),
                             "visual": rng.standard_normal((k, *frames)).astype(np.float32)}, y)

    return DataSplits(train=split(n), val=split(16), test=split(16), modalities=["audio", "visual"],
                      num_classes=classes, input_shapes={"audio": spec, "visual": frames},
                      default_encoders={"audio": "resnet18_audio", "visual": "resnet18_visual"},
                      encoder_options={"audio": {"width": 16}, "visual": {"width": 16}})


def trainer(method: str, model: str = "mlp", device: str = "cpu", batch: int = 64, epochs: int = 2,
            precision: str = "fp32", extra: dict[str, Any] | None = None) -> Trainer:
    ov = {"method.name": method, "train.epochs": epochs, "train.batch_size": batch, "train.progress": "off",
          "train.probe": False, "train.device": device, "train.precision": precision, "train.eval_batch_size": 256}
    ov.update({f"method.{k}": v for k, v in ACTIVE.get(method, {}).items()})
    ov.update(extra or {})
    data = av_data() if model == "resnet" else None
    if model == "mlp":
        ov["model.encoder_options"] = {"dropout": 0.0}
    return Trainer(load_config(None, ov), data=data)


def methods(selected: str | None) -> list[str]:
    names = list_methods()
    if selected and selected != "all":
        names = [m for m in selected.split(",") if m]
    return ["joint"] + [m for m in names if m != "joint"]


def machine() -> dict[str, str]:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpus": str(os.cpu_count()), "threads": str(torch.get_num_threads()), "gpu": dev}


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def median_iqr(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    if len(xs) < 4:
        return statistics.median(xs), (xs[-1] - xs[0]) if xs else 0.0
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]
