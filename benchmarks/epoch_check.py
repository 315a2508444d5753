"""One short epoch of every method on A/V-shaped data (ResNet-18 width 16): the CUDA / bf16
path of every method runs, with its wall time. ``python benchmarks/epoch_check.py --device cuda
--precision bf16``; writes ``benchmarks/results/epoch_check_<device>.csv``."""
from __future__ import annotations

import argparse
import time
import traceback

from _common import ROOT, machine, methods, trainer, write_csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--methods", default="all")
    args = ap.parse_args()
    rows = []
    for m in methods(args.methods):
        t0 = time.perf_counter()
        try:
            res = trainer(m, "resnet", args.device, batch=16, epochs=1, precision=args.precision).fit()
            status, acc = "ok", res["test"]["accuracy"]
        except Exception as e:  # noqa: BLE001 - a check script reports every failure and goes on
            status, acc = f"FAILED: {type(e).__name__}: {e}", None
            traceback.print_exc()
        rows.append({"method": m, "device": args.device, "precision": args.precision, "status": status,
                     "seconds": round(time.perf_counter() - t0, 2), "test_accuracy": acc, **machine()})
        print(f"{m:20s} {status[:60]:60s} {rows[-1]['seconds']:7.2f} s")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"wrote {write_csv(ROOT / 'benchmarks' / 'results' / f'epoch_check_{dev}.csv', rows)}")
    if any(r["status"] != "ok" for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
