"""``mmbalance experiment``: several methods x several seeds -> a results table (and a plot).

Depends only on :mod:`mmbalance.config` and :mod:`.runner` — never on the main ``mmbalance.cli``
(which imports this module to build its parser).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from ..config import parse_overrides
from ..registry import ConfigError
from .runner import ExperimentInterrupted, format_plan, format_summary, plan_experiment, plot_summary, run_experiment

# Flags left out of command.txt: they change how the command runs, not what it computes.
_NOT_RECORDED = {"-q", "--quiet", "--restart", "--dry-run"}


def parse_flags(tokens: Sequence[str]) -> dict[str, Any]:
    """The settings every run gets: ``mmbalance train``'s dotted overrides and short flags
    (:func:`mmbalance.config.parse_overrides`), with ``--modalities a,b`` a list as in train.

    >>> parse_flags(["--epochs", "3", "--optim.lr=0.1", "--train.deterministic", "--modalities", "pix,fou"])
    {'train.epochs': 3, 'optim.lr': 0.1, 'train.deterministic': True, 'dataset.modalities': ['pix', 'fou']}
    """
    out = parse_overrides(tokens)
    if isinstance(out.get("dataset.modalities"), str):
        out["dataset.modalities"] = [m for m in out["dataset.modalities"].split(",") if m]
    return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; one line naming the bad item otherwise."""
    seeds = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            seeds.append(int(item))
        except ValueError:
            raise ConfigError(f"--seeds takes comma-separated integers (e.g. 0,1,2), got '{item}'") from None
    if not seeds:
        raise ConfigError("--seeds names no seed; e.g. --seeds 0,1,2")
    return seeds


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False  # --seed must not silently mean --seeds
    p.description = ("Run methods over several seeds and summarise test results as mean ± std. Runs are normal "
                     "run folders under OUTPUT/<label>/seed<k>. Rerunning the same command reuses finished runs "
                     "and resumes interrupted ones; a run folder made with other settings is refused (or, with "
                     "--restart, moved aside to OUTPUT/_replaced/ and trained again). Extra dotted flags "
                     "(--train.epochs 40) apply to every run.")
    p.add_argument("--runs", nargs="+", required=True, metavar="SPEC",
                   help="run specs: METHOD or LABEL=METHOD:key=value,... (e.g. uni-fou=unimodal:modality=fou)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--output-dir", dest="output_dir", required=True, help="experiment folder")
    p.add_argument("--config", help="YAML config applied to every run")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, 1 thread each)")
    p.add_argument("--plot", action="store_true", help="also write OUTPUT/summary.png")
    p.add_argument("--restart", action="store_true",
                   help="move run folders made with other settings aside (OUTPUT/_replaced/) and train them again")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="validate every run and print what would happen to each run folder; run nothing")


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    overrides = parse_flags(rest)
    seeds = parse_seeds(args.seeds)
    argv = list(getattr(args, "argv", None) or [])
    again = "mmbalance " + " ".join(shlex.quote(a) for a in argv) if argv else "the same experiment command"
    # an interrupt outside a run (the main CLI prints this hint) loses nothing either
    args.interrupt_hint = f"rerun the same command to continue: {again}"
    if args.dry_run:
        plan = plan_experiment(args.runs, seeds, args.output_dir, args.config, overrides, restart=args.restart)
        print(format_plan(plan))
        return 0
    recorded = [a for a in argv if a not in _NOT_RECORDED]
    command = "mmbalance " + " ".join(shlex.quote(a) for a in recorded) if recorded else None
    try:
        summary = run_experiment(args.runs, seeds, args.output_dir, args.config, overrides, jobs=args.jobs,
                                 restart=args.restart, command=command)
    except ExperimentInterrupted as e:
        where = f" during {e.run_dir}" if e.run_dir else ""
        print(f"mmbalance: experiment interrupted ({e.signal_name}){where}; rerun the same command to continue "
              f"(finished runs are reused, unfinished ones resume from their last checkpoint): {again}",
              file=sys.stderr)
        return 130
    if summary["unfinished"]:
        print(f"{len(summary['unfinished'])} run(s) stopped after train.stop_after_epochs; rerun the same command "
              f"to continue: {again}")
        return 0
    print(format_summary(summary))
    if args.plot:
        plot_summary(summary, Path(args.output_dir) / "summary.png")
    print(f"experiment folder: {args.output_dir}")
    return 0
