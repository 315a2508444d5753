"""Step cost and whole-epoch cost of every method relative to ``joint`` (same model, same batch).

    python benchmarks/step_cost.py                       # MLP on the embedded data, CPU
    python benchmarks/step_cost.py --model resnet        # ResNet-18 (width 16) on A/V-shaped inputs
    python benchmarks/step_cost.py --device cuda --precision bf16

Step cost: ``rounds`` interleaved rounds (every method once per round, so drift in machine load
hits all of them alike) of ``steps`` training steps on one fixed batch, after a warm-up; the
median per-step time and its interquartile range, divided by joint's median. Epoch cost: one
full training epoch (the method's per-epoch passes included: valuation, prototypes, covariance,
G-Blending estimation, extra validation), relative to joint's epoch, median over ``epoch_rounds``.
Writes ``benchmarks/results/step_cost_<device>_<model>.csv``; with ``--install`` the CPU/MLP
relative step times also go to ``src/mmbalance/methods/step_cost.csv`` (``mmbalance list methods``).
"""
from __future__ import annotations

import argparse
import shutil
import time

import torch

from _common import ROOT, machine, median_iqr, methods, trainer, write_csv


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_times(tr, batch, steps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.method.training_step(batch)
    sync(device)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mlp", "resnet"], default="mlp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--methods", default="all")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--epoch-rounds", dest="epoch_rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-epochs", dest="epochs", action="store_false")
    ap.add_argument("--install", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = methods(args.methods)
    trainers, batches = {}, {}
    for m in names:
        tr = trainer(m, args.model, args.device, args.batch, precision=args.precision)
        tr.method.on_epoch_start(0)
        loader = tr.loader(tr.method.train_dataset(0, tr.data.train), shuffle=True, batch_size=args.batch,
                           drop_last=True)
        from mmbalance.utils import to_device

        batches[m] = to_device(next(iter(loader)), tr.device)
        tr.model.train()
        step_times(tr, batches[m], 2, args.device)  # warm-up
        trainers[m] = tr
    per = {m: [] for m in names}
    for _ in range(args.rounds):
        for m in names:
            per[m].append(step_times(trainers[m], batches[m], args.steps, args.device))
    epoch = {m: [] for m in names}
    if args.epochs:
        for _ in range(args.epoch_rounds):
            for m in names:
                tr = trainer(m, args.model, args.device, args.batch, epochs=1, precision=args.precision)
                sync(args.device)
                t0 = time.perf_counter()
                tr.method.on_epoch_start(0)
                ds = tr.method.train_dataset(0, tr.data.train)
                tr.model.train()
                for b in tr.loader(ds, shuffle=True, batch_size=args.batch, drop_last=tr.drop_last_for(len(ds)),
                                   shard=True):
                    tr.method.training_step(to_device(b, tr.device))
                tr.method.on_epoch_end(0)
                tr.method.epoch_diagnostics()
                sync(args.device)
                epoch[m].append(time.perf_counter() - t0)
    j_step = median_iqr(per["joint"])[0]
    j_epoch = median_iqr(epoch["joint"])[0] if args.epochs else None
    rows = []
    info = machine()
    for m in names:
        med, iqr = median_iqr(per[m])
        row = {"method": m, "model": args.model, "device": args.device, "precision": args.precision,
               "batch": args.batch, "step_ms": round(1000 * med, 3), "step_iqr_ms": round(1000 * iqr, 3),
               "relative_step_time": round(med / j_step, 3)}
        if args.epochs:
            emed, eiqr = median_iqr(epoch[m])
            row.update({"epoch_s": round(emed, 3), "epoch_iqr_s": round(eiqr, 3),
                        "relative_epoch_time": round(emed / j_epoch, 3)})
        row.update({k: v for k, v in info.items()})
        rows.append(row)
        print(f"{m:20s} step {row['step_ms']:8.2f} ms  x{row['relative_step_time']:.2f}"
              + (f"   epoch {row['epoch_s']:7.2f} s  x{row['relative_epoch_time']:.2f}" if args.epochs else ""))
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    path = write_csv(ROOT / "benchmarks" / "results" / f"step_cost_{dev}_{args.model}.csv", rows)
    print(f"wrote {path}")
    if args.install and dev == "cpu" and args.model == "mlp":
        shutil.copy(path, ROOT / "src" / "mmbalance" / "methods" / "step_cost.csv")
        print("installed as src/mmbalance/methods/step_cost.csv")


if __name__ == "__main__":
    main()
