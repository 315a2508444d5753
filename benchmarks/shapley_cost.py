"""Exact Shapley valuation cost for M = 2..6 modalities relative to one plain inference pass.

    python benchmarks/shapley_cost.py [--device cuda]

Each encoder runs once per sample; the 2^M subsets cost extra fusion-head evaluations only
(absent features substituted), so the ratio grows slowly with M. Writes
``benchmarks/results/shapley_cost_<device>.csv``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import ROOT, machine, median_iqr, write_csv
from mmbalance.data.base import ArrayDataset
from mmbalance.evaluation.contribution import modality_contributions
from mmbalance.methods.base import ModelSpec, build_standard_model
from mmbalance.utils import to_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for M in range(2, 7):
        mods = [f"m{i}" for i in range(M)]
        spec = ModelSpec(mods, 10, {m: (args.dim,) for m in mods}, {m: ("mlp", {"hidden": [256, 128]}) for m in mods},
                         "concat", {}, "input")
        model = build_standard_model(spec).to(args.device).eval()
        rng = np.random.default_rng(0)
        ds = ArrayDataset({m: rng.standard_normal((args.n, args.dim)).astype(np.float32) for m in mods},
                          np.arange(args.n) % 10)
        loader = torch.utils.data.DataLoader(ds, batch_size=512)
        batches = [to_device(b, args.device) for b in loader]

        def plain():
            with torch.no_grad():
                for b in batches:
                    model(b["inputs"], b["present"])

        def shapley():
            modality_contributions(model, batches, device=torch.device(args.device))

        t_plain, t_shap = [], []
        plain(), shapley()
        for _ in range(args.rounds):
            for fn, acc in ((plain, t_plain), (shapley, t_shap)):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                acc.append(time.perf_counter() - t0)
        p, s = median_iqr(t_plain)[0], median_iqr(t_shap)[0]
        rows.append({"M": M, "subsets": 2 ** M, "inference_s": round(p, 4), "shapley_s": round(s, 4),
                     "relative": round(s / p, 3), "device": args.device, **machine()})
        print(f"M={M}: {2 ** M:3d} subsets, shapley / inference = {s / p:.2f}")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"wrote {write_csv(ROOT / 'benchmarks' / 'results' / f'shapley_cost_{dev}.csv', rows)}")


if __name__ == "__main__":
    main()
