"""Multi-process scaling: 1 vs N processes (CPU: gloo; GPUs: NCCL) with the same global batch.

    python benchmarks/scaling.py                              # MLP on the embedded data, joint, CPU
    python benchmarks/scaling.py --model resnet --batch 32    # ResNet-18 (width 16) on A/V-shaped inputs
    python benchmarks/scaling.py --method mla --modes overlap,sync --rounds 5
    python benchmarks/scaling.py --src OLD_CHECKOUT/src --modes sync   # the same with another version

Every configuration runs under ``torch.distributed.run`` (``--nproc-per-node N``): the ranks
train ``--epochs`` epochs of ``--method`` and rank 0 reports the wall time of the epochs after
the first (warm-up; an epoch includes its validation pass). ``--modes`` chooses how gradients
are averaged with several processes: ``overlap`` (the bucketed all-reduce launched while
backward runs, ``train.bucket_mb``, default 25, or ``--bucket-mb``) and/or ``sync``
(one all-reduce after backward). ``--rounds`` interleaves all configurations round by round, so
drift in machine load hits them alike, and reports medians.

Efficiency = T(1 process) / (N x T(N processes)): 1.0 is ideal. Per ``trainer.backward`` call
(medians over rounds, rank 0): ``backward_ms`` and ``exposed_allreduce_ms``, the part of it spent
averaging gradients after ``loss.backward()`` returned (all of the synchronous all-reduce; the
overlapped reducer's wait for its buckets and its flush), the communication backward did not hide. Each process gets
``--threads`` threads (default: cores / N, so every configuration uses the same cores).
Writes ``benchmarks/results/scaling_<device>.csv`` (rows of other models are kept).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    """One rank of a configuration (run by torch.distributed.run)."""
    if args.src:  # import the other version's package before _common puts this checkout's first
        sys.path.insert(0, str(Path(args.src).resolve()))
        import mmbalance  # noqa: F401

    import torch

    from _common import trainer
    from mmbalance.engine import distributed as D

    torch.set_num_threads(args.threads)
    D.init_from_env(args.device)
    tr = trainer(args.method, model=args.model, device=args.device, batch=args.batch, epochs=args.epochs)
    if args.mode == "sync":
        tr.cfg.train.bucket_mb = 0.0
    elif args.bucket_mb is not None:
        tr.cfg.train.bucket_mb = args.bucket_mb
    seconds: list[float] = []
    log_epoch = tr._log_epoch
    tr._log_epoch = lambda record, improved: (seconds.append(record["seconds"]), log_epoch(record, improved))[1]
    # time of trainer.backward, and of the part of it spent averaging gradients after
    # loss.backward() returned (the synchronous all-reduce, or the reducer's wait and flush)
    clock = {"backward": 0.0, "exposed": 0.0, "calls": 0}
    depth = {"backward": 0, "exposed": 0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            depth[key] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[key] -= 1
                if depth[key] == 0:  # the outermost call (finish() flushes with average_gradients)
                    clock[key] += time.perf_counter() - t0
        return wrapper

    backward = tr.backward
    tr.backward = lambda loss, **kw: (clock.__setitem__("calls", clock["calls"] + 1),
                                      timed(backward, "backward")(loss, **kw))[1]
    D.average_gradients = timed(D.average_gradients, "exposed")
    if hasattr(D, "GradReducer"):
        D.GradReducer.finish = timed(D.GradReducer.finish, "exposed")
    tr.fit()
    if D.rank() == 0:
        n = max(clock["calls"], 1)
        Path(args.out).write_text(json.dumps({"seconds": sum(seconds[1:]) if len(seconds) > 1 else seconds[0],
                                              "backward_ms": 1e3 * clock["backward"] / n,
                                              "exposed_ms": 1e3 * clock["exposed"] / n}))
    D.shutdown()


def run(nproc: int, mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    threads = args.threads or max(1, (os.cpu_count() or 2) // nproc)
    out = tmp / f"p{nproc}-{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(29500 + nproc), str(Path(__file__).resolve()), "--worker", "--out", str(out), "--mode", mode,
           "--method", args.method, "--model", args.model, "--epochs", str(args.epochs), "--batch", str(args.batch),
           "--device", args.device, "--threads", str(threads)]
    if args.bucket_mb is not None:
        cmd += ["--bucket-mb", str(args.bucket_mb)]
    if args.src:
        cmd += ["--src", args.src]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3000, cwd=HERE)
    if res.returncode:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="joint")
    ap.add_argument("--model", choices=["mlp", "resnet"], default="mlp",
                    help="mlp: the embedded data; resnet: ResNet-18 (width 16) on A/V-shaped inputs")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not timed")
    ap.add_argument("--batch", type=int, default=128, help="global batch size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-procs", dest="max_procs", type=int, default=None,
                    help="largest number of processes (default: 2 on CPU, the GPU count on CUDA)")
    ap.add_argument("--modes", default="overlap,sync", help="overlap and/or sync, comma-separated")
    ap.add_argument("--bucket-mb", dest="bucket_mb", type=float, default=None,
                    help="bucket cap of the overlapped all-reduce (default: the engine's)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=None, help="threads per process (default: cores / processes)")
    ap.add_argument("--src", default=None, help="measure the mmbalance package under this src folder instead")
    ap.add_argument("--tag", default=None, help="a label for the version measured (CSV column 'version')")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="overlap", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    sys.path.insert(0, str(HERE))
    from _common import ROOT, machine, write_csv

    if args.max_procs is None:
        args.max_procs = max(2, torch.cuda.device_count()) if args.device.startswith("cuda") else 2
    modes = [m for m in args.modes.split(",") if m]
    configs = [(1, "sync")] + [(n, m) for n in range(2, args.max_procs + 1) for m in modes]
    got: dict[tuple[int, str], list[dict[str, float]]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for c in configs:
                t0 = time.perf_counter()
                got[c].append(run(*c, args, Path(tmp)))
                g = got[c][-1]
                print(f"round {r + 1}: {c[0]} process(es), {c[1]}: {g['seconds']:.3f} s, backward "
                      f"{g['backward_ms']:.2f} ms of which {g['exposed_ms']:.2f} ms averaging after it "
                      f"(run {time.perf_counter() - t0:.1f} s)", flush=True)
    times = {c: [g["seconds"] for g in v] for c, v in got.items()}
    med = {c: statistics.median(v) for c, v in times.items()}
    med_ms = {c: {k: statistics.median(g[k] for g in v) for k in ("backward_ms", "exposed_ms")} for c, v in got.items()}
    t1 = med[(1, "sync")]
    rows = []
    for (n, mode), tn in med.items():
        if n == 1:
            continue
        spread = max(times[(n, mode)]) - min(times[(n, mode)])
        rows.append({"method": args.method, "model": args.model, "version": args.tag or "", "mode": mode,
                     "processes": n, "batch": args.batch, "epochs_timed": max(args.epochs - 1, 1),
                     "seconds_1": round(t1, 3), "seconds_n": round(tn, 3), "seconds_n_range": round(spread, 3),
                     "speedup": round(t1 / tn, 3), "efficiency": round(t1 / (n * tn), 3),
                     "backward_ms_1": round(med_ms[(1, "sync")]["backward_ms"], 2),
                     "backward_ms_n": round(med_ms[(n, mode)]["backward_ms"], 2),
                     "exposed_allreduce_ms_n": round(med_ms[(n, mode)]["exposed_ms"], 2), "rounds": args.rounds,
                     "device": args.device, **machine()})
        print(f"{n} processes ({mode}): {tn:.3f} s vs {t1:.3f} s on one: speed-up {t1 / tn:.2f}, "
              f"efficiency {t1 / (n * tn):.2f}")
    dev = "gpu" if args.device.startswith("cuda") else "cpu"
    path = ROOT / "benchmarks" / "results" / f"scaling_{dev}.csv"
    keep = []
    if path.exists():  # keep the rows of other (model, method, version) measurements
        with open(path, newline="") as f:
            keep = [row for row in csv.DictReader(f)
                    if (row.get("model", "mlp"), row.get("method"), row.get("version", "")) !=
                    (args.model, args.method, args.tag or "")]
    print(f"wrote {write_csv(path, keep + rows)}")


if __name__ == "__main__":
    main()
