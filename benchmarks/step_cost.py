"""Step cost and whole-epoch cost of every method relative to ``joint`` (same model, same batch).

    python benchmarks/step_cost.py                       # MLP on the embedded data, CPU
    python benchmarks/step_cost.py --model resnet        # ResNet-18 (width 16) on A/V-shaped inputs
    python benchmarks/step_cost.py --device cuda --precision bf16
    python benchmarks/step_cost.py --model resnet --methods joint,arl --variants default,channels_last,compile --no-epochs

``--channels-last`` / ``--compile`` time every method with ``train.channels_last`` /
``train.compile``; ``--variants`` interleaves several settings (``default``, ``channels_last``,
``compile``, ``channels_last+compile``) in the same rounds and adds each one's step time relative
to the same method's ``default``. The warm-up (for ``compile``: the compilation) is timed apart
(``warmup_s``) and excluded from the step times.

Step cost: ``rounds`` interleaved rounds (every method once per round, so drift in machine load
hits all of them alike) of ``steps`` training steps on one fixed batch, after a warm-up; the
median per-step time and its interquartile range, divided by joint's median. Epoch cost: one
full training epoch (the method's per-epoch passes included: valuation, prototypes, covariance,
G-Blending estimation, extra validation), relative to joint's epoch, median over ``epoch_rounds``.
Writes ``benchmarks/results/step_cost_<device>_<model>[_<variant> | _options].csv``; with ``--install`` the CPU/MLP
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


def step_times(tr, batch, steps: int, device: str, cpu: list[float] | None = None) -> float:
    """Mean wall time of one step; with ``cpu``, also appends the mean CPU time of this process
    (less sensitive than wall time to other work on a shared machine)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        tr.method.training_step(batch)
    sync(device)
    if cpu is not None:
        cpu.append((time.process_time() - c0) / steps)
    return (time.perf_counter() - t0) / steps


VARIANTS = {"default": {}, "channels_last": {"train.channels_last": True}, "compile": {"train.compile": True},
            "channels_last+compile": {"train.channels_last": True, "train.compile": True}}


def build(method: str, args, variant: str, epochs: int = 2):
    """A trainer for ``method`` with the ``variant``'s speed options applied to its model."""
    from mmbalance.engine.acceleration import prepare_model

    tr = trainer(method, args.model, args.device, args.batch, epochs=epochs, precision=args.precision,
                 extra=VARIANTS[variant])
    prepare_model(tr.model, tr.cfg.train)  # idempotent: a no-op where the trainer already applied it
    return tr


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
    ap.add_argument("--channels-last", dest="channels_last", action="store_true",
                    help="every method with train.channels_last")
    ap.add_argument("--compile", action="store_true", help="every method with train.compile")
    ap.add_argument("--variants", help=f"comma-separated, interleaved: {', '.join(VARIANTS)}")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the rounds (compilation)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.warmup < 1:
        ap.error("--warmup must be at least 1")
    names = methods(args.methods)
    if args.variants:
        variants = [v for v in args.variants.split(",") if v]
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            ap.error(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(VARIANTS)}")
    else:
        variants = ["+".join(v for v, on in (("channels_last", args.channels_last), ("compile", args.compile)) if on)
                    or "default"]
    keys = [(m, v) for v in variants for m in names]
    trainers, batches, warmup = {}, {}, {}
    from mmbalance.utils import to_device

    for key in keys:
        m, v = key
        tr = build(m, args, v)
        tr.method.on_epoch_start(0)
        loader = tr.loader(tr.method.train_dataset(0, tr.data.train), shuffle=True, batch_size=args.batch,
                           drop_last=True)
        batches[key] = to_device(next(iter(loader)), tr.device)
        tr.model.train()
        warmup[key] = step_times(tr, batches[key], args.warmup, args.device) * args.warmup  # compilation, if any
        trainers[key] = tr
    per, per_cpu = {k: [] for k in keys}, {k: [] for k in keys}
    for _ in range(args.rounds):
        for k in keys:
            per[k].append(step_times(trainers[k], batches[k], args.steps, args.device, per_cpu[k]))
    epoch = {k: [] for k in keys}
    if args.epochs:
        for _ in range(args.epoch_rounds):
            for key in keys:
                m, v = key
                tr = build(m, args, v, epochs=1)
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
                epoch[key].append(time.perf_counter() - t0)
    rows = []
    info = machine()
    for key in keys:
        m, v = key
        med, iqr = median_iqr(per[key])
        j_step = median_iqr(per[("joint", v)])[0]
        row = {"method": m, "model": args.model, "device": args.device, "precision": args.precision,
               "batch": args.batch, "step_ms": round(1000 * med, 3), "step_iqr_ms": round(1000 * iqr, 3),
               "relative_step_time": round(med / j_step, 3)}
        if len(variants) > 1 or v != "default":
            row = {"method": m, "variant": v, **{k: x for k, x in row.items() if k != "method"},
                   "warmup_s": round(warmup[key], 3)}
            cmed, ciqr = median_iqr(per_cpu[key])
            row["step_cpu_ms"], row["step_cpu_iqr_ms"] = round(1000 * cmed, 3), round(1000 * ciqr, 3)
            if (m, "default") in per:
                row["relative_to_default"] = round(med / median_iqr(per[(m, "default")])[0], 3)
                row["relative_to_default_cpu"] = round(cmed / median_iqr(per_cpu[(m, "default")])[0], 3)
        if args.epochs:
            emed, eiqr = median_iqr(epoch[key])
            row.update({"epoch_s": round(emed, 3), "epoch_iqr_s": round(eiqr, 3),
                        "relative_epoch_time": round(emed / median_iqr(epoch[("joint", v)])[0], 3)})
        row.update({k: x for k, x in info.items()})
        rows.append(row)
        label = m if v == "default" and len(variants) == 1 else f"{m} [{v}]"
        print(f"{label:36s} step {row['step_ms']:8.2f} ms  x{row['relative_step_time']:.2f}"
              + (f"  vs default x{row['relative_to_default']:.2f} (CPU time x{row['relative_to_default_cpu']:.2f})"
                 if "relative_to_default" in row else "")
              + (f"  warm-up {row['warmup_s']:.1f} s" if "warmup_s" in row else "")
              + (f"   epoch {row['epoch_s']:7.2f} s  x{row['relative_epoch_time']:.2f}" if args.epochs else ""))
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    suffix = "" if variants == ["default"] else f"_{variants[0].replace('+', '_')}" if len(variants) == 1 else "_options"
    path = write_csv(ROOT / "benchmarks" / "results" / f"step_cost_{dev}_{args.model}{suffix}.csv", rows)
    print(f"wrote {path}")
    if args.install and dev == "cpu" and args.model == "mlp" and variants == ["default"]:
        shutil.copy(path, ROOT / "src" / "mmbalance" / "methods" / "step_cost.csv")
        print("installed as src/mmbalance/methods/step_cost.csv")


if __name__ == "__main__":
    main()
