"""Peak memory of one training step per method relative to ``joint`` (same model and batch).

    python benchmarks/memory.py [--model resnet] [--device cuda]

CPU: each method runs in a fresh process and reports the growth of its peak resident set size
(``ru_maxrss``) over the step, relative to joint's; GPU: ``torch.cuda.max_memory_allocated``.
Writes ``benchmarks/results/memory_<device>_<model>.csv``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import ROOT, machine, methods, write_csv

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[4])
import torch
from _common import trainer
from mmbalance.utils import to_device
m, model, device = sys.argv[1], sys.argv[2], sys.argv[3]
tr = trainer(m, model, device)
tr.method.on_epoch_start(0)
ds = tr.method.train_dataset(0, tr.data.train)
batch = to_device(next(iter(tr.loader(ds, shuffle=True, batch_size=64, drop_last=True))), tr.device)
tr.model.train()
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    tr.method.training_step(batch)
if device.startswith("cuda"):
    peak = torch.cuda.max_memory_allocated() - base
else:
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({"peak_bytes": int(peak)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mlp", "resnet"], default="mlp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="all")
    args = ap.parse_args()
    rows = []
    peaks = {}
    for m in methods(args.methods):
        out = subprocess.run([sys.executable, "-c", CHILD, m, args.model, args.device, str(ROOT / "benchmarks")],
                             capture_output=True, text=True, timeout=900)
        if out.returncode:
            print(f"{m}: failed\n{out.stderr[-1500:]}")
            continue
        peaks[m] = max(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"], 1)
        rows.append({"method": m, "model": args.model, "device": args.device,
                     "peak_step_mib": round(peaks[m] / 2**20, 2), **machine()})
    for r in rows:
        r["relative_peak"] = round(peaks[r["method"]] / peaks["joint"], 3)
        print(f"{r['method']:20s} {r['peak_step_mib']:9.2f} MiB  x{r['relative_peak']:.2f}")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"wrote {write_csv(ROOT / 'benchmarks' / 'results' / f'memory_{dev}_{args.model}.csv', rows)}")


if __name__ == "__main__":
    main()
