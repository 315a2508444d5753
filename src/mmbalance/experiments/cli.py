"""``mmbalance experiment``: several methods x several seeds -> a results table (and a plot)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .runner import RunSpec, format_summary, plot_summary, run_experiment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Run methods over several seeds and summarise test results as mean ± std. "
                     "Runs are normal run folders under OUTPUT/<label>/seed<k>; finished runs are skipped, "
                     "so an interrupted experiment continues. Extra dotted flags (--train.epochs 40) apply to "
                     "every run.")
    p.add_argument("--runs", nargs="+", required=True, metavar="SPEC",
                   help="run specs: METHOD or LABEL=METHOD:key=value,... (e.g. uni-fou=unimodal:modality=fou)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--output-dir", dest="output_dir", required=True, help="experiment folder")
    p.add_argument("--config", help="YAML config applied to every run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, 1 thread each)")
    p.add_argument("--plot", action="store_true", help="also write OUTPUT/summary.png")


def run(args: argparse.Namespace, rest) -> int:
    from ..cli import _split_overrides

    overrides = _split_overrides(rest)
    specs = [RunSpec.parse(s) for s in args.runs]
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    summary = run_experiment(specs, seeds, args.output_dir, args.config, overrides, jobs=args.jobs)
    import shlex

    argv = [a for a in getattr(args, "argv", []) if a not in ("-q", "--quiet")]
    (Path(args.output_dir) / "command.txt").write_text("mmbalance " + " ".join(shlex.quote(a) for a in argv) + "\n")
    print(format_summary(summary))
    if args.plot:
        plot_summary(summary, Path(args.output_dir) / "summary.png")
    print(f"experiment folder: {args.output_dir}")
    return 0
