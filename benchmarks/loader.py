"""Data loading throughput from the preprocessed audio-visual layout vs the model's step rate.

    python benchmarks/loader.py [--workers 0,2,4] [--device cuda] [--root DIR]

Without ``--root`` a small CREMA-D-layout fixture is generated (PyAV) and preprocessed into a
temporary folder. For each number of workers: samples/s the training loader delivers (batch 64,
the dataset's real transforms), and samples/s the ResNet-18 joint step consumes on the device;
the loader is not the bottleneck when its rate is above the step's. Writes
``benchmarks/results/loader_<device>.csv``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, machine, write_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="a folder made by mmbalance preprocess crema_d (default: a generated fixture)")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=6)
    args = ap.parse_args()
    from mmbalance.config import load_config
    from mmbalance.engine import Trainer
    from mmbalance.utils import to_device

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            import av_fixtures

            raw = Path(tmp) / "raw"
            av_fixtures.make_crema_d(raw, actors=tuple(range(1001, 1011)), seconds=2.2)
            av_fixtures.preprocess("crema_d", raw, Path(tmp) / "pre")
            root = str(Path(tmp) / "pre")
        rows = []
        for w in [int(x) for x in args.workers.split(",")]:
            cfg = load_config(None, {"dataset.name": "crema_d", "dataset.root": root, "train.num_workers": w,
                                     "train.device": args.device, "train.progress": "off", "train.probe": False,
                                     "train.batch_size": 16, "model.encoder_options": {"width": 16}})
            tr = Trainer(cfg)
            loader = tr.loader(tr.data.train, shuffle=True, batch_size=16, drop_last=True)
            n, t0 = 0, time.perf_counter()
            for i, b in enumerate(loader):
                n += len(b["label"])
                if i + 1 >= args.batches:
                    break
            load_rate = n / (time.perf_counter() - t0)
            batch = to_device(next(iter(loader)), tr.device)
            tr.model.train()
            tr.method.training_step(batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(3):
                tr.method.training_step(batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            step_rate = 3 * len(batch["label"]) / (time.perf_counter() - t0)
            rows.append({"workers": w, "loader_samples_per_s": round(load_rate, 1),
                         "step_samples_per_s": round(step_rate, 1), "loader_over_step": round(load_rate / step_rate, 2),
                         "device": args.device, **machine()})
            print(f"workers {w}: loader {load_rate:8.1f} samples/s, step {step_rate:8.1f} samples/s "
                  f"(loader/step {load_rate / step_rate:.2f})")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"wrote {write_csv(ROOT / 'benchmarks' / 'results' / f'loader_{dev}.csv', rows)}")


if __name__ == "__main__":
    main()
