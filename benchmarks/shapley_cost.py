"""Exact Shapley valuation cost for M = 2..6 modalities relative to one plain inference pass.

    python benchmarks/shapley_cost.py [--device cuda] [--fusion concat] [--threads 1]

Each encoder runs once per sample. The 2^M subsets then cost, on the ``additive`` path (concat,
sum, late, shared_head), M per-modality logit terms and one small 0/1 matmul for all subsets;
on the ``general`` path (any fusion; film and gated always) 2^M - 1 fusion-head evaluations
stacked into few calls. Both are timed, interleaved with the plain pass, median over
``--rounds``. Writes ``benchmarks/results/shapley_cost_<device>.csv`` (``--out`` to change);
``relative`` is the default path (the one ``modality_contributions`` takes for the fusion).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import ROOT, machine, median_iqr, write_csv
from mmbalance.data.base import ArrayDataset
from mmbalance.evaluation.contribution import additive_head, modality_contributions
from mmbalance.methods.base import ModelSpec, build_standard_model
from mmbalance.models import list_fusions
from mmbalance.utils import to_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fusion", default="concat", choices=list_fusions())
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable on a shared machine)")
    ap.add_argument("--max-m", type=int, default=6)
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/shapley_cost_<device>.csv)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    rows = []
    for M in range(2, args.max_m + 1):
        mods = [f"m{i}" for i in range(M)]
        spec = ModelSpec(mods, 10, {m: (args.dim,) for m in mods}, {m: ("mlp", {"hidden": [256, 128]}) for m in mods},
                         args.fusion, {}, "input")
        torch.manual_seed(0)
        model = build_standard_model(spec).to(args.device).eval()
        default = "additive" if additive_head(model.fusion) is not None else "general"
        rng = np.random.default_rng(0)
        ds = ArrayDataset({m: rng.standard_normal((args.n, args.dim)).astype(np.float32) for m in mods},
                          np.arange(args.n) % 10)
        loader = torch.utils.data.DataLoader(ds, batch_size=512)
        batches = [to_device(b, args.device) for b in loader]

        def plain():
            with torch.no_grad():
                for b in batches:
                    model(b["inputs"], b["present"])

        def valuation(path):
            return lambda: modality_contributions(model, batches, device=torch.device(args.device), path=path)

        fns = {"inference": plain, "additive": valuation("additive"), "general": valuation("general")}
        if default == "general":
            del fns["additive"]
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in fns.items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
        med = {k: median_iqr(v) for k, v in times.items()}
        p = med["inference"][0]
        row = {"M": M, "subsets": 2 ** M, "fusion": args.fusion, "path": default, "inference_s": round(p, 4),
               "inference_iqr_s": round(med["inference"][1], 4)}
        for k in fns:
            if k != "inference":
                row[f"{k}_s"] = round(med[k][0], 4)
                row[f"{k}_iqr_s"] = round(med[k][1], 4)
                row[f"relative_{k}"] = round(med[k][0] / p, 3)
        row["relative"] = row[f"relative_{default}"]
        rows.append({**row, "n": args.n, "rounds": args.rounds, "device": args.device, **machine()})
        extra = f" (general path {row['relative_general']:.2f})" if default != "general" else ""
        print(f"M={M}: {2 ** M:3d} subsets, shapley / inference = {row['relative']:.2f} [{default}]{extra}")
    dev = "gpu" if cuda else "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"shapley_cost_{dev}.csv"
    print(f"wrote {write_csv(out, rows)}")


if __name__ == "__main__":
    main()
