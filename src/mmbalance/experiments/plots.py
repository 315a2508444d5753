"""Plots, each a PNG plus the numbers behind it as CSV.

* :func:`plot_run` — curves of a run over epochs: per-modality validation accuracy, losses,
  every method diagnostic and, when the run recorded them, the encoders' gradient norms.
  ``mmbalance plot RUN`` writes ``RUN/curves.png`` and ``RUN/curves.csv`` (one row per epoch,
  one column per series).
* :func:`plot_comparison` — methods of an experiment (``summary.json``) with error bars.
* :func:`plot_contribution_epochs` — each modality's Shapley contribution over epochs.
* :func:`plot_missing_rate` — test accuracy against the missing-modality rate.
* :func:`plot_imbalance_gap` — each method's probe gap to the unimodal references.

The generic :func:`bar_chart` and :func:`line_chart` write ``NAME.png`` and ``NAME.csv``
(matplotlib's Agg backend: no display needed).
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..registry import ConfigError

#: PNG text chunks: none (matplotlib would otherwise write its web address into every image)
PNG_METADATA = {"Software": None}


def run_curves(run_dir: str | Path) -> tuple[list[int], dict[str, list[float | None]], list[str]]:
    """Epochs, series (``val/accuracy``, ``val/<modality>``, ``train/<key>``, ``diag/<key>`` and,
    when recorded, ``grad_norm/<modality>``: the mean L2 norm of that encoder's gradient over
    the epoch's steps) and the run's modalities, from ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run folder with metrics (no metrics.jsonl)")
    records = []
    for i, ln in enumerate(path.read_text().splitlines(), 1):
        if ln.strip():
            try:
                records.append(json.loads(ln))
            except ValueError:
                raise ConfigError(f"{path} line {i} is not JSON (a damaged file?)") from None
    if not records:
        raise ConfigError(f"{path} holds no epoch yet")
    epochs = [int(r["epoch"]) for r in records]
    mods = list(records[0]["val"].get("per_modality", {}))
    series: dict[str, list[float | None]] = {}

    def put(key: str, i: int, v: Any) -> None:
        series.setdefault(key, [None] * len(records))[i] = float(v) if isinstance(v, (int, float)) else None

    for i, r in enumerate(records):
        put("val/accuracy", i, r["val"].get("accuracy"))
        for m in mods:
            put(f"val/{m}", i, r["val"]["per_modality"].get(m, {}).get("accuracy"))
        for k, v in r.get("train", {}).items():
            put(f"train/{k}", i, v)
        for k, v in r.get("diagnostics", {}).items():
            put(f"diag/{k}", i, v)
        for k, v in (r.get("grad_norm") or {}).items():
            put(f"grad_norm/{k}", i, v)
    return epochs, series, mods


def _group(key: str, mods: list[str]) -> str:
    """Diagnostics of one quantity for several modalities share a panel: ``diag/k_pix`` -> ``k``."""
    name = key.split("/", 1)[1]
    for m in mods:
        name = re.sub(rf"(^|[_/]){re.escape(m)}($|[_/])", r"\1*\2", name)
    return name


def plot_run(run_dir: str | Path, out: str | Path | None = None, max_panels: int = 16) -> tuple[Path, Path]:
    """Write the curves of a run as PNG and CSV; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    epochs, series, mods = run_curves(run_dir)
    out = Path(out) if out is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "curves.csv", out / "curves.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *series])
        for i, e in enumerate(epochs):
            w.writerow([e, *("" if series[k][i] is None else series[k][i] for k in series)])
    panels: dict[str, list[str]] = {"validation accuracy": ["val/accuracy", *[f"val/{m}" for m in mods]]}
    for k in series:
        if k.startswith(("train/", "diag/")):
            panels.setdefault(("loss: " if k.startswith("train/") else "") + _group(k, mods), []).append(k)
        elif k.startswith("grad_norm/"):
            panels.setdefault("encoder gradient norm", []).append(k)
    names = list(panels)[:max_panels]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for k in panels[name]:
            ys = series[k]
            label = "fused" if k == "val/accuracy" else k.split("/", 1)[1]
            ax.plot([e for e, y in zip(epochs, ys) if y is not None], [y for y in ys if y is not None],
                    marker="o" if len(epochs) < 15 else None, ms=3, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(panels[name]) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return png_path, csv_path


# ----------------------------------------------------------------------------- generic charts
Point = tuple[float | None, float | None]  # (value, error bar half-width or None)


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _cell(x: Any) -> Any:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """A CSV file (empty cells for None / NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(header))
        for r in rows:
            w.writerow([_cell(x) for x in r])
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(out: str | Path, name: str, categories: Sequence[str], series: Mapping[str, Sequence[Point]],
              ylabel: str, title: str = "", zero_line: bool = False) -> tuple[Path, Path]:
    """Grouped bars with error bars: one group per category, one bar per series. Writes
    ``out/NAME.png`` and ``out/NAME.csv`` (columns ``category, series, value, error``)."""
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [(c, s, pts[i][0], pts[i][1]) for s, pts in series.items() for i, c in enumerate(categories)]
    csv_path = write_csv(out / f"{name}.csv", ["category", "series", "value", "error"], rows)
    k = max(len(series), 1)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 + 0.35 * len(categories) * k + 1.5), 3.8))
    for j, (s, pts) in enumerate(series.items()):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(categories))]
        errs = [0.0 if p[1] is None else float(p[1]) for p in pts]
        ax.bar(xs, [_num(p[0]) for p in pts], width, yerr=errs if any(errs) else None, capsize=2, label=s)
    ax.set_xticks(list(range(len(categories))))
    ax.set_xticklabels(list(categories), rotation=30 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center")
    vals = [p[0] for pts in series.values() for p in pts if p[0] is not None and math.isfinite(p[0])]
    if vals and min(vals) >= 0 and not zero_line:
        lo = min(vals)
        ax.set_ylim(max(0.0, lo - 0.1 * (max(vals) - lo + 1e-9) - 0.02), None)
    if zero_line:
        ax.axhline(0.0, color="black", lw=0.8)
    return _save(plt, fig, ax, out / f"{name}.png", ylabel, title, len(series) > 1), csv_path


def _save(plt: Any, fig: Any, ax: Any, png: Path, ylabel: str, title: str, legend: bool) -> Path:
    """Label, title, legend; write the PNG (no metadata text: reproducible bytes); close."""
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return png


def line_chart(out: str | Path, name: str, x: Sequence[float], series: Mapping[str, Sequence[Point]], xlabel: str,
               ylabel: str, title: str = "") -> tuple[Path, Path]:
    """Lines (with error bars where given) over ``x``. Writes ``out/NAME.png`` and
    ``out/NAME.csv`` (columns ``x``, then ``<series>`` and ``<series>_error`` per series)."""
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header = [xlabel]
    for s in series:
        header += [s, f"{s}_error"]
    rows = [[xv, *[v for pts in series.values() for v in pts[i]]] for i, xv in enumerate(x)]
    csv_path = write_csv(out / f"{name}.csv", header, rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for s, pts in series.items():
        xs = [xv for xv, p in zip(x, pts) if p[0] is not None]
        ys = [p[0] for p in pts if p[0] is not None]
        errs = [0.0 if p[1] is None else p[1] for p in pts if p[0] is not None]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", ms=3, capsize=2, label=s)
    ax.set_xlabel(xlabel)
    return _save(plt, fig, ax, out / f"{name}.png", ylabel, title, len(series) > 1), csv_path


# ----------------------------------------------------------------------------- specific plots
def _ms(stat: Mapping[str, Any] | None) -> Point:
    if not stat:
        return (None, None)
    return (stat.get("mean"), stat.get("std"))


def plot_comparison(summary: Mapping[str, Any], out: str | Path, name: str = "comparison") -> tuple[Path, Path]:
    """Fused test accuracy and each modality's probe accuracy per run label of an experiment's
    ``summary.json`` (mean, error bar = sample std over seeds)."""
    rows = summary.get("rows") or []
    if not rows:
        raise ConfigError("the summary holds no finished run to plot")
    mods: list[str] = []
    for r in rows:
        mods += [m for m in r["per_modality"] if m not in mods]
    series: dict[str, list[Point]] = {"fused": [_ms(r["accuracy"]) for r in rows]}
    for m in mods:
        series[f"probe {m}"] = [_ms(r["per_modality"].get(m, {}).get("probe_accuracy")) for r in rows]
    return bar_chart(out, name, [r["label"] for r in rows], series, "test accuracy",
                     "methods: mean ± std over seeds")


def plot_contribution_epochs(curves: Mapping[str, Any], out: str | Path,
                             name: str = "contribution_epochs") -> tuple[Path, Path]:
    """Each modality's mean Shapley contribution per epoch (``curves``: ``epochs`` and ``mean``
    ``{modality: [value per epoch]}``, as ``analysis.json``'s ``contribution_epochs``)."""
    epochs = list(curves["epochs"])
    series = {m: [(v, None) for v in vals] for m, vals in curves["mean"].items()}
    return line_chart(out, name, epochs, series, "epoch", "mean Shapley contribution",
                      f"contribution over epochs ({curves.get('split', 'test')} split)")


def plot_missing_rate(points: Mapping[str, Mapping[float, Point]], out: str | Path,
                      name: str = "missing_rate") -> tuple[Path, Path]:
    """Test accuracy (mean ± std over seeds) against the missing-modality rate, one line per
    series (``points``: ``{series: {rate: (mean, std)}}``)."""
    rates = sorted({r for pts in points.values() for r in pts})
    series = {s: [pts.get(r, (None, None)) for r in rates] for s, pts in points.items()}
    return line_chart(out, name, rates, series, "missing_rate", "test accuracy", "accuracy vs missing rate")


def plot_imbalance_gap(gaps: Mapping[str, Mapping[str, Point]], out: str | Path,
                       name: str = "imbalance_gap") -> tuple[Path, Path]:
    """Each run label's probe gap to the unimodal reference per modality (``gaps``:
    ``{label: {modality: (mean, std)}}``); below zero = under-learned."""
    labels = list(gaps)
    mods: list[str] = []
    for g in gaps.values():
        mods += [m for m in g if m not in mods]
    series = {m: [gaps[lab].get(m, (None, None)) for lab in labels] for m in mods}
    return bar_chart(out, name, labels, series, "probe accuracy - unimodal reference",
                     "imbalance gap per method (below 0: under-learned)", zero_line=True)
