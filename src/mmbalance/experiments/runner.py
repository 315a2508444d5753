"""Multi-seed experiments: run a list of (method, options) x seeds, then summarise.

A *run spec* is ``label=method:key=value,key=value`` (label and options optional), e.g.
``joint``, ``arl``, ``mla:gradient_modification=false``, ``uni-fou=unimodal:modality=fou``.
Option values are parsed as YAML. Dotted keys set any config key for that run only
(``joint:model.fusion=sum``); plain keys are method options.

Each run writes a normal run folder ``OUT/<label>/seed<k>`` (skipped if it already holds
``results.json``, so an interrupted experiment continues where it stopped). The summary —
mean ± sample std over seeds of the fused test accuracy / macro-F1 and of each modality's
test accuracy and linear-probe accuracy — is written to ``OUT/summary.json`` and
``OUT/summary.md`` and printed.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import load_config, parse_value
from ..registry import ConfigError

log = logging.getLogger("mmbalance")


@dataclass
class RunSpec:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        label, body = text.split("=", 1) if "=" in text.split(":")[0] else ("", text)
        method, _, opts = body.partition(":")
        options: dict[str, Any] = {}
        for item in filter(None, opts.split(",")):
            if "=" not in item:
                raise ConfigError(f"run spec '{text}': option '{item}' is not key=value")
            k, v = item.split("=", 1)
            options[k.strip()] = parse_value(v.strip())
        if not method:
            raise ConfigError(f"run spec '{text}' names no method")
        if not label:
            label = method if not options else method + "-" + "-".join(f"{k}={v}" for k, v in options.items())
        return cls(label.replace("/", "_"), method, options)

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method.name": self.method}
        for k, v in self.options.items():
            out[k if "." in k else f"method.{k}"] = v
        return out


def _run_one(args: tuple[str | None, dict[str, Any], str, int]) -> dict[str, Any]:
    config, overrides, run_dir, threads = args
    import torch

    from ..engine import Trainer

    if threads:
        torch.set_num_threads(threads)
    results_path = Path(run_dir) / "results.json"
    if results_path.exists():
        return json.loads(results_path.read_text())
    cfg = load_config(config, overrides)
    resume = (Path(run_dir) / "last.pt").exists()
    return Trainer(cfg, run_dir, resume=resume).fit()


def run_experiment(specs: Sequence[RunSpec], seeds: Sequence[int], output_dir: str | Path,
                   config: str | None = None, overrides: dict[str, Any] | None = None,
                   jobs: int = 1) -> dict[str, Any]:
    """Run every spec for every seed (resumably) and return the summary."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for spec in specs:
        for seed in seeds:
            ov = dict(overrides or {})
            ov.update(spec.overrides())
            ov["train.seed"] = seed
            ov.setdefault("train.progress", "off")
            tasks.append((config, ov, str(out / spec.label / f"seed{seed}"), 1 if jobs > 1 else 0))
    load_config(config, tasks[0][1]) if tasks else None  # fail fast on a bad config
    if jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_run_one, tasks))
    else:
        results = []
        for i, t in enumerate(tasks):
            log.info("[%d/%d] %s", i + 1, len(tasks), t[2])
            results.append(_run_one(t))
    by_label: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        by_label[spec.label] = [r for r, t in zip(results, tasks)
                                if Path(t[2]).parent.name == spec.label]
    summary = summarise(by_label)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(format_summary(summary) + "\n")
    return summary


def _ms(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def summarise(by_label: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rows = []
    for label, runs in by_label.items():
        if not runs:
            continue
        mods = runs[0]["modalities"]
        row = {"label": label, "method": runs[0]["method"], "fusion": runs[0]["fusion"],
               "dataset": runs[0]["dataset"], "seeds": [r["seed"] for r in runs],
               "accuracy": _ms([r["test"]["accuracy"] for r in runs]),
               "macro_f1": _ms([r["test"]["macro_f1"] for r in runs]),
               "train_seconds": _ms([r["train_seconds"] for r in runs]),
               "per_modality": {m: {"accuracy": _ms([r["test"]["per_modality"][m]["accuracy"] for r in runs]),
                                    "probe_accuracy": _ms([r["test"]["per_modality"][m].get("probe_accuracy")
                                                           for r in runs])}
                                for m in mods}}
        rows.append(row)
    return {"rows": rows}


def _pm(s: dict[str, float]) -> str:
    if not s["n"]:
        return "–"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown table: fused test accuracy / macro-F1 and per-modality probe accuracy."""
    rows = summary["rows"]
    mods: list[str] = []
    for r in rows:
        for m in r["per_modality"]:
            if m not in mods:
                mods.append(m)
    head = ["run", "fusion", "test acc", "test macro-F1"] + [f"probe {m}" for m in mods] + \
           [f"acc {m} (z_m)" for m in mods] + ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], r["fusion"], _pm(r["accuracy"]), _pm(r["macro_f1"])]
        cells += [_pm(r["per_modality"][m]["probe_accuracy"]) if m in r["per_modality"] else "–" for m in mods]
        cells += [_pm(r["per_modality"][m]["accuracy"]) if m in r["per_modality"] else "–" for m in mods]
        cells.append(f"{r['train_seconds']['mean']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    n = max((len(r["seeds"]) for r in rows), default=0)
    lines.append("")
    lines.append(f"Mean ± sample std over {n} seed(s); test split, checkpoint selected on validation. "
                 "probe = linear-probe accuracy of the frozen encoder; acc (z_m) = accuracy of the "
                 "method's unimodal logits.")
    return "\n".join(lines)


def plot_summary(summary: dict[str, Any], path: str | Path) -> None:
    """Bar chart of fused test accuracy and per-modality probe accuracy per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    mods = sorted({m for r in rows for m in r["per_modality"]})
    series = [("fused", [r["accuracy"] for r in rows])] + [
        (f"probe {m}", [r["per_modality"].get(m, {}).get("probe_accuracy", {"mean": float('nan'), "std": 0})
                        for r in rows]) for m in mods]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) * len(series) / 2), 4))
    width = 0.8 / len(series)
    for k, (name, vals) in enumerate(series):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [v["mean"] for v in vals], width, yerr=[v["std"] for v in vals], label=name, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["label"] for r in rows], rotation=45, ha="right")
    lo = min(v["mean"] for _, vals in series for v in vals if not math.isnan(v["mean"]))
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
