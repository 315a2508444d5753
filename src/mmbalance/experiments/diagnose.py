"""``mmbalance diagnose DATA``: is a dataset imbalanced, which modality is under-learned, and
which method to use.

Under a small fixed budget (``--epochs``, default 40: the budget of the results in
``docs/methods.md``) it trains, through the ordinary experiment runner (so a rerun reuses
finished runs), each modality alone (``unimodal``) and the joint model (``joint``), all with
linear probes, into ``OUT/reference``. It then reports per modality:

* its accuracy alone (test) and its unimodal encoder's probe accuracy — the reference for how
  well it *can* be learned;
* the joint model's encoder probe accuracy and the **gap** to that reference (negative =
  under-learned inside the joint model);
* its test-set Shapley contribution to the joint model's prediction (mean per sample, and share);
* for every pair of modalities, an **error matrix** of the unimodal models' test predictions:
  the share of samples only one of them classifies correctly (what each knows that the other
  does not);

and a **verdict** in words: a modality is *under-learned* when its gap is below
``-gap_threshold`` (default 0.02: about one binomial standard error of a 400-sample test
accuracy near 0.8, so a single seed flags only clear gaps); the modality with the largest
contribution share *dominates* when its share exceeds an even split by 0.1; and fusion *hurts*
when the joint model is less accurate than the best modality alone.

With ``--methods a,b`` (or ``--all``: every registered method but ``joint``/``unimodal``) it
also runs those methods and ``joint`` over ``--seeds`` into ``OUT/comparison``, picks the one
with the best mean **validation** accuracy, and reports its test margin over ``joint`` (mean and
sample std of the per-seed differences) — the test split only reports, it never chooses.

Writes ``OUT/diagnosis.json`` (its paths relative to ``OUT``, so the folder can move),
``OUT/plots/`` and the self-contained ``OUT/report.html``, and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..registry import ConfigError

log = logging.getLogger("mmbalance")

#: methods ``--all`` leaves out: the references themselves
NOT_COMPARED = ("joint", "unimodal")


# ----------------------------------------------------------------------------- pure parts
def verdict(rows: Mapping[str, Mapping[str, Any]], errors: Mapping[str, Mapping[str, Any]], joint_accuracy: float | None,
            gap_threshold: float = 0.02) -> dict[str, Any]:
    """The diagnosis in words from the per-modality ``rows`` (``reference``, ``joint_probe``,
    ``gap``, ``share``, ``unimodal_accuracy``), the unimodal models' error matrices and the joint
    model's accuracy. Returns ``sentences``, ``under_learned`` (modalities, largest gap first)
    and ``dominant`` (or None).

    >>> rows = {"pix": {"reference": 0.96, "joint_probe": 0.96, "gap": 0.0, "share": 0.66, "unimodal_accuracy": 0.96},
    ...         "fou": {"reference": 0.82, "joint_probe": 0.79, "gap": -0.03, "share": 0.34, "unimodal_accuracy": 0.83}}
    >>> verdict(rows, {}, 0.97)["sentences"][0]
    '`fou` is under-learned: its encoder reaches 0.790 inside the joint model vs 0.820 alone (probe accuracy, gap -0.030); contribution share 0.34.'
    """
    sentences: list[str] = []
    under = sorted((m for m, r in rows.items() if r.get("gap") is not None and r["gap"] < -gap_threshold),
                   key=lambda m: rows[m]["gap"])
    for m in under:
        r = rows[m]
        share = "" if r.get("share") is None else f"; contribution share {r['share']:.2f}"
        sentences.append(f"`{m}` is under-learned: its encoder reaches {r['joint_probe']:.3f} inside the joint model "
                         f"vs {r['reference']:.3f} alone (probe accuracy, gap {r['gap']:+.3f}){share}.")
    known = [m for m, r in rows.items() if r.get("gap") is not None]
    if not under and known:
        sentences.append(f"No modality is under-learned beyond {gap_threshold:.3f}: every encoder inside the joint "
                         f"model is within {gap_threshold:.3f} of its unimodal reference (probe accuracy).")
    shares = {m: r["share"] for m, r in rows.items() if r.get("share") is not None}
    dominant = None
    if len(shares) > 1:
        top = max(shares, key=lambda m: shares[m])
        if shares[top] > 1.0 / len(rows) + 0.1:
            dominant = top
            sentences.append(f"`{top}` dominates the fused prediction (contribution share {shares[top]:.2f} of "
                             f"{len(rows)} modalities).")
    alone = {m: r["unimodal_accuracy"] for m, r in rows.items() if r.get("unimodal_accuracy") is not None}
    if alone and joint_accuracy is not None:
        best = max(alone, key=lambda m: alone[m])
        if joint_accuracy < alone[best]:
            sentences.append(f"Fusion hurts: the joint model ({joint_accuracy:.3f}) is less accurate than `{best}` "
                             f"alone ({alone[best]:.3f}).")
        else:
            sentences.append(f"The joint model ({joint_accuracy:.3f}) beats the best modality alone (`{best}`, "
                             f"{alone[best]:.3f}) by {joint_accuracy - alone[best]:+.3f}.")
    for key, e in errors.items():
        a, b = key.split("|")
        if e.get("both") is None:
            continue
        sentences.append(f"Alone, `{a}` is right where `{b}` is wrong on {e['only'][a]:.1%} of test samples, and "
                         f"`{b}` where `{a}` is wrong on {e['only'][b]:.1%} (both right {e['both']:.1%}).")
    return {"sentences": sentences, "under_learned": under, "dominant": dominant, "gap_threshold": gap_threshold}


def paired_margin(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[str, Any]:
    """Per-seed differences ``values[s] - baseline[s]`` over the seeds both have: mean, sample
    std (None with one seed) and n.

    >>> paired_margin({0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.8, 2: 0.7})["mean"]  # doctest: +ELLIPSIS
    0.025...
    """
    from .analyze import mean_std

    seeds = [s for s in values if s in baseline]
    return {**mean_std(values[s] - baseline[s] for s in seeds), "seeds": seeds}


def recommend(runs: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str = "joint") -> dict[str, Any]:
    """The label with the best mean validation accuracy over its seeds (``runs``: ``{label: {seed:
    {"val": acc, "test": acc}}}``), its test accuracy (mean ± std) and its paired test margin
    over ``baseline``; ties go to the baseline, then to the first label."""
    from .analyze import mean_std

    table = {}
    for label, per_seed in runs.items():
        table[label] = {"val": mean_std(r["val"] for r in per_seed.values()),
                        "test": mean_std(r["test"] for r in per_seed.values()),
                        "seeds": sorted(per_seed)}
    order = [baseline] + [k for k in runs if k != baseline] if baseline in runs else list(runs)
    best = max(order, key=lambda k: (table[k]["val"]["mean"] if table[k]["val"]["mean"] is not None else -math.inf))
    margin = None
    if baseline in runs:
        margin = paired_margin({s: r["test"] for s, r in runs[best].items()},
                               {s: r["test"] for s, r in runs[baseline].items()})
    return {"best": best, "table": table, "margin": margin, "baseline": baseline}


def recommendation_sentence(rec: Mapping[str, Any]) -> str:
    best, t = rec["best"], rec["table"][rec["best"]]
    n = t["val"]["n"]
    test = t["test"]
    test_txt = f"{test['mean']:.3f}" + ("" if test["std"] is None else f" ± {test['std']:.3f}")
    if best == rec["baseline"]:
        return (f"Recommended: plain `{best}` training — no method beats it on validation accuracy "
                f"({t['val']['mean']:.3f}, {n} seed(s)); test {test_txt}.")
    m = rec["margin"] or {}
    if m.get("mean") is None:
        return f"Recommended: `{best}` (best validation accuracy {t['val']['mean']:.3f}, {n} seed(s)); test {test_txt}."
    spread = "" if m.get("std") is None else f" ± {m['std']:.3f}"
    noisy = m.get("std") is not None and abs(m["mean"]) < 2 * m["std"] / math.sqrt(max(m["n"], 1))
    return (f"Recommended: `{best}` (best validation accuracy {t['val']['mean']:.3f} over {n} seed(s)); test "
            f"{test_txt}, {m['mean']:+.3f}{spread} over `{rec['baseline']}` (per-seed differences, std over seeds)"
            + (" — within the seed-to-seed noise." if noisy else "."))


# ----------------------------------------------------------------------------- the command
def _settings(data: str, modalities: Sequence[str] | None, epochs: int, device: str | None,
              overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    ov = dict(overrides or {})
    ov["dataset.name"] = data
    if modalities:
        ov["dataset.modalities"] = list(modalities)
    ov["train.epochs"] = epochs
    ov["train.probe"] = True
    if device:
        ov["train.device"] = device
    return ov


def _experiment_command(specs: Sequence[str], seeds: Sequence[int], out: Path, config: str | None,
                        overrides: Mapping[str, Any]) -> str:
    parts = ["mmbalance", "experiment", "--runs", *specs, "--seeds", ",".join(map(str, seeds)), "--output-dir", str(out)]
    if config:
        parts += ["--config", str(config)]
    for k, v in overrides.items():
        val = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else ("true" if v is True else "false" if v is False else v)
        parts += [f"--{k}", str(val)]
    return " ".join(shlex.quote(p) for p in parts)


def _per_seed(exp_dir: Path, summary: Mapping[str, Any]) -> dict[str, dict[int, dict[str, float]]]:
    from .analyze import read_json

    out: dict[str, dict[int, dict[str, float]]] = {}
    for row in summary["rows"]:
        for rel in row.get("runs", []):
            res = read_json(exp_dir / rel / "results.json") or {}
            if res:
                out.setdefault(row["label"], {})[int(res["seed"])] = {"val": res["val"]["accuracy"],
                                                                      "test": res["test"]["accuracy"]}
    return out


def _finished(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    if summary.get("unfinished"):
        raise ConfigError(f"{len(summary['unfinished'])} run(s) stopped before finishing (train.stop_after_epochs); "
                          "rerun the same diagnose command to continue them")
    return summary


def comparable_methods(names: Sequence[str], config: str | None, overrides: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The methods among ``names`` whose run can be configured on this data (checked without
    training), and one line per method left out."""
    from ..config import load_config
    from .runner import check_components

    keep, skipped = [], []
    for name in names:
        ov = dict(overrides)
        ov["method.name"] = name
        try:
            check_components(load_config(config, ov))
        except ConfigError as e:
            skipped.append(f"{name}: {e}")
            continue
        keep.append(name)
    return keep, skipped


def diagnose(data: str = "uci_mfeat", *, modalities: Sequence[str] | None = None, epochs: int = 40, seed: int = 0,
             methods: Sequence[str] = (), all_methods: bool = False, seeds: Sequence[int] = (0, 1, 2),
             output_dir: str | Path | None = None, device: str | None = None, jobs: int = 1, config: str | None = None,
             overrides: Mapping[str, Any] | None = None, gap_threshold: float = 0.02, progress: bool | None = None,
             command: str | None = None, report: bool = True) -> dict[str, Any]:
    """Run the diagnosis (see the module docstring); returns the ``diagnosis.json`` dict."""
    import torch

    from ..api import load_run
    from ..config import TrainConfig, load_config
    from ..engine.checkpoint import write_json
    from ..evaluation.imbalance import error_matrices
    from ..methods import list_methods
    from .analyze import analyze_run, progress_bar, read_json, run_data, unimodal_references
    from .runner import run_experiment

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"--epochs takes a positive integer, got {epochs!r}")
    if gap_threshold < 0:
        raise ConfigError(f"--gap-threshold must be >= 0, got {gap_threshold}")
    ov = _settings(data, modalities, epochs, device, overrides)
    cfg = load_config(config, ov)
    splits = run_data(cfg)
    mods = list(splits.modalities)
    if len(mods) < 2:
        raise ConfigError(f"diagnose needs at least two modalities; {data} gives {', '.join(mods) or 'none'} "
                          "(choose them with --modalities a,b)")
    wanted = [m for m in list_methods() if m not in NOT_COMPARED] if all_methods else list(methods)
    wanted = [m for m in dict.fromkeys(wanted) if m not in NOT_COMPARED]
    unknown = [m for m in wanted if m not in list_methods()]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(list_methods())}")
    wanted, skipped = comparable_methods(wanted, config, ov)
    skipped = [f"left out of the comparison: {s}" for s in skipped]
    out = Path(output_dir) if output_dir else Path("runs") / (
        f"diagnose-{Path(str(data)).stem}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file; choose another folder")
    ref_dir = out / "reference"
    # the joint run keeps its epoch checkpoints (for the contribution over epochs) where the engine can
    joint_spec = "joint=joint:train.keep_checkpoints=true" if hasattr(TrainConfig(), "keep_checkpoints") else "joint"
    specs = [joint_spec] + [f"uni-{m}=unimodal:modality={m}" for m in mods]
    log.info("diagnose: training joint and %s alone (%d epochs, seed %d) into %s", ", ".join(mods), epochs, seed, ref_dir)
    _finished(run_experiment(specs, [seed], ref_dir, config, ov, jobs=jobs,
                             command=_experiment_command(specs, [seed], ref_dir, config, ov)))
    joint_dir = ref_dir / "joint" / f"seed{seed}"
    refs = unimodal_references([ref_dir])
    analysis = analyze_run(joint_dir, refs, device=device or "cpu", progress=progress, data=splits)
    joint_res = read_json(joint_dir / "results.json") or {}

    # each modality alone: test predictions of the unimodal models
    bar = progress_bar(progress)
    correct: dict[str, torch.Tensor] = {}
    present: dict[str, torch.Tensor] = {}
    uni_res: dict[str, dict[str, Any]] = {}
    for m in mods:
        rd = ref_dir / f"uni-{m}" / f"seed{seed}"
        uni_res[m] = read_json(rd / "results.json") or {}
        run = load_run(rd, device=device or "cpu")
        hits, pres = [], []
        loader = torch.utils.data.DataLoader(splits.test, batch_size=run.config.train.eval_batch_size)
        for batch in bar(loader, desc=f"{m} alone"):
            pred = run.predict({m: batch["inputs"][m]}, {m: batch["present"][m]} if "present" in batch else None)
            hits.append(pred.labels == batch["label"])
            pres.append(batch["present"][m].bool() if "present" in batch else torch.ones(len(pred.labels), dtype=torch.bool))
        correct[m], present[m] = torch.cat(hits), torch.cat(pres)
    errors = error_matrices(correct, present)

    rows: dict[str, dict[str, Any]] = {}
    gap = (analysis.get("probe_gap") or {})
    for m in mods:
        ut = (uni_res[m].get("test") or {})
        ref = (gap.get("reference") or {}).get(m) or {}
        rows[m] = {"unimodal_accuracy": ut.get("accuracy"),
                   "unimodal_probe": ut.get("per_modality", {}).get(m, {}).get("probe_accuracy"),
                   "reference": ref.get("value"),
                   "joint_probe": analysis["per_modality"][m]["probe_accuracy"],
                   "joint_unimodal_accuracy": analysis["per_modality"][m]["accuracy"],
                   "gap": (gap.get("gap") or {}).get(m),
                   "contribution": analysis["contribution"]["mean"][m],
                   "share": analysis["contribution"]["share"][m],
                   "grad_norm_ratio": ((analysis.get("grad_norm") or {}).get("mean_ratio") or {}).get(m)}
    joint_acc = (joint_res.get("test") or {}).get("accuracy")
    words = verdict(rows, errors, joint_acc, gap_threshold)

    comparison = None
    notes = skipped + list(analysis["notes"])
    if wanted:
        cmp_dir = out / "comparison"
        cspecs = ["joint", *wanted]
        seeds = list(seeds)
        log.info("diagnose: comparing %s over seeds %s into %s", ", ".join(cspecs), seeds, cmp_dir)
        summary = _finished(run_experiment(cspecs, seeds, cmp_dir, config, ov, jobs=jobs,
                                           command=_experiment_command(cspecs, seeds, cmp_dir, config, ov)))
        rec = recommend(_per_seed(cmp_dir, summary))
        comparison = {"folder": cmp_dir.relative_to(out).as_posix(), "methods": cspecs, "seeds": seeds, **rec,
                      "sentence": recommendation_sentence(rec)}
        words["sentences"].append(comparison["sentence"])

    result = {"kind": "diagnosis", "dataset": joint_res.get("dataset") or Path(str(data)).stem, "data": str(data),
              "modalities": mods, "epochs": epochs, "seed": seed, "command": command, "output_dir": str(out),
              "reference_dir": ref_dir.relative_to(out).as_posix(),
              "joint": {"run": joint_dir.relative_to(out).as_posix(), "accuracy": joint_acc,
                        "macro_f1": (joint_res.get("test") or {}).get("macro_f1")},
              "per_modality": rows, "error_matrices": errors, "modality_gap": analysis["modality_gap"],
              "contribution_per_class": analysis["contribution"]["per_class"],
              "contribution_epochs": analysis.get("contribution_epochs"),
              "class_counts": analysis["contribution"]["class_counts"],
              "verdict": words["sentences"], "under_learned": words["under_learned"], "dominant": words["dominant"],
              "gap_threshold": gap_threshold, "comparison": comparison, "notes": notes, "plots": []}
    result["plots"] = diagnosis_plots(out, result)
    write_json(out / "diagnosis.json", result)
    if report:
        from .report import write_report

        result["report"] = str(write_report(out))
    return result


def diagnosis_plots(out: Path, d: Mapping[str, Any]) -> list[str]:
    """Per-modality bars (alone vs inside the joint model; contribution share) and, with a
    comparison, the methods' test accuracy; PNG paths relative to ``out``."""
    from .plots import bar_chart, plot_comparison, plot_contribution_epochs

    mods = d["modalities"]
    rows = d["per_modality"]
    made = [bar_chart(out / "plots", "modalities", mods,
                      {"alone (unimodal run)": [(rows[m]["reference"], None) for m in mods],
                       "inside the joint model": [(rows[m]["joint_probe"], None) for m in mods]},
                      "test probe accuracy", "each encoder alone and inside the joint model")[0],
            bar_chart(out / "plots", "contribution", mods,
                      {"contribution share": [(rows[m]["share"], None) for m in mods]},
                      "share of the Shapley contribution", "contribution to the joint model (test)",
                      zero_line=True)[0]]
    curves = d.get("contribution_epochs")
    if curves:
        made.append(plot_contribution_epochs(curves, out / "plots")[0])
    cmp = d.get("comparison")
    if cmp:
        from .analyze import read_json

        s = read_json(out / cmp["folder"] / "summary.json")
        if s and s.get("rows"):
            made.append(plot_comparison(s, out / "plots")[0])
    return [str(p.relative_to(out)) for p in made]


def format_diagnosis(d: Mapping[str, Any]) -> str:
    from .analyze import table

    def f(v: Any, signed: bool = False) -> str:
        return "-" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")

    head = ("modality", "alone acc", "alone probe", "joint probe", "gap", "contribution", "share")
    rows = [head] + [(m, f(r["unimodal_accuracy"]), f(r["unimodal_probe"]), f(r["joint_probe"]), f(r["gap"], True),
                      f(r["contribution"]), f(r["share"])) for m, r in d["per_modality"].items()]
    lines = [f"diagnosis of {d['dataset']} ({', '.join(d['modalities'])}): {d['epochs']} epochs, seed {d['seed']}; "
             f"joint test accuracy {f(d['joint']['accuracy'])}", table(rows)]
    for key, e in d["error_matrices"].items():
        a, b = key.split("|")
        lines.append(f"alone, {a} vs {b} (test): both right {f(e['both'])}, only {a} {f(e['only'][a])}, "
                     f"only {b} {f(e['only'][b])}, neither {f(e['neither'])}")
    cmp = d.get("comparison")
    if cmp:
        crow = [("run", "val acc", "test acc", "seeds")]
        for label, t in cmp["table"].items():
            pm = (lambda s: "-" if s["mean"] is None else f"{s['mean']:.4f}" + ("" if s["std"] is None else f" ± {s['std']:.4f}"))
            crow.append((label + (" *" if label == cmp["best"] else ""), pm(t["val"]), pm(t["test"]),
                         ",".join(map(str, t["seeds"]))))
        lines += ["", "comparison (* = best on validation):", table(crow)]
    lines += ["", "verdict:"] + [f"- {s}" for s in d["verdict"]]
    lines += [f"note: {n}" for n in d["notes"] if "epoch checkpoints" not in n]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.allow_abbrev = False  # --seed must not silently mean --seeds
    p.description = ("Diagnose modality imbalance on a dataset: train each modality alone and the joint model "
                     "under a small fixed budget, then report per modality its accuracy alone, its encoder's "
                     "probe accuracy inside the joint model and the gap (under-learning), its Shapley "
                     "contribution, error matrices and a verdict. With --methods (or --all) also compare methods "
                     "over several seeds and recommend the best by validation. Extra dotted flags "
                     "(--optim.lr 0.05) apply to every run.")
    # DATA is taken from the arguments argparse does not know (see split_data): declared as a
    # positional, the value of a dotted flag before it (--optim.lr 0.05 DATA) would be taken for it
    p.usage = "%(prog)s [DATA] [options] [--section.key VALUE ...]"
    p.epilog = "DATA: a registered dataset or a .npz features file (default uci_mfeat)."
    p.add_argument("--modalities", type=lambda s: [x for x in s.split(",") if x], help="comma-separated modalities")
    p.add_argument("--epochs", type=int, default=40, help="epochs of every run (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diagnosis runs (default 0)")
    p.add_argument("--methods", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="comma-separated methods to compare with joint, e.g. arl,mla,qmf")
    p.add_argument("--all", dest="all_methods", action="store_true", help="compare every registered method")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the comparison (default 0,1,2)")
    p.add_argument("--output-dir", dest="output_dir", help="folder (default runs/diagnose-<data>-<time>)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (training and analysis)")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs in parallel (processes, 1 thread each; default 2: on two CPU cores this is several "
                        "times faster than one process whose two threads compete with other work)")
    p.add_argument("--config", help="YAML config applied to every run")
    p.add_argument("--gap-threshold", dest="gap_threshold", type=float, default=0.02,
                   help="probe gap below which a modality is called under-learned (default 0.02)")


def split_data(rest: Sequence[str]) -> tuple[str, list[str]]:
    """DATA (the one argument that is neither a ``--flag`` nor a flag's value) and the dotted
    flags, from the arguments the parser left over.

    >>> split_data(["--optim.lr", "0.05", "mydata.npz", "--train.deterministic=true"])
    ('mydata.npz', ['--optim.lr', '0.05', '--train.deterministic=true'])
    """
    data, flags, i = None, [], 0
    rest = list(rest)
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--") and len(tok) > 2:
            flags.append(tok)
            if "=" not in tok and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                flags.append(rest[i + 1])
                i += 1
        elif data is None:
            data = tok
        else:
            raise ConfigError(f"unexpected argument '{tok}' (DATA is already {data}); dotted flags look like "
                              "--section.key value")
        i += 1
    return data or "uci_mfeat", flags


def run(args: argparse.Namespace, rest: Sequence[str] = ()) -> int:
    from .cli import parse_flags, parse_seeds

    data, flags = split_data(rest)
    overrides = parse_flags(flags)
    for key in ("dataset.name", "train.epochs", "train.seed", "method.name", "output_dir"):
        if key in overrides:
            raise ConfigError(f"diagnose sets '{key}' itself; use DATA, --epochs, --seed/--seeds, --methods, --output-dir")
    argv = list(getattr(args, "argv", None) or [])
    command = "mmbalance " + " ".join(shlex.quote(a) for a in argv if a not in ("-q", "--quiet")) if argv else None
    d = diagnose(data, modalities=args.modalities, epochs=args.epochs, seed=args.seed, methods=args.methods,
                 all_methods=args.all_methods, seeds=parse_seeds(args.seeds), output_dir=args.output_dir,
                 device=args.device, jobs=args.jobs, config=args.config, overrides=overrides,
                 gap_threshold=args.gap_threshold, command=command)
    print(format_diagnosis(d))
    print(f"wrote {Path(d['output_dir']) / 'diagnosis.json'} and {d.get('report')}")
    return 0
