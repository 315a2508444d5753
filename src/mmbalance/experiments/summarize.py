"""``mmbalance summarize DIR``: the table a paper would print, from the runs' ``results.json``.

For every run label of an experiment folder (``DIR/<label>/seed<k>/results.json``, or the
``final/`` runs of a tuning folder): mean ± sample std over seeds of the fused and per-modality
test metrics (accuracy, macro-F1, mAP; per modality the unimodal-logit accuracy and the linear
probe), each method's gap to ``joint`` with a paired t-test over the seeds they share
(significance marked), and the chosen hyperparameters when the folder was tuned. Written as
Markdown, CSV and LaTeX (``summary_table.{md,csv,tex}``), best value per column in bold. The
numbers are the runs' ``results.json`` numbers, nothing else.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..registry import ConfigError

__all__ = ["collect_runs", "paired_t_test", "student_t_sf", "summarize_folder", "table_rows"]


# ----------------------------------------------------------------------------- statistics
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(ln)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom.

    >>> round(student_t_sf(2.919986, 2), 4)  # the 0.95 quantile for 2 degrees of freedom
    0.05
    """
    x = df / (df + t * t)
    tail = 0.5 * _betai(df / 2.0, 0.5, x)
    return tail if t >= 0 else 1.0 - tail


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """Two-sided paired t-test of ``a - b`` (same seeds): mean difference, t and p. With fewer
    than two pairs, or no variation in the differences, p is None (undefined).

    >>> r = paired_t_test([0.80, 0.82, 0.81], [0.78, 0.79, 0.79])
    >>> round(r["diff"], 4), round(r["p"], 4)
    (0.0233, 0.0198)
    """
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return {"diff": None, "t": None, "p": None, "n": 0}
    mean = statistics.fmean(d)
    if n < 2:
        return {"diff": mean, "t": None, "p": None, "n": n}
    sd = statistics.stdev(d)
    if sd == 0.0:
        return {"diff": mean, "t": None, "p": None, "n": n}
    t = mean / (sd / math.sqrt(n))
    return {"diff": mean, "t": t, "p": min(1.0, 2.0 * student_t_sf(abs(t), n - 1)), "n": n}


# ----------------------------------------------------------------------------- collection
def collect_runs(folder: str | Path) -> dict[str, list[dict[str, Any]]]:
    """``{label: [results.json of each seed]}`` of an experiment folder (``label/seed<k>``), a
    tuning folder (its ``final/`` runs) or a single run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    if (folder / "results.json").exists():
        return {folder.name: [json.loads((folder / "results.json").read_text())]}
    root = folder / "final" if (folder / "final").is_dir() else folder
    out: dict[str, list[dict[str, Any]]] = {}
    order: list[str] = []
    if (root / "summary.json").exists():  # the experiment's own order of runs
        try:
            order = [r["label"] for r in json.loads((root / "summary.json").read_text()).get("rows", [])]
        except (ValueError, KeyError, TypeError):
            order = []
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    dirs.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    for label_dir in dirs:
        runs = []
        for seed_dir in sorted(label_dir.glob("seed*")):
            path = seed_dir / "results.json"
            if path.exists():
                try:
                    runs.append(json.loads(path.read_text()))
                except ValueError:
                    raise ConfigError(f"{path} is not valid JSON (damaged?)") from None
        if runs:
            out[label_dir.name] = sorted(runs, key=lambda r: r["seed"])
    if not out:
        raise ConfigError(f"{folder} holds no finished run (no <label>/seed<k>/results.json)")
    return out


def _ms(vals: Iterable[float | None]) -> dict[str, Any]:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return {"mean": statistics.fmean(v) if v else None, "std": statistics.stdev(v) if len(v) > 1 else None,
            "n": len(v)}


METRICS = ("accuracy", "macro_f1", "map")


def resolve_reference(runs: dict[str, list[dict[str, Any]]], reference: str) -> str:
    """``reference`` if it is a label, else the first ``joint`` run (e.g. ``joint-concat``)."""
    if reference in runs:
        return reference
    return next((k for k, rs in runs.items() if rs[0]["method"] == "joint"), reference)


def table_rows(runs: dict[str, list[dict[str, Any]]], reference: str = "joint",
               metric: str = "accuracy", alpha: float = 0.05) -> list[dict[str, Any]]:
    """One row per label: mean/std of every metric, and the paired test against ``reference``."""
    reference = resolve_reference(runs, reference)
    ref = {r["seed"]: r for r in runs.get(reference, [])}
    rows = []
    for label, rs in runs.items():
        mods = list(rs[0]["test"]["per_modality"])
        row: dict[str, Any] = {"label": label, "method": rs[0]["method"], "fusion": rs[0]["fusion"],
                               "dataset": rs[0]["dataset"], "seeds": [r["seed"] for r in rs],
                               "options": rs[0].get("method_options", {})}
        for m in METRICS:
            row[m] = _ms(r["test"].get(m) for r in rs)
        row["per_modality"] = {
            mod: {"accuracy": _ms(r["test"]["per_modality"][mod].get("accuracy") for r in rs),
                  "macro_f1": _ms(r["test"]["per_modality"][mod].get("macro_f1") for r in rs),
                  "map": _ms(r["test"]["per_modality"][mod].get("map") for r in rs),
                  "probe_accuracy": _ms(r["test"]["per_modality"][mod].get("probe_accuracy") for r in rs)}
            for mod in mods}
        if ref and label != reference:
            shared = [s for s in row["seeds"] if s in ref]
            ours = {r["seed"]: r for r in rs}
            test = paired_t_test([ours[s]["test"][metric] for s in shared], [ref[s]["test"][metric] for s in shared])
            test["significant"] = test["p"] is not None and test["p"] < alpha
            row["vs_reference"] = test
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- formatting
def _fmt(s: dict[str, Any], digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    return f"{s['mean']:.{digits}f}" if s["std"] is None else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    mods: list[str] = []
    for r in rows:
        mods += [m for m in r["per_modality"] if m not in mods]
    cols: list[tuple[str, Any]] = [("test acc", lambda r: r["accuracy"]), ("macro-F1", lambda r: r["macro_f1"]),
                                   ("mAP", lambda r: r["map"])]
    for m in mods:
        cols.append((f"acc {m}", lambda r, m=m: r["per_modality"].get(m, {}).get("accuracy")))
        cols.append((f"probe {m}", lambda r, m=m: r["per_modality"].get(m, {}).get("probe_accuracy")))
    return cols


def _gap(r: dict[str, Any]) -> str:
    t = r.get("vs_reference")
    if not t or t["diff"] is None:
        return "–"
    mark = "*" if t.get("significant") else ""
    p = "" if t["p"] is None else f" (p={t['p']:.3f})"
    return f"{t['diff']:+.3f}{mark}{p}"


def render(rows: list[dict[str, Any]], fmt: str, reference: str = "joint", tuned: dict[str, Any] | None = None) -> str:
    """``md``, ``csv`` or ``tex`` table; the best mean per column in bold (md, tex)."""
    cols = _columns(rows)
    best = {}
    for name, get in cols:
        vals = [get(r)["mean"] for r in rows if get(r) and get(r)["mean"] is not None]
        best[name] = max(vals) if vals else None
    head = ["run", "method", "fusion", "seeds"] + [c for c, _ in cols] + [f"vs {reference}"]
    if tuned:
        head.append("chosen setting")
    body = []
    for r in rows:
        cells = [r["label"], r["method"], r["fusion"], str(len(r["seeds"]))]
        for name, get in cols:
            s = get(r)
            text = _fmt(s) if fmt != "csv" else ("" if not s or s["mean"] is None else f"{s['mean']:.6f}")
            if fmt != "csv" and s and s["mean"] is not None and best[name] is not None and abs(s["mean"] - best[name]) < 1e-12:
                text = f"**{text}**" if fmt == "md" else f"\\textbf{{{text}}}"
            cells.append(text)
        cells.append(_gap(r))
        if tuned:
            cells.append(", ".join(f"{k}={v}" for k, v in (tuned.get(r["label"]) or {}).items()) or "defaults")
        body.append(cells)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(head)
        w.writerows(body)
        return buf.getvalue()
    if fmt == "tex":
        esc = lambda s: s.replace("_", "\\_").replace("±", "$\\pm$").replace("%", "\\%")  # noqa: E731
        lines = ["\\begin{tabular}{" + "l" * 4 + "c" * (len(head) - 4) + "}", "\\toprule",
                 " & ".join(esc(h) for h in head) + " \\\\", "\\midrule"]
        lines += [" & ".join(esc(c) for c in cells) + " \\\\" for cells in body]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    n = max((len(r["seeds"]) for r in rows), default=0)
    lines += ["", f"Mean ± sample std over seeds (up to {n}); test split, checkpoint selected on validation. "
                  f"`vs {reference}`: mean paired difference of test accuracy over the shared seeds, "
                  f"`*` = significant (two-sided paired t-test, p < 0.05); bold = best in the column."]
    return "\n".join(lines) + "\n"


def summarize_folder(folder: str | Path, reference: str = "joint", metric: str = "accuracy",
                     write: bool = True) -> dict[str, Any]:
    """Summarise an experiment or tuning folder; writes ``summary_table.{md,csv,tex}`` and
    ``summary_table.json`` there. Returns ``{"rows": ..., "markdown": ...}``."""
    folder = Path(folder)
    runs = collect_runs(folder)
    reference = resolve_reference(runs, reference)
    rows = table_rows(runs, reference, metric)
    tuned = None
    if (folder / "tuning.json").exists():
        tuned = {k: v["chosen"] for k, v in json.loads((folder / "tuning.json").read_text())["methods"].items()}
    md = render(rows, "md", reference, tuned)
    if write:
        from ..engine.checkpoint import atomic_write_bytes, write_json

        for ext in ("md", "csv", "tex"):
            text = md if ext == "md" else render(rows, ext, reference, tuned)
            atomic_write_bytes(folder / f"summary_table.{ext}", lambda f, t=text: f.write(t.encode()))
        write_json(folder / "summary_table.json", {"reference": reference, "metric": metric, "rows": rows})
    return {"rows": rows, "markdown": md}
