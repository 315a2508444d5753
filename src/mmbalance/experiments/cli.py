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
    p.add_argument("file", nargs="?", metavar="FILE.yaml",
                   help="an experiment file (runs / grid / seeds / settings / tune; see mmbalance.experiments.files)")
    p.add_argument("--runs", nargs="+", metavar="SPEC",
                   help="run specs: METHOD or LABEL=METHOD:key=value,... (e.g. uni-fou=unimodal:modality=fou)")
    p.add_argument("--seeds", help="comma-separated seeds (default 0,1,2, or the file's)")
    p.add_argument("--output-dir", dest="output_dir", help="experiment folder (default: the file's output_dir)")
    p.add_argument("--config", action="append", help="YAML config applied to every run (may be repeated)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes, 1 thread each)")
    p.add_argument("--plot", action="store_true", help="also write OUTPUT/summary.png")
    p.add_argument("--restart", action="store_true",
                   help="move run folders made with other settings aside (OUTPUT/_replaced/) and train them again")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="validate every run and print what would happen to each run folder; run nothing")


def _from_file(args: argparse.Namespace, overrides: dict[str, Any]):
    """Fill args (runs, seeds, output folder, configs) and overrides from an experiment file;
    command-line flags win over the file."""
    from .files import load_experiment_file

    ef = load_experiment_file(args.file)
    if args.runs:
        raise ConfigError("give runs either in the experiment file or with --runs, not both")
    args.runs = ef.specs
    args.seeds = args.seeds or ",".join(map(str, ef.seeds))
    args.output_dir = args.output_dir or str(ef.output_dir)
    args.config = [*map(str, ef.config), *(args.config or [])] or None
    if args.jobs == 1 and ef.jobs != 1:
        args.jobs = ef.jobs
    return {**ef.settings, **overrides}, ef


def _untangle(args: argparse.Namespace, rest: Sequence[str]) -> list[str]:
    """argparse gives the optional FILE positional the value of a space-separated dotted flag
    (``--train.epochs 1``); put such a value back after its flag."""
    if not args.file or args.file.endswith((".yaml", ".yml")):
        return list(rest)
    argv = list(getattr(args, "argv", None) or [])
    tokens = argv[argv.index("experiment") + 1:] if "experiment" in argv else []
    for i, tok in enumerate(tokens[1:], 1):
        if tok == args.file and tokens[i - 1].startswith("--") and "=" not in tokens[i - 1] \
                and tokens[i - 1] in rest:
            out = list(rest)
            j = out.index(tokens[i - 1])
            out.insert(j + 1, args.file)
            args.file = None
            return out
    return list(rest)


def run(args: argparse.Namespace, rest: Sequence[str]) -> int:
    rest = _untangle(args, rest)
    overrides = parse_flags(rest)
    ef = None
    if args.file:
        overrides, ef = _from_file(args, overrides)
    if not args.runs:
        raise ConfigError("name the runs: an experiment FILE.yaml or --runs SPEC ...")
    if not args.output_dir:
        raise ConfigError("name the experiment folder with --output-dir DIR")
    seeds = parse_seeds(args.seeds or "0,1,2")
    if ef is not None and ef.tune is not None:
        return _run_tuning(args, ef.methods, seeds, overrides, ef.tune)
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


def _run_tuning(args: argparse.Namespace, methods: Sequence[str], seeds: list[int], overrides: dict[str, Any],
                opts: dict[str, Any]) -> int:
    from .summarize import summarize_folder
    from .tuning import tune

    argv = list(getattr(args, "argv", None) or [])
    again = "mmbalance " + " ".join(shlex.quote(a) for a in argv) if argv else "the same command"
    args.interrupt_hint = f"rerun the same command to continue: {again}"
    recorded = [a for a in argv if a not in _NOT_RECORDED]
    try:
        record = tune(list(methods), int(opts.get("trials", 4)), seeds, args.output_dir, args.config, overrides,
                      select=str(opts.get("select", "accuracy")), tune_seed=int(opts.get("seed", 0)),
                      jobs=args.jobs, shared=bool(opts.get("shared", True)),
                      command="mmbalance " + " ".join(shlex.quote(a) for a in recorded) if recorded else None)
    except ExperimentInterrupted as e:
        print(f"mmbalance: tuning interrupted ({e.signal_name}); rerun the same command to continue: {again}",
              file=sys.stderr)
        return 130
    for m, r in record["methods"].items():
        print(f"{m}: chose trial {r['chosen_trial']} {r['chosen'] or '(defaults)'} "
              f"(validation {record['select']} {max(t['val'] for t in r['trials']):.4f})")
    print(summarize_folder(args.output_dir)["markdown"])
    print(f"tuning folder: {args.output_dir}")
    return 0


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False
    p.description = ("The fair protocol: every method gets the same number of random trials of its search space "
                     "(plus learning rate and weight decay) on the validation split; the best setting by the "
                     "validation metric then runs over every seed; the summary reports the chosen settings and "
                     "each method's paired difference to joint.")
    p.add_argument("--methods", required=True, help="comma-separated methods (joint is added when missing)")
    p.add_argument("--trials", type=int, default=4, help="trials per method, the defaults included (default 4)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the final runs (the search uses the first)")
    p.add_argument("--select", default="accuracy", choices=["accuracy", "macro_f1", "map"],
                   help="validation metric that selects the setting")
    p.add_argument("--tune-seed", dest="tune_seed", type=int, default=0, help="seed of the trial draws")
    p.add_argument("--no-shared", dest="shared", action="store_false",
                   help="search only the methods' own options, not learning rate and weight decay")
    p.add_argument("--output-dir", dest="output_dir", required=True, help="tuning folder")
    p.add_argument("--config", action="append", help="YAML config for every run (may be repeated)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")


def run_tune(args: argparse.Namespace, rest: Sequence[str]) -> int:
    overrides = parse_flags(rest)
    methods = [m for m in str(args.methods).split(",") if m.strip()]
    if "joint" not in methods:
        methods.insert(0, "joint")
    opts = {"trials": args.trials, "select": args.select, "seed": args.tune_seed, "shared": args.shared}
    return _run_tuning(args, methods, parse_seeds(args.seeds), overrides, opts)


def add_summarize_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Mean ± std over seeds of fused and per-modality metrics for every run label of an experiment "
                     "or tuning folder, each method's paired difference to the reference (joint) with significance, "
                     "as summary_table.md / .csv / .tex; the numbers are the runs' results.json.")
    p.add_argument("folder", metavar="DIR", help="experiment or tuning folder")
    p.add_argument("--reference", default="joint", help="run label to compare against (default joint)")
    p.add_argument("--metric", default="accuracy", choices=["accuracy", "macro_f1", "map"])


def run_summarize(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    from .summarize import summarize_folder

    res = summarize_folder(args.folder, args.reference, args.metric)
    print(res["markdown"], end="")
    print(f"wrote {args.folder}/summary_table.md, .csv, .tex")
    return 0
