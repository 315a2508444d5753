"""Curves of a run over epochs: per-modality validation accuracy and every method diagnostic.

``mmbalance plot RUN`` writes ``RUN/curves.png`` and the numbers behind it, ``RUN/curves.csv``
(one row per epoch, one column per series).
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from ..registry import ConfigError


def run_curves(run_dir: str | Path) -> tuple[list[int], dict[str, list[float | None]], list[str]]:
    """Epochs, series (``val/accuracy``, ``val/<modality>``, ``train/<key>``, ``diag/<key>``) and the
    run's modalities, from ``metrics.jsonl``."""
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
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path, csv_path
