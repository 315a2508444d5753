"""Peak memory of a training step per method relative to ``joint`` (same model and batch).

    python benchmarks/memory.py [--model resnet] [--batch 32] [--device cuda] [--methods joint,arl]

Each method runs in a fresh process: one warm-up step (the optimizer's state is created), then
``--steps`` measured steps. The peak is the most memory the measured steps hold at once *above
what existed before them* (weights, optimizer state, the batch):

* CPU: the bytes of tensor storages created during the steps and alive at the same time, counted
  by a ``TorchDispatchMode`` that sees every operator's outputs (activations kept for backward,
  gradients, temporaries; views and in-place results are not new memory) and a finalizer per
  storage. It does not see the allocator's own caching or a kernel's internal scratch space.
  The growth of the process's peak resident set size (``ru_maxrss``) is reported too, but it
  is coarse: it stays 0 when an earlier phase (imports, data) already reached a higher peak.
* CUDA: ``torch.cuda.max_memory_allocated()`` over the steps minus the allocation before them.

Writes ``benchmarks/results/memory_<device>_<model>.csv``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import ROOT, machine, methods, write_csv

CHILD = r"""
import json, resource, sys, weakref
sys.path.insert(0, sys.argv[4])
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from _common import trainer
from mmbalance.utils import to_device


class LivePeak(TorchDispatchMode):
    # peak bytes of tensor storages created inside the mode and alive at the same time
    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, ptr):
        self.now -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr == 0 or ptr in inputs or ptr in self.live:  # empty, a view / in-place result, known
                continue
            self.live[ptr] = st.nbytes()
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(st, self._free, ptr)
        return out


m, model, device, batch_size, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5]), int(sys.argv[6])
tr = trainer(m, model, device, batch=batch_size)
tr.method.on_epoch_start(0)
ds = tr.method.train_dataset(0, tr.data.train)
batch = to_device(next(iter(tr.loader(ds, shuffle=True, batch_size=batch_size, drop_last=True))), tr.device)
tr.model.train()
tr.method.training_step(batch)  # warm-up: optimizer state, lazily built method state
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if device.startswith("cuda"):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(steps):
        tr.method.training_step(batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    mode = LivePeak()
    with mode:
        for _ in range(steps):
            tr.method.training_step(batch)
    peak = mode.peak
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
params = sum(p.numel() * p.element_size() for p in tr.model.parameters())
print(json.dumps({"peak_bytes": int(peak), "rss_growth_bytes": int(rss), "param_bytes": int(params)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["mlp", "resnet"], default="mlp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    args = ap.parse_args()
    rows = []
    peaks = {}
    measure = "cuda max_memory_allocated" if args.device.startswith("cuda") else "live tensor storages"
    for m in methods(args.methods):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, m, args.model, args.device, str(ROOT / "benchmarks"),
                              str(args.batch), str(args.steps)], capture_output=True, text=True, timeout=900)
        if out.returncode:
            print(f"{m}: failed\n{out.stderr[-1500:]}")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[m] = max(res["peak_bytes"], 1)
        rows.append({"method": m, "model": args.model, "device": args.device, "batch": args.batch, "measure": measure,
                     "peak_step_mib": round(peaks[m] / 2**20, 2),
                     "rss_growth_mib": round(res["rss_growth_bytes"] / 2**20, 2),
                     "param_mib": round(res["param_bytes"] / 2**20, 2), **machine()})
        print(f"{m:20s} {rows[-1]['peak_step_mib']:9.2f} MiB  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if "joint" not in peaks:
        sys.exit("joint failed: no reference")
    for r in rows:
        r["relative_peak"] = round(peaks[r["method"]] / peaks["joint"], 3)
    rows = [{k: r[k] for k in ["method", "relative_peak"]} | r for r in rows]
    for r in rows:
        print(f"{r['method']:20s} {r['peak_step_mib']:9.2f} MiB  x{r['relative_peak']:.2f}")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"wrote {write_csv(ROOT / 'benchmarks' / 'results' / f'memory_{dev}_{args.model}.csv', rows)}")


if __name__ == "__main__":
    main()
