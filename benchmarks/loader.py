"""Data loading throughput from the preprocessed audio-visual layout vs the model's step rate.

    python benchmarks/loader.py [--workers 0,2,4] [--device cuda] [--root DIR] [--passes 3]

Without ``--root`` a small CREMA-D-layout fixture (``--actors`` 10: 120 clips of 2.2 s) is generated
(PyAV) and preprocessed into a temporary folder; the loader then reads what ``mmbalance
preprocess crema_d`` writes (a 257 x 188 log-STFT ``.npy`` and one 224 x 224 JPEG frame per clip,
with the training transforms: RandomResizedCrop, flip, normalisation). For each number of
workers, ``--passes`` passes over the training split (batch ``--batch``, last partial batch
dropped):

* ``fresh``: a new ``DataLoader`` per pass, as the trainer builds one per epoch (workers start
  every pass); ``persistent``: ``train.persistent_workers`` (workers > 0 only): one loader kept
  by :class:`mmbalance.engine.acceleration.LoaderPool` and reseeded per pass, whose later passes
  reuse the workers.
* ``startup_s``: time to the first batch of a pass (median over passes; for ``persistent``
  over the passes after the first); ``pass_samples_per_s``: samples / whole pass;
  ``steady_samples_per_s``: the batches after the first, per second.
* ``step_samples_per_s``: what the ResNet-18 (``--width``) joint training step consumes on
  ``--device`` at the same batch; ``loader_over_step`` = steady loader rate / step rate (the
  loader keeps up when it is above 1). On a GPU, the number of workers needed is about
  step rate / (steady rate of one worker).

Writes ``benchmarks/results/loader_<device>.csv``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, machine, write_csv


def one_pass(loader) -> tuple[float, float, int, int]:
    """(seconds to the first batch, seconds for the pass, samples, samples in the first batch)."""
    t0 = time.perf_counter()
    first, n, n_first = None, 0, 0
    for b in loader:
        k = len(b["label"])
        if first is None:
            first, n_first = time.perf_counter() - t0, k
        n += k
    return first or 0.0, time.perf_counter() - t0, n, n_first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="a folder made by mmbalance preprocess crema_d (default: a generated fixture)")
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 base width for the step rate (64: the real one)")
    ap.add_argument("--prefetch-factor", dest="prefetch_factor", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps for the step rate")
    ap.add_argument("--actors", type=int, default=10, help="actors in the generated fixture (12 clips each)")
    args = ap.parse_args()
    from torch.utils.data import DataLoader

    from mmbalance.config import load_config
    from mmbalance.engine import Trainer
    from mmbalance.engine.acceleration import LoaderPool, loader_options
    from mmbalance.utils import to_device, worker_init_fn

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            import av_fixtures

            raw = Path(tmp) / "raw"
            av_fixtures.make_crema_d(raw, actors=tuple(range(1001, 1001 + args.actors)), seconds=2.2)
            av_fixtures.preprocess("crema_d", raw, Path(tmp) / "pre")
            root = str(Path(tmp) / "pre")
        step_rate = None
        for w in [int(x) for x in args.workers.split(",")]:
            ov = {"dataset.name": "crema_d", "dataset.root": root, "train.num_workers": w,
                  "train.device": args.device, "train.progress": "off", "train.probe": False,
                  "train.batch_size": args.batch, "model.encoder_options": {"width": args.width},
                  "train.prefetch_factor": args.prefetch_factor}
            tr = Trainer(load_config(None, ov))
            ds = tr.data.train
            if step_rate is None:  # the model's rate does not depend on the loader
                batch = to_device(next(iter(tr.loader(ds, shuffle=True, batch_size=args.batch, drop_last=True))),
                                  tr.device)
                tr.model.train()
                tr.method.training_step(batch)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tr.method.training_step(batch)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                step_rate = args.steps * len(batch["label"]) / (time.perf_counter() - t0)
                shapes = {m: tuple(x.shape[1:]) for m, x in batch["inputs"].items()}
                print(f"step: {step_rate:.1f} samples/s (ResNet-18 width {args.width}, batch {args.batch}, "
                      f"inputs {shapes})")
            kinds = ["fresh"] + (["persistent"] if w > 0 else [])
            for kind in kinds:
                if kind == "persistent":
                    tc = load_config(None, {**ov, "train.persistent_workers": True}).train
                    pool = LoaderPool()

                    def build(seed):
                        g = torch.Generator()
                        g.manual_seed(seed)
                        return DataLoader(ds, batch_size=args.batch, shuffle=True, generator=g, num_workers=w,
                                          worker_init_fn=worker_init_fn, drop_last=True,
                                          **loader_options(tc, tr.device))

                    passes = [one_pass(pool.get("train", p, lambda: build(p))) for p in range(args.passes)]
                    pool.close()
                    later = passes[1:] or passes
                else:
                    passes = [one_pass(tr.loader(ds, shuffle=True, batch_size=args.batch, seed=p, drop_last=True))
                              for p in range(args.passes)]
                    later = passes
                startup = statistics.median(p[0] for p in later)
                pass_rate = statistics.median(p[2] / p[1] for p in later)
                steady = statistics.median((p[2] - p[3]) / max(p[1] - p[0], 1e-9) for p in later)
                rows.append({"workers": w, "loader": kind, "batch": args.batch, "train_samples": len(ds),
                             "startup_s": round(startup, 3), "pass_s": round(statistics.median(p[1] for p in later), 3),
                             "pass_samples_per_s": round(pass_rate, 1), "steady_samples_per_s": round(steady, 1),
                             "step_samples_per_s": round(step_rate, 1),
                             "loader_over_step": round(steady / step_rate, 2), "resnet_width": args.width,
                             "device": args.device, **machine()})
                r = rows[-1]
                print(f"workers {w} {kind:10s}: start-up {r['startup_s']:.3f} s, pass {r['pass_samples_per_s']:7.1f} "
                      f"samples/s, steady {r['steady_samples_per_s']:7.1f} samples/s (loader/step "
                      f"{r['loader_over_step']:.2f})", flush=True)
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    print(f"wrote {write_csv(ROOT / 'benchmarks' / 'results' / f'loader_{dev}.csv', rows)}")


if __name__ == "__main__":
    main()
