"""Multi-process scaling: 1 vs 2 processes (CPU, gloo; GPUs, NCCL) with the same global batch.

    python benchmarks/scaling.py [--method joint] [--epochs 5] [--model mlp|resnet]

Efficiency = T(1 process) / (N x T(N processes)) of the training time (``train_seconds``):
1.0 is ideal. On a machine with C cores each process gets C / N threads. Writes
``benchmarks/results/scaling_<device>.csv``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from _common import ROOT, machine, write_csv


def run(nproc: int, method: str, epochs: int, batch: int, out: Path, device: str) -> float:
    threads = max(1, (os.cpu_count() or 2) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29500 + nproc), "-m", "mmbalance", "-q", "train", "--method", method, "--epochs", str(epochs),
           "--batch-size", str(batch), "--train.probe", "false", "--train.progress", "off", "--device", device,
           "--output-dir", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads((out / "results.json").read_text())["train_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="joint")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-procs", dest="max_procs", type=int,
                    default=max(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t1 = run(1, args.method, args.epochs, args.batch, Path(tmp) / "p1", args.device)
        for n in range(2, args.max_procs + 1):
            tn = run(n, args.method, args.epochs, args.batch, Path(tmp) / f"p{n}", args.device)
            rows.append({"method": args.method, "processes": n, "seconds_1": round(t1, 3), "seconds_n": round(tn, 3),
                         "speedup": round(t1 / tn, 3), "efficiency": round(t1 / (n * tn), 3), "device": args.device,
                         **machine()})
            print(f"{n} processes: {tn:.2f} s vs {t1:.2f} s on one: speed-up {t1 / tn:.2f}, efficiency {t1 / (n * tn):.2f}")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"wrote {write_csv(ROOT / 'benchmarks' / 'results' / f'scaling_{dev}.csv', rows)}")


if __name__ == "__main__":
    main()
