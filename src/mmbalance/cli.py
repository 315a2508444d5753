"""The ``mmbalance`` command: train, evaluate, list, plot, preprocess, extract-features,
experiment, tune, summarize, diagnose, analyze, report.

``mmbalance train`` with no arguments trains ``joint`` + ``concat`` on the embedded UCI
Multiple Features views (pix + fou) and prints a table of fused and per-modality results.
Any config key can be overridden as a dotted flag: ``--optim.lr 0.05``, ``--method.T 8``,
``--dataset.root DIR``; ``--config FILE`` loads a YAML file first.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .registry import ConfigError

from .config import SHORT_FLAGS, parse_overrides as _split_overrides  # noqa: F401 - kept for callers


def _setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("mmbalance")
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


def format_results_table(results: dict[str, Any], splits: Sequence[str] = ("test",)) -> str:
    """A plain-text table of fused and per-modality metrics."""
    rows = [("split", "output", "accuracy", "macro_f1", "map", "probe_acc")]
    for s in splits:
        r = results[s]
        rows.append((s, "fused", _fmt(r["accuracy"]), _fmt(r["macro_f1"]), _fmt(r["map"]), "-"))
        for m, pm in r["per_modality"].items():
            rows.append((s, m, _fmt(pm.get("accuracy")), _fmt(pm.get("macro_f1")), _fmt(pm.get("map")),
                         _fmt(pm.get("probe_accuracy"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary_line(results: dict[str, Any]) -> str:
    return (f"{results['method']} + {results['fusion']} on {results['dataset']} "
            f"({', '.join(results['modalities'])}), seed {results['seed']}: best epoch "
            f"{results['best_epoch']}/{results['epochs']} (selected on validation), "
            f"{results['train_seconds']:.1f} s training")


# ----------------------------------------------------------------------------- commands
# keys a resumed run may change: how it runs, plus the two a diverged run needs (recorded in its history)
#: what computes the same numbers (speed and loader options) plus the two documented resume changes
RESUME_MAY_CHANGE = {"train.stop_after_epochs", "train.progress", "train.device", "train.num_workers",
                     "train.bucket_mb", "train.channels_last", "train.compile", "train.persistent_workers",
                     "train.prefetch_factor", "optim.lr", "optim.grad_clip"}


def cmd_train(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .config import dump_yaml, load_config
    from .engine import Trainer, default_run_dir, load_run_config, resolve_config
    from .engine.assembly import check_config

    overrides = _split_overrides(rest)
    for flag, key in SHORT_FLAGS.items():
        v = getattr(args, flag, None)
        if v is not None:
            overrides[key] = v
    if args.deterministic:
        overrides["train.deterministic"] = True
    if args.print_config:  # build the components without loading any data
        cfg = load_config(args.config, overrides) if not args.resume else load_run_config(args.resume)
        check_config(cfg)
        print(dump_yaml(resolve_config(cfg)), end="")
        return 0
    from .engine import distributed as dist_utils

    dist_utils.init_from_env(str(overrides.get("train.device", "auto")))
    if dist_utils.rank() != 0:
        logging.getLogger("mmbalance").setLevel(logging.WARNING)
    changes: dict[str, Any] = {}
    if args.resume:
        run_dir = Path(args.resume)
        cfg = load_run_config(run_dir)
        bad = [k for k in overrides if k not in RESUME_MAY_CHANGE and k != "output_dir"]
        if bad or args.config:
            raise ConfigError(f"cannot change {', '.join(bad) or '--config'} when resuming; "
                              f"allowed: {', '.join(sorted(RESUME_MAY_CHANGE))}")
        checked = load_config(None, overrides, base=load_run_config(run_dir))  # types and ranges
        for key in ("optim.lr", "optim.grad_clip"):
            if key in overrides:
                sec, k = key.split(".")
                new, old = getattr(getattr(checked, sec), k), getattr(getattr(cfg, sec), k)
                if new != old:
                    changes[key] = new
                overrides.pop(key)
        cfg.train.stop_after_epochs = None  # a stop applies to the invocation that asked for it
        cfg = load_config(None, overrides, base=cfg)
    else:
        cfg = load_config(args.config, overrides)
        run_dir = dist_utils.broadcast_object(Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg))
    args.interrupt_hint = f"stopped; continue with: mmbalance train --resume {run_dir}"
    trainer = Trainer(cfg, run_dir, resume=bool(args.resume), resume_changes=changes)
    log = logging.getLogger("mmbalance")
    log.info("run folder: %s", run_dir)
    rank = dist_utils.rank()
    try:
        results = trainer.fit()
    finally:
        dist_utils.shutdown()
    if rank != 0:
        return 0
    if results is None:
        print(f"stopped after train.stop_after_epochs; continue with: mmbalance train --resume {run_dir}")
        return 0
    print(_summary_line(results))
    print(format_results_table(results))
    print(f"run folder: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .config import load_config
    from .engine import Trainer, load_run_config
    from .engine.checkpoint import write_json

    overrides = _split_overrides(rest)
    allowed = {"train.device", "train.progress", "train.num_workers", "train.eval_batch_size", "train.probe",
               "train.channels_last", "train.compile", "train.persistent_workers", "train.prefetch_factor"}
    bad = [k for k in overrides if k not in allowed]
    if bad:
        raise ConfigError(f"evaluate cannot change {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")
    run_dir = Path(args.run)
    cfg = load_config(None, overrides, base=load_run_config(run_dir))
    trainer = Trainer(cfg, run_dir, resume=True)
    trainer.best_epoch = trainer.load_best()
    saved = run_dir / "results.json"
    train_seconds = json.loads(saved.read_text())["train_seconds"] if saved.exists() else 0.0
    trainer.train_seconds = train_seconds
    results = trainer.results()
    write_json(run_dir / "evaluation.json", results)
    print(_summary_line(results))
    print(format_results_table(results, splits=("val", "test")))
    if saved.exists():
        old = json.loads(saved.read_text())
        same = abs(old["test"]["accuracy"] - results["test"]["accuracy"]) < 1e-9
        print(f"test accuracy {'matches' if same else 'DIFFERS FROM'} results.json "
              f"({old['test']['accuracy']:.4f})")
    return 0


# arguments a component's factory receives from the engine, not from the user
_NOT_OPTIONS = {"encoders": ("input_shape",), "fusions": ("feature_dims", "num_classes")}


def format_options(kind: str, name: str, factory: Any, summary: str, skip: Sequence[str] = ()) -> str:
    """A table of a component's options (from its signature, type hints and docstring)."""
    from .options import describe_options

    opts = describe_options(factory, skip)
    lines = [f"{kind} {name}: {summary}"]
    if not opts:
        lines.append("  (no options)")
        return "\n".join(lines)
    rows = [("option", "type / allowed", "default", "meaning")]
    rows += [(o.name, o.type, "null" if o.default is None else repr(o.default), o.help) for o in opts]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r[:3])) + "  " + r[3])
    return "\n".join(line.rstrip() for line in lines)


def cmd_list(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .data import DATASETS, list_datasets
    from .methods import METHODS, list_methods
    from .models import ENCODERS, FUSIONS, list_encoders, list_fusions

    list_methods(), list_datasets(), list_encoders(), list_fusions()
    sections = [("methods", METHODS), ("fusions", FUSIONS), ("encoders", ENCODERS), ("datasets", DATASETS)]
    what = args.what
    if args.name:
        if not what:
            raise ConfigError("name what to describe: mmbalance list methods NAME (or fusions, encoders, datasets)")
        reg = dict(sections)[what]
        entry = next(e for e in reg.entries() if e.name == args.name) if args.name in reg else reg.get(args.name)
        print(format_options(what[:-1], args.name, entry.obj, entry.summary, _NOT_OPTIONS.get(what, ())))
        if what == "methods":
            from .methods import method_metadata

            md = method_metadata(args.name)
            if md["paper"]:
                print(f"paper: {md['paper']} ({md['venue']} {md['year']})")
            cost = "not measured" if md["step_cost"] is None else f"{md['step_cost']:.2f}x joint"
            print(f"category: {md['category'] or '-'}; step cost (CPU benchmark): {cost}")
        return 0
    for title, reg in sections:
        if what and what != title:
            continue
        print(f"{title}:")
        entries = reg.entries()
        w = max((len(e.name) for e in entries), default=0)
        if title == "methods":
            from .methods import method_metadata

            rows = []
            for e in entries:
                md = method_metadata(e.name)
                cost = "-" if md["step_cost"] is None else f"{md['step_cost']:.2f}x"
                rows.append((e.name, md["category"] or "-", f"{md['venue'] or ''} {md['year'] or ''}".strip() or "-",
                             cost, e.summary))
            cw = [max(len(r[i]) for r in rows) for i in range(4)]
            cw = [max(c, len(h)) for c, h in zip(cw, ("name", "category", "venue", "step cost"))]
            print("  " + "  ".join(h.ljust(cw[i]) for i, h in enumerate(("name", "category", "venue", "step cost")))
                  + "  summary")
            for r in rows:
                print("  " + "  ".join(c.ljust(cw[i]) for i, c in enumerate(r[:4])) + "  " + r[4])
            continue
        for e in entries:
            print(f"  {e.name.ljust(w)}  {e.summary}")
    if not what:
        print("options of one: mmbalance list methods NAME (likewise fusions, encoders, datasets)")
    return 0


def cmd_plot(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    from .experiments.plots import plot_run

    png, csv_path = plot_run(args.run, args.output)
    print(f"wrote {png} and {csv_path}")
    return 0


def cmd_preprocess(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    from .data import preprocess

    return preprocess.run(args)


def cmd_build_data(args: argparse.Namespace, rest: Sequence[str]) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    from .data.av_digits import build_av_digits

    folder = build_av_digits(root=args.root, size=args.size, noise=args.noise, image_size=args.image_size,
                             image_noise=args.image_noise, data_seed=args.data_seed, workers=args.workers,
                             force=args.force)
    print(f"av_digits ready in {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmbalance", description="Imbalanced multimodal learning toolkit.")
    p.add_argument("--version", action="version", version=f"mmbalance {__import__('mmbalance').__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a method (default: joint + concat on the embedded data)",
                       description="Train a method. Any config key is a dotted flag: --optim.lr 0.05, "
                                   "--method.T 8, --dataset.root DIR, --train.deterministic.")
    t.add_argument("--config", action="append", help="YAML config file (defaults < files < flags); may be "
                   "given several times, later files win")
    t.add_argument("--dataset", help="dataset name or path to a .npz features file")
    t.add_argument("--method", help="method name (see `mmbalance list methods`)")
    t.add_argument("--fusion", help="fusion name")
    t.add_argument("--encoder", help="encoder for every modality")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--optimizer", help="sgd | adam | adamw | adagrad")
    t.add_argument("--scheduler", help="none | step | multistep | cosine")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--modalities", type=lambda s: [x for x in s.split(",") if x],
                   help="comma-separated modalities to use, e.g. pix,fou,zer")
    t.add_argument("--output-dir", dest="output_dir", help="run folder (default runs/<dataset>-<method>-...)")
    t.add_argument("--resume", metavar="DIR", help="continue the stopped run in DIR")
    t.add_argument("--logger", action="append", choices=["csv", "tensorboard"],
                   help="also log to metrics.csv / TensorBoard (metrics.jsonl is always written)")
    t.add_argument("--deterministic", action="store_true", help="deterministic algorithms")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="re-evaluate a saved run at its selected checkpoint")
    e.add_argument("--run", required=True, metavar="DIR", help="run folder")
    e.set_defaults(func=cmd_evaluate)

    ls = sub.add_parser("list", help="list methods, fusions, encoders, datasets")
    ls.add_argument("what", nargs="?", choices=["methods", "fusions", "encoders", "datasets"])
    ls.add_argument("name", nargs="?", help="describe this one: every option with type, default and meaning")
    ls.set_defaults(func=cmd_list)

    pl = sub.add_parser("plot", help="curves of a run: per-modality validation accuracy and every diagnostic")
    pl.add_argument("run", metavar="RUN", help="run folder")
    pl.add_argument("--output", help="folder for curves.png / curves.csv (default: the run folder)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("build-data", help="generate the av_digits dataset ahead of training (else built on first use)")
    b.add_argument("dataset", choices=["av_digits"])
    b.add_argument("--root", help="cache folder (default: $MMBALANCE_CACHE or ~/.cache/mmbalance)")
    b.add_argument("--size", type=int, default=3000, help="number of samples (default 3000)")
    b.add_argument("--noise", type=float, default=1.0, help="audio noise level (higher = weaker audio)")
    b.add_argument("--image-size", dest="image_size", type=int, default=7,
                   help="detail kept in the digit images (lower = weaker visual)")
    b.add_argument("--image-noise", dest="image_noise", type=float, default=0.5)
    b.add_argument("--data-seed", dest="data_seed", type=int, default=0)
    b.add_argument("--workers", type=int, help="parallel eSpeak processes")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.set_defaults(func=cmd_build_data)

    try:
        from .data import preprocess

        pp = sub.add_parser("preprocess", help="turn raw videos of a standard dataset into the loaders' layout")
        preprocess.add_arguments(pp)
        pp.set_defaults(func=cmd_preprocess)
    except ImportError:  # pragma: no cover - module not present
        pass
    from .experiments import extract

    xf = sub.add_parser("extract-features", help=extract.HELP)
    extract.add_arguments(xf)
    xf.set_defaults(func=extract.run)
    try:
        from .experiments import cli as exp_cli

        ex = sub.add_parser("experiment", help="multi-seed runs, sweeps and result tables")
        exp_cli.add_arguments(ex)
        ex.set_defaults(func=exp_cli.run)
        tu = sub.add_parser("tune", help="the fair protocol: same search budget per method, then several seeds")
        exp_cli.add_tune_arguments(tu)
        tu.set_defaults(func=exp_cli.run_tune)
        su = sub.add_parser("summarize", help="mean ± std, gap to joint with significance: Markdown, CSV, LaTeX")
        exp_cli.add_summarize_arguments(su)
        su.set_defaults(func=exp_cli.run_summarize)
        from .experiments import analyze as analyze_cmd, diagnose as diagnose_cmd, report as report_cmd

        dg = sub.add_parser("diagnose", help="which modality is under-learned on a dataset (and, with --methods, "
                            "which method to use): unimodal and joint runs, contributions, a verdict")
        diagnose_cmd.add_arguments(dg)
        dg.set_defaults(func=diagnose_cmd.run)
        an = sub.add_parser("analyze", help="imbalance analysis of a finished run or experiment (analysis.json)")
        analyze_cmd.add_arguments(an)
        an.set_defaults(func=analyze_cmd.run)
        rp = sub.add_parser("report", help="one self-contained HTML page for a run, an experiment or a diagnosis")
        report_cmd.add_arguments(rp)
        rp.set_defaults(func=report_cmd.run)
    except ImportError:  # pragma: no cover
        pass
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.quiet)
    from .engine.rundir import install_interrupt_handlers

    install_interrupt_handlers()  # SIGTERM ends a run like Ctrl-C: files consistent, resumable
    try:
        return int(args.func(args, rest) or 0)
    except ConfigError as e:
        print(f"mmbalance: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        hint = getattr(args, "interrupt_hint", None) or "nothing was running that can be resumed"
        print(f"mmbalance: interrupted ({e or 'SIGINT'}); {hint}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - turn known failure kinds into one line
        from .engine import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"mmbalance: training diverged: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
