"""``mmbalance report DIR``: one self-contained HTML page for a run, an experiment or a diagnosis.

The page holds the command that reproduces the folder (a run: ``mmbalance train --config
DIR/config.yaml``; an experiment: its ``command.txt``; a diagnosis: the ``mmbalance diagnose``
command it recorded), the results and analysis tables, the plots (PNG embedded as base64
``data:`` URIs, with the CSV behind each as a ``data:`` download link) and the configuration.
It references nothing outside itself: no network, no external CSS or JavaScript.

A run or experiment folder without ``analysis.json`` is analysed first
(:mod:`mmbalance.experiments.analyze`), unless ``analyze=False``.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..registry import ConfigError

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
h3{font-size:1.02em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;font-size:.85em}
code{background:#f6f8fa;padding:0 .2em}
figure{display:inline-block;width:48%;margin:.5em 1% .5em 0;vertical-align:top}
figure img{width:100%;border:1px solid #eee}figcaption{font-size:.8em;color:#555}
.note{color:#666;font-size:.9em}li{margin:.2em 0}
"""


# ----------------------------------------------------------------------------- HTML pieces
def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def fmt(v: Any, signed: bool = False, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def fmt_ms(s: Mapping[str, Any] | None, signed: bool = False) -> str:
    """``mean ± std`` of a summary statistic."""
    if not s or s.get("mean") is None:
        return "–"
    v = fmt(s["mean"], signed, 3)
    return v if s.get("std") is None else f"{v} ± {s['std']:.3f}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    """An HTML table (cells escaped)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(png: str | Path, caption: str = "") -> str:
    """A figure with the PNG embedded as a ``data:`` URI, and the CSV of the same name (if any)
    as a ``data:`` download link."""
    png = Path(png)
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    csv_path = png.with_suffix(".csv")
    link = ""
    if csv_path.is_file():
        c = base64.b64encode(csv_path.read_bytes()).decode("ascii")
        link = f' · <a download="{esc(csv_path.name)}" href="data:text/csv;base64,{c}">data ({esc(csv_path.name)})</a>'
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(caption or png.stem)}">'
            f"<figcaption>{esc(caption or png.stem)}{link}</figcaption></figure>")


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join(f"<section><h2>{esc(h)}</h2>{content}</section>" for h, content in sections if content)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1><p class=\"note\">mmbalance report, {esc(stamp)}</p>{body}</body></html>\n")


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def notes(items: Iterable[str]) -> str:
    items = [i for i in items if i]
    return "<ul class=\"note\">" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>" if items else ""


def figures(folder: Path, pngs: Iterable[str]) -> str:
    return "".join(image(folder / p) for p in pngs if (folder / p).is_file())


# ----------------------------------------------------------------------------- shared tables
def results_table(res: Mapping[str, Any]) -> str:
    rows = []
    for split in ("val", "test"):
        r = res.get(split)
        if not r:
            continue
        rows.append((split, "fused", fmt(r.get("accuracy")), fmt(r.get("macro_f1")), fmt(r.get("map")), "–"))
        for m, pm in (r.get("per_modality") or {}).items():
            rows.append((split, m, fmt(pm.get("accuracy")), fmt(pm.get("macro_f1")), fmt(pm.get("map")),
                         fmt(pm.get("probe_accuracy"))))
    return table(("split", "output", "accuracy", "macro-F1", "mAP", "probe accuracy"), rows,
                 "fused and per-modality metrics at the validation-selected checkpoint")


def error_table(pairs: Mapping[str, Mapping[str, Any]], what: str) -> str:
    rows = []
    for key, e in pairs.items():
        a, b = key.split("|")
        rows.append((f"{a} / {b}", e["n"], fmt(e["both"]), fmt(e["only"][a]), fmt(e["only"][b]), fmt(e["neither"])))
    if not rows:
        return ""
    return table(("pair a / b", "samples", "both right", "only a right", "only b right", "neither"), rows,
                 f"error matrices ({what})")


def analysis_sections(a: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Tables of one run's ``analysis.json``."""
    mods = a["modalities"]
    gap = (a.get("probe_gap") or {}).get("gap") or {}
    ref = (a.get("probe_gap") or {}).get("reference") or {}
    grad = (a.get("grad_norm") or {}).get("mean_ratio") or {}
    rows = [(m, fmt(a["per_modality"][m]["accuracy"]), fmt(a["per_modality"][m]["probe_accuracy"]),
             fmt((ref.get(m) or {}).get("value")), fmt(gap.get(m), True), fmt(a["contribution"]["mean"][m]),
             fmt(a["contribution"]["share"][m]), fmt(grad.get(m))) for m in mods]
    per_mod = table(("modality", "acc (z_m)", "probe", "unimodal reference", "probe gap", "contribution", "share",
                     "grad-norm ratio"), rows, f"per modality ({a['split']} split)")
    C = a["num_classes"]
    pc = a["contribution"]["per_class"]
    per_class = table(("class", "samples", *mods),
                      [(c, a["contribution"]["class_counts"][c], *[fmt(pc[m][c]) for m in mods]) for c in range(C)],
                      f"mean Shapley contribution per class (absent policy: {a['contribution'].get('absent_policy')})")
    mg = a["modality_gap"]
    gaps = table(("pair", "modality gap"), [(k.replace("|", " / "), fmt(v)) for k, v in mg["pairs"].items()],
                 f"distance between centroids of L2-normalised embeddings ({mg['space']})") if mg["pairs"] else ""
    sv = table(("layer", "shape", "largest singular values", "condition"),
               [(k, "×".join(map(str, v["shape"])), ", ".join(f"{s:.3f}" for s in v["singular_values"][:5]),
                 fmt(v["condition"], digits=2)) for k, v in a["singular_values"].items()],
               "singular values of the head's weight matrices")
    return [("Imbalance analysis", per_mod + notes(a.get("notes", []))),
            ("Contribution per class", per_class),
            ("Error matrices", error_table(a["error_matrices"]["pairs"],
                                           f"{a['split']} split, per-modality predictions: "
                                           f"{a['error_matrices']['source']}")),
            ("Modality gap and head spectrum", gaps + sv)]


# ----------------------------------------------------------------------------- the three kinds
def run_report(run_dir: Path, analyze: bool = True, device: str = "cpu") -> str:
    from .analyze import analyze_run, read_json, run_plots, unimodal_references

    res = read_json(run_dir / "results.json")
    a = read_json(run_dir / "analysis.json")
    if a is None and analyze and res is not None:
        a = analyze_run(run_dir, unimodal_references([]), device=device)
    pngs = list(a.get("plots") or []) if a else []
    if not pngs:
        pngs = run_plots(run_dir, a or {})
    title = (f"{res['method']} + {res['fusion']} on {res['dataset']} ({', '.join(res['modalities'])}), seed {res['seed']}"
             if res else f"run {run_dir.name} (unfinished)")
    cmd = f"mmbalance train --config {run_dir / 'config.yaml'}"
    summary = ""
    if res:
        summary = (f"<p>best epoch {esc(res.get('best_epoch'))}/{esc(res.get('epochs'))} (selected on validation), "
                   f"{esc(fmt(res.get('train_seconds'), digits=1))} s training on {esc(res.get('device'))}.</p>"
                   + results_table(res))
    sections = [("Reproduce", pre(cmd)), ("Results", summary)]
    if a:
        sections += analysis_sections(a)
    sections += [("Plots", figures(run_dir, pngs)), ("Configuration (config.yaml)", pre((run_dir / "config.yaml").read_text()))]
    return page(title, sections)


def experiment_report(exp_dir: Path, analyze: bool = True, device: str = "cpu") -> str:
    from .analyze import analyze_experiment, experiment_plots, find_runs, read_json

    summary = read_json(exp_dir / "summary.json")
    a = read_json(exp_dir / "analysis.json")
    if a is None and analyze and find_runs(exp_dir):
        a = analyze_experiment(exp_dir, device=device)
    pngs = list(a.get("plots") or []) if a else []
    if not pngs and a:
        pngs = experiment_plots(exp_dir, a)
    elif not pngs and summary and summary.get("rows"):
        from .plots import plot_comparison

        pngs = [str(plot_comparison(summary, exp_dir / "plots")[0].relative_to(exp_dir))]
    cmd_file = exp_dir / "command.txt"
    cmd = cmd_file.read_text().strip() if cmd_file.is_file() else "(no command.txt: the experiment was not run by mmbalance experiment, or not finished)"
    sections = [("Reproduce", pre(cmd))]
    if summary and summary.get("rows"):
        rows = summary["rows"]
        mods: list[str] = []
        for r in rows:
            mods += [m for m in r["per_modality"] if m not in mods]
        body = [(r["label"], r["fusion"], ",".join(map(str, r["seeds"])), fmt_ms(r["accuracy"]), fmt_ms(r["macro_f1"]),
                 *[fmt_ms(r["per_modality"].get(m, {}).get("probe_accuracy")) for m in mods],
                 *[fmt_ms(r["per_modality"].get(m, {}).get("accuracy")) for m in mods]) for r in rows]
        sections.append(("Results", table(("run", "fusion", "seeds", "test acc", "test macro-F1",
                                           *[f"probe {m}" for m in mods], *[f"acc {m} (z_m)" for m in mods]), body,
                                          "mean ± sample std over seeds; test split, checkpoint selected on validation")))
    if a:
        mods = []
        for r in a["rows"]:
            mods += [m for m in r["probe_gap"] if m not in mods]
        body = [(r["label"], r["n_runs"], fmt_ms(r["accuracy"]), *[fmt_ms(r["probe_gap"].get(m), True) for m in mods],
                 *[fmt_ms(r["contribution_share"].get(m)) for m in mods],
                 *[fmt_ms(r["grad_norm_ratio"].get(m)) for m in mods]) for r in a["rows"]]
        sections.append(("Imbalance analysis", table(
            ("run", "runs", f"{a['split']} acc", *[f"probe gap {m}" for m in mods],
             *[f"contribution share {m}" for m in mods], *[f"grad-norm ratio {m}" for m in mods]), body,
            "mean ± std over each label's runs; probe gap = probe accuracy − unimodal reference")))
        run_notes = sorted({n for r in a["runs"] for n in r["notes"]})
        sections.append(("Notes", notes(run_notes)))
    sections.append(("Plots", figures(exp_dir, pngs)))
    runs = find_runs(exp_dir)
    if runs:
        cfg = [f"<h3>{esc(rd.relative_to(exp_dir))}</h3>{pre((rd / 'config.yaml').read_text())}"
               for rd in _one_per_label(exp_dir, runs)]
        sections.append(("Configuration (one run per label)", "".join(cfg)))
    return page(f"experiment {exp_dir.name}", sections)


def _one_per_label(exp_dir: Path, runs: Sequence[Path]) -> list[Path]:
    from .analyze import run_label

    seen, out = set(), []
    for rd in runs:
        label = run_label(exp_dir, rd)
        if label not in seen:
            seen.add(label)
            out.append(rd)
    return out


def diagnosis_report(folder: Path) -> str:
    from .analyze import read_json

    d = read_json(folder / "diagnosis.json")
    if d is None:
        raise ConfigError(f"{folder / 'diagnosis.json'} is not readable JSON")
    mods = d["modalities"]
    cmd = d.get("command") or (f"mmbalance diagnose {d['data']} --modalities {','.join(mods)} --epochs {d['epochs']} "
                               f"--seed {d['seed']} --output-dir {folder}")
    rows = [(m, fmt(r["unimodal_accuracy"]), fmt(r["unimodal_probe"]), fmt(r["joint_probe"]), fmt(r["gap"], True),
             fmt(r["contribution"]), fmt(r["share"]), fmt(r.get("grad_norm_ratio"))) for m, r in d["per_modality"].items()]
    per_mod = table(("modality", "alone: accuracy", "alone: probe", "inside joint: probe", "gap", "contribution",
                     "share", "grad-norm ratio"), rows,
                    f"test split; joint model accuracy {fmt(d['joint']['accuracy'])}")
    verdict = "<ul>" + "".join(f"<li>{esc(s)}</li>" for s in d["verdict"]) + "</ul>"
    sections = [("Reproduce", pre(cmd)), ("Verdict", verdict), ("Per modality", per_mod),
                ("Error matrices", error_table(d["error_matrices"], "test split, each modality trained alone"))]
    cmp = d.get("comparison")
    if cmp:
        body = [(label + (" (best on validation)" if label == cmp["best"] else ""), fmt_ms(t["val"]), fmt_ms(t["test"]),
                 ",".join(map(str, t["seeds"]))) for label, t in cmp["table"].items()]
        m = cmp.get("margin") or {}
        sections.append(("Method comparison", table(("run", "validation accuracy", "test accuracy", "seeds"), body,
                                                    "mean ± sample std over seeds")
                         + f"<p>{esc(cmp['sentence'])}</p>"
                         + (f"<p class=\"note\">test margin of {esc(cmp['best'])} over {esc(cmp['baseline'])}: "
                            f"{esc(fmt_ms(m, True))} (per-seed differences over seeds {esc(m.get('seeds'))})</p>"
                            if m.get("mean") is not None else "")))
    sections.append(("Notes", notes(d.get("notes", []))))
    joint_dir = folder / d["joint"]["run"]  # paths in diagnosis.json are relative to its folder
    curves = [p for p in ((read_json(joint_dir / "analysis.json") or {}).get("plots") or []) if "curves" in p]
    sections.append(("Plots", figures(folder, d.get("plots") or []) + figures(joint_dir, curves)))
    joint_cfg = joint_dir / "config.yaml"
    if joint_cfg.is_file():
        sections.append(("Configuration of the joint run (config.yaml)", pre(joint_cfg.read_text())))
    return page(f"diagnosis of {d['dataset']} ({', '.join(mods)})", sections)


def build_report(path: str | Path, analyze: bool = True, device: str = "cpu") -> str:
    """The HTML page for a diagnosis folder (``diagnosis.json``), a run folder (``config.yaml``)
    or an experiment folder (``summary.json`` or run folders below it)."""
    from .analyze import find_runs, is_run

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder (give a run, experiment or diagnosis folder)")
    if (path / "diagnosis.json").is_file():
        return diagnosis_report(path)
    if is_run(path):
        return run_report(path, analyze, device)
    if (path / "summary.json").is_file() or find_runs(path):
        return experiment_report(path, analyze, device)
    raise ConfigError(f"{path} holds no run, experiment or diagnosis (no config.yaml, summary.json, diagnosis.json "
                      "or finished run folder)")


def write_report(path: str | Path, output: str | Path | None = None, analyze: bool = True,
                 device: str = "cpu") -> Path:
    """Write :func:`build_report` to ``output`` (default ``path/report.html``); returns its path."""
    from ..engine.checkpoint import atomic_write_bytes

    text = build_report(path, analyze, device)
    out = Path(output) if output else Path(path) / "report.html"
    atomic_write_bytes(out, lambda f: f.write(text.encode("utf-8")))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write one self-contained HTML page (plots embedded, no network) for a run, an experiment or "
                     "a diagnosis folder: the command that reproduces it, tables, plots and configuration.")
    p.add_argument("path", metavar="DIR", help="run, experiment or diagnosis folder")
    p.add_argument("--output", help="HTML file (default DIR/report.html)")
    p.add_argument("--no-analyze", dest="analyze", action="store_false",
                   help="do not run mmbalance analyze first when the folder has no analysis.json")
    p.add_argument("--device", default="cpu", help="device of that analysis: cpu | cuda | cuda:N | auto (default cpu)")


def run(args: argparse.Namespace, rest: Sequence[str] = ()) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    out = write_report(args.path, args.output, args.analyze, args.device)
    print(f"wrote {out}")
    return 0
