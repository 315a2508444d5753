"""``mmbalance analyze RUN``: how imbalanced a finished run is, and where.

For a run folder (or every finished run of an experiment folder) it computes, on the test
split (``--split``) at the run's selected checkpoint (``best.pt``):

* **contribution** — each modality's exact Shapley contribution to the fused prediction
  (:mod:`mmbalance.evaluation.contribution`: the correctness game, absent modalities per the
  model's ``absent_policy``), overall and per class, and over epochs when the run kept its
  epoch checkpoints (``--train.keep_checkpoints true``: ``epoch<N>.pt``). It is the model's
  fusion head that is valued; a method with its own prediction rule (MLA's entropy fusion,
  QMF) is valued through that head.
* **probe gap** — each encoder's linear-probe accuracy minus the accuracy its modality reaches
  alone in a unimodal reference run (``--reference``, or the ``unimodal`` runs of the same
  experiment folder; the reference of the same seed when there is one, else the mean over the
  references). The reference value is the unimodal run's *probe* accuracy (the same measure;
  its test accuracy when the run has no probe). The run's probe accuracy is the one its
  ``results.json`` reports, or recomputed here when it reports none.
* **contribution ratio** and **gradient-norm ratio** — each modality's contribution, and its
  encoder's gradient norm per epoch (``grad_norm`` of ``metrics.jsonl``, when the engine
  recorded it), divided by the largest modality's.
* **modality gap** — the distance between the centroids of the L2-normalised embeddings of two
  modalities (:func:`mmbalance.evaluation.imbalance.modality_gap`). The embedding of a modality
  is what the fusion head reads of it: the projected head input of a ``shared_head`` fusion (one
  space for all modalities, as in MLA), else the encoder feature (defined only when the widths
  are equal; with concat/sum heads the modalities then share coordinates but not a trained
  common space, so compare such numbers across methods only).
* **singular values** of every linear layer of the fusion head (MIE Table 5), and of each
  modality's block of a concatenation head's weight.
* **error matrices** — for every pair of modalities, the shares of samples both / only one /
  neither classify correctly. Each modality's prediction is its linear probe's (fitted on the
  training split's encoder features; ``--per-modality probe``, the default: what the encoder
  knows) or the run's unimodal logits (``--per-modality logits``: what the head makes of it).

Writes ``analysis.json`` (and ``plots/``) into the run folder, or, for an experiment folder,
into every run folder plus an ``analysis.json`` of mean ± std per run label into the
experiment folder.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..registry import ConfigError

log = logging.getLogger("mmbalance")

EPOCH_CHECKPOINT = re.compile(r"^epoch(\d+)\.pt$")
REPLACED_DIR = "_replaced"


# ----------------------------------------------------------------------------- small helpers
def progress_bar(show: bool | None = None) -> Callable[..., Iterable]:
    """A tqdm wrapper for long passes; shown when ``show`` (default: when stderr is a terminal)."""
    from tqdm import tqdm

    on = sys.stderr.isatty() if show is None else bool(show)

    def wrap(iterable: Iterable, **kwargs: Any) -> Iterable:
        return tqdm(iterable, disable=not on, leave=False, dynamic_ncols=True, **kwargs)

    return wrap


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample std of the finite values (std None with fewer than two), and their count."""
    vals = [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def read_json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def find_runs(folder: str | Path) -> list[Path]:
    """Finished run folders (``config.yaml`` + ``results.json``) at or below ``folder``, sorted;
    folders moved aside by an experiment (``_replaced``) are skipped."""
    folder = Path(folder)
    if is_run(folder):
        return [folder] if (folder / "results.json").is_file() else []
    runs = []
    for cfg in sorted(folder.rglob("config.yaml")):
        rd = cfg.parent
        if REPLACED_DIR in rd.relative_to(folder).parts:
            continue
        if (rd / "results.json").is_file():
            runs.append(rd)
    return runs


def run_data(cfg: Any) -> Any:
    """The run's dataset as its trainer saw it (the missing-modality masks included)."""
    from ..data import build_dataset
    from ..data.missing import apply_missing

    data = build_dataset(cfg.dataset.name, **cfg.dataset.options)
    if cfg.dataset.missing_rate:
        data = apply_missing(data, cfg.dataset.missing_rate, cfg.dataset.missing_seed)
    return data


def _autocast(cfg: Any, device: torch.device):
    from ..engine.assembly import amp_dtype

    dt = amp_dtype(cfg.train.precision, device)
    if dt is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dt)


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


# ----------------------------------------------------------------------------- passes over a split
@torch.no_grad()
def encoder_outputs(model: Any, dataset: Dataset, device: torch.device, batch_size: int,
                    autocast: Callable[[], Any] = contextlib.nullcontext,
                    progress: Callable[..., Iterable] | None = None, desc: str = "features") -> dict[str, Any]:
    """Encoder features and head-space embeddings per modality (eval mode), presence masks and
    labels over ``dataset`` (CPU, float32). The embedding is the fusion head's input for that
    modality (``fusion.head_input``) when the head has one, else the encoder feature."""
    from ..utils import to_device

    was = model.training
    model.eval()
    mods = model.modalities
    head_input = getattr(model.fusion, "head_input", None)
    feats: dict[str, list] = {m: [] for m in mods}
    emb: dict[str, list] = {m: [] for m in mods}
    pres: dict[str, list] = {m: [] for m in mods}
    labels = []
    try:
        loader = _loader(dataset, batch_size)
        for batch in (progress(loader, desc=desc) if progress else loader):
            batch = to_device(batch, device)
            with autocast():
                for m in mods:
                    h = model.encode(m, batch["inputs"][m])
                    feats[m].append(h.float().cpu())
                    emb[m].append((head_input(m, h) if head_input is not None else h).float().cpu())
                    p = batch.get("present", {}).get(m)
                    pres[m].append(torch.ones(h.shape[0], dtype=torch.bool) if p is None else p.bool().cpu())
            labels.append(batch["label"].cpu())
    finally:
        model.train(was)
    return {"features": {m: torch.cat(v) for m, v in feats.items()},
            "embeddings": {m: torch.cat(v) for m, v in emb.items()},
            "present": {m: torch.cat(v) for m, v in pres.items()}, "labels": torch.cat(labels)}


def probe_predictions(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels predicted by a linear probe (:func:`mmbalance.evaluation.probe.fit_linear_probe`)
    fitted on (train_x, train_y)."""
    from ..evaluation.probe import fit_linear_probe

    w, b, mean, std = fit_linear_probe(train_x, train_y, num_classes)
    return (((eval_x.double() - mean) / std) @ w + b).argmax(1)


def epoch_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the run's kept epoch checkpoints ``epoch<N>.pt``, by epoch."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        mt = EPOCH_CHECKPOINT.match(p.name)
        if mt:
            found.append((int(mt.group(1)), p))
    return sorted(found)


# ----------------------------------------------------------------------------- references
def unimodal_references(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every finished ``unimodal`` run at or below ``paths``: its modality, seed, dataset and test
    reference value (probe accuracy, else accuracy)."""
    refs, seen = [], set()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ConfigError(f"--reference {p} does not exist")
        for rd in find_runs(p):
            res = read_json(rd / "results.json")
            if not res or res.get("method") != "unimodal" or len(res.get("modalities") or []) != 1:
                continue
            key = str(rd.resolve())
            if key in seen:
                continue
            seen.add(key)
            m = res["modalities"][0]
            pm = (res.get("test") or {}).get("per_modality", {}).get(m, {})
            value, measure = pm.get("probe_accuracy"), "probe_accuracy"
            if value is None:
                value, measure = (res.get("test") or {}).get("accuracy"), "accuracy"
            refs.append({"path": str(rd), "modality": m, "seed": res.get("seed"), "dataset": res.get("dataset"),
                         "value": value, "measure": measure,
                         "accuracy": (res.get("test") or {}).get("accuracy")})
    return refs


def pick_reference(refs: Sequence[Mapping[str, Any]], modality: str, dataset: str | None,
                   seed: int | None) -> dict[str, Any] | None:
    """The reference for ``modality``: the unimodal run of the same dataset and seed, else the
    mean over that dataset's unimodal runs of the modality (None if there is none)."""
    cands = [r for r in refs if r["modality"] == modality and (dataset is None or r["dataset"] == dataset)
             and r["value"] is not None]
    if not cands:
        return None
    same = [r for r in cands if r["seed"] == seed]
    use = same[:1] if same else cands
    return {"value": statistics.fmean(float(r["value"]) for r in use), "measure": use[0]["measure"],
            "accuracy": mean_std(r["accuracy"] for r in use)["mean"],
            "runs": [r["path"] for r in use], "same_seed": bool(same)}


# ----------------------------------------------------------------------------- one run
def grad_norm_analysis(run_dir: str | Path) -> dict[str, Any] | None:
    """Per-epoch encoder gradient norms (``grad_norm`` in ``metrics.jsonl``), their ratio to the
    largest modality's per epoch, and the mean ratio over epochs; None when not recorded."""
    from ..evaluation.imbalance import imbalance_ratio, ratios_to_max
    from .plots import run_curves

    epochs, series, mods = run_curves(run_dir)
    norms = {k.split("/", 1)[1]: v for k, v in series.items() if k.startswith("grad_norm/")}
    if not norms:
        return None
    ratio: dict[str, list[float | None]] = {m: [] for m in norms}
    for i in range(len(epochs)):
        r = ratios_to_max({m: v[i] for m, v in norms.items()})
        for m in norms:
            ratio[m].append(r[m])
    mean_ratio = {m: mean_std(v)["mean"] for m, v in ratio.items()}
    mean_norm = {m: mean_std(v)["mean"] for m, v in norms.items()}
    return {"epochs": epochs, "norm": norms, "ratio": ratio, "mean_ratio": mean_ratio, "mean_norm": mean_norm,
            "imbalance": imbalance_ratio(mean_norm)}


def analyze_run(run_dir: str | Path, references: Sequence[Mapping[str, Any]] | None = None, *, split: str = "test",
                device: str = "cpu", per_modality: str = "probe", absent_policy: str | None = None,
                epochs: bool = True, progress: bool | None = None, write: bool = True, plots: bool = True,
                data: Any = None) -> dict[str, Any]:
    """Analyse one finished run (see the module docstring); returns the ``analysis.json`` dict
    and, with ``write``, writes it (and ``plots/``) into the run folder. ``references``: from
    :func:`unimodal_references`; ``data``: the run's :class:`DataSplits` if already built."""
    from ..api import load_run
    from ..engine.checkpoint import write_json
    from ..engine.rundir import RunFolder, load_model_state
    from ..evaluation.contribution import modality_contributions
    from ..evaluation.imbalance import (contribution_summary, error_matrices, head_singular_values, modality_gaps,
                                        probe_gap)

    if split not in ("val", "test"):
        raise ConfigError(f"--split takes val or test, got {split!r}")
    if per_modality not in ("probe", "logits"):
        raise ConfigError(f"--per-modality takes probe or logits, got {per_modality!r}")
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    results = read_json(run_dir / "results.json")
    if results is None:
        raise ConfigError(f"{run_dir} has no readable results.json: the run is not finished (finish it with "
                          f"mmbalance train --resume {run_dir})")
    bar = progress_bar(progress)
    run = load_run(run_dir, device=device)
    cfg, model, dev = run.config, run.model, run.device
    mods = run.modalities
    if data is None:
        data = run_data(cfg)
    ds = {"val": data.val, "test": data.test}[split]
    C = run.spec.num_classes
    bs = cfg.train.eval_batch_size
    ac = _autocast(cfg, dev)
    notes: list[str] = []

    # fused and unimodal predictions by the method's own rule
    logits, uni, labels = [], {m: [] for m in mods}, []
    for batch in bar(_loader(ds, bs), desc="predict"):
        pred = run.predict(batch["inputs"], batch.get("present"))
        logits.append(pred.logits)
        for m in mods:
            uni[m].append(pred.unimodal_logits[m])
        labels.append(batch["label"])
    y = torch.cat(labels)
    fused_acc = float((torch.cat(logits).argmax(1) == y).double().mean()) if len(y) else None
    uni_correct = {m: torch.cat(v).argmax(1) == y for m, v in uni.items()}

    # encoders: probes, embeddings
    ev = encoder_outputs(model, ds, dev, bs, ac, bar, desc=f"features ({split})")
    need_probe = per_modality == "probe" or any(
        (results.get(split) or {}).get("per_modality", {}).get(m, {}).get("probe_accuracy") is None for m in mods)
    probe_correct: dict[str, torch.Tensor] = {}
    if need_probe:
        tr = encoder_outputs(model, data.train_eval, dev, bs, ac, bar, desc="features (train)")
        for m in bar(mods, desc="probes"):
            keep = tr["present"][m]
            pred = probe_predictions(tr["features"][m][keep], tr["labels"][keep], ev["features"][m], C)
            probe_correct[m] = pred == ev["labels"]
    per_mod: dict[str, dict[str, Any]] = {}
    for m in mods:
        p = ev["present"][m]
        reported = (results.get(split) or {}).get("per_modality", {}).get(m, {}).get("probe_accuracy")
        computed = float(probe_correct[m][p].double().mean()) if m in probe_correct and bool(p.any()) else None
        per_mod[m] = {"accuracy": float(uni_correct[m].double().mean()) if len(y) else None,
                      "probe_accuracy": reported if reported is not None else computed,
                      "probe_accuracy_computed": computed, "present": int(p.sum())}

    # contribution (at the selected checkpoint, then over the kept epoch checkpoints)
    def contributions() -> torch.Tensor:
        return modality_contributions(model, _loader(ds, bs), absent_policy=absent_policy, device=dev,
                                      autocast=ac, progress=bar)

    phi = contributions()
    contribution = contribution_summary(phi, y, mods, C)
    contribution["absent_policy"] = absent_policy or model.absent_policy
    contribution_epochs = None
    kept = epoch_checkpoints(run_dir) if epochs else []
    if kept:
        folder = RunFolder(run_dir, writes=False)
        best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        curves: dict[str, Any] = {"epochs": [], "mean": {m: [] for m in mods}, "share": {m: [] for m in mods},
                                  "split": split}
        try:
            for ep, path in bar(kept, desc="contribution over epochs"):
                state = folder.load(path.name, dev)
                load_model_state(model, state["model"], path)
                s = contribution_summary(contributions(), y, mods, C)
                curves["epochs"].append(ep)
                for m in mods:
                    curves["mean"][m].append(s["mean"][m])
                    curves["share"][m].append(s["share"][m])
        finally:
            model.load_state_dict(best)
        contribution_epochs = curves
    elif epochs:
        notes.append("no epoch checkpoints (train with --train.keep_checkpoints true to get the contribution "
                     "over epochs)")

    # probe gap to the unimodal references
    gap = None
    if results.get("method") == "unimodal":
        notes.append("a unimodal run is itself a reference: no probe gap")
    elif references:
        ref = {m: pick_reference(references, m, results.get("dataset"), results.get("seed")) for m in mods}
        if any(r is not None for r in ref.values()):
            gap = {"reference": ref,
                   "gap": probe_gap({m: per_mod[m]["probe_accuracy"] for m in mods},
                                    {m: (r["value"] if r else None) for m, r in ref.items()})}
        missing = [m for m, r in ref.items() if r is None]
        if missing:
            notes.append(f"no unimodal reference run for {', '.join(missing)}")
    else:
        notes.append("no unimodal reference run (give --reference DIR, or run unimodal:modality=M in the "
                     "same experiment) so no probe gap")

    try:
        grad = grad_norm_analysis(run_dir)
    except ConfigError as e:  # metrics.jsonl missing or damaged: the rest of the analysis stands
        grad = None
        notes.append(f"no gradient norms: {e}")
    if grad is None and not any(n.startswith("no gradient norms") for n in notes):
        notes.append("metrics.jsonl records no grad_norm (an older run): no gradient-norm ratio")

    emb = {m: ev["embeddings"][m][ev["present"][m]] for m in mods}
    widths = {m: int(e.shape[1]) for m, e in emb.items()}
    space = "shared head input" if hasattr(model.fusion, "head_input") else "encoder features"
    gaps = modality_gaps(emb) if len(mods) > 1 else {}
    if len(set(widths.values())) > 1:
        notes.append(f"modality gap undefined: the modalities' embeddings have different widths {widths}")

    fusion = model.fusion
    blocks = getattr(fusion, "blocks", None) if hasattr(fusion, "fc") else None
    spectra = head_singular_values(fusion, blocks, "fc" if blocks else None)

    correct = probe_correct if per_modality == "probe" else uni_correct
    errors = {"source": per_modality, "pairs": error_matrices(correct, ev["present"])}

    out = {"kind": "run", "run": str(run_dir), "method": results.get("method"), "dataset": results.get("dataset"),
           "fusion": results.get("fusion"), "seed": results.get("seed"), "modalities": mods, "split": split,
           "n": int(len(y)), "num_classes": C, "missing_rate": cfg.dataset.missing_rate,
           "accuracy": fused_acc, "per_modality": per_mod, "contribution": contribution,
           "contribution_epochs": contribution_epochs, "probe_gap": gap, "grad_norm": grad,
           "modality_gap": {"space": space, "widths": widths, "pairs": gaps}, "singular_values": spectra,
           "error_matrices": errors, "notes": notes, "plots": []}
    if write:
        if plots:
            out["plots"] = run_plots(run_dir, out)
        write_json(run_dir / "analysis.json", out)
    return out


def run_plots(run_dir: Path, analysis: Mapping[str, Any]) -> list[str]:
    """The run's plots into ``run_dir/plots`` (curves over epochs; contribution over epochs when
    kept); returns their PNG paths relative to ``run_dir``."""
    from .plots import plot_contribution_epochs, plot_run

    out = run_dir / "plots"
    made = []
    try:
        png, _ = plot_run(run_dir, out)
        made.append(png)
    except ConfigError as e:  # no metrics (a run written by hand): the rest still stands
        log.info("no curves for %s: %s", run_dir, e)
    if analysis.get("contribution_epochs"):
        made.append(plot_contribution_epochs(analysis["contribution_epochs"], out)[0])
    return [str(p.relative_to(run_dir)) for p in made]


# ----------------------------------------------------------------------------- an experiment
def run_label(exp_dir: Path, run_dir: Path) -> str:
    """``LABEL`` of ``exp_dir/LABEL/seed<k>`` (``sub/LABEL`` for experiments nested deeper, e.g. a
    diagnosis folder's ``reference/joint``)."""
    rel = run_dir.relative_to(exp_dir)
    return rel.parent.as_posix() if len(rel.parts) > 1 else run_dir.name


def _rate_value(rate: Any) -> float:
    if isinstance(rate, Mapping):
        vals = [float(v) for v in rate.values()]
        return statistics.fmean(vals) if vals else 0.0
    return float(rate or 0.0)


def analyze_experiment(exp_dir: str | Path, reference: Sequence[str | Path] = (), **kwargs: Any) -> dict[str, Any]:
    """Analyse every finished run of an experiment folder (:func:`analyze_run`, writing each
    run's ``analysis.json``), then write ``exp_dir/analysis.json``: per run label, mean ± std
    over its runs of the fused accuracy, probe accuracy, probe gap, contribution share and
    gradient-norm ratio per modality; plus ``plots/`` (comparison, imbalance gap, accuracy vs
    missing rate when the runs differ in ``dataset.missing_rate``)."""
    from ..engine.checkpoint import write_json

    exp_dir = Path(exp_dir)
    runs = find_runs(exp_dir)
    if not runs:
        raise ConfigError(f"{exp_dir} holds no finished run (no run folder with results.json below it)")
    write = kwargs.pop("write", True)
    plots = kwargs.pop("plots", True)
    refs = unimodal_references([exp_dir, *reference])
    cache: dict[str, Any] = {}
    analyses = []
    import json

    from ..config import to_dict
    from ..engine import load_run_config

    for rd in runs:
        cfg = load_run_config(rd)
        key = json.dumps(to_dict(cfg)["dataset"], sort_keys=True, default=str)  # runs on the same data share it
        if key not in cache:
            cache[key] = run_data(cfg)
        log.info("analysing %s", rd)
        a = analyze_run(rd, refs, data=cache[key], write=write, plots=plots, **kwargs)
        a["label"] = run_label(exp_dir, rd)
        a["path"] = str(rd.relative_to(exp_dir))
        analyses.append(a)
    out = summarise_analyses(analyses)
    out.update({"kind": "experiment", "experiment": str(exp_dir), "split": analyses[0]["split"],
                "references": [r["path"] for r in refs]})
    if write:
        out["plots"] = experiment_plots(exp_dir, out) if plots else []
        write_json(exp_dir / "analysis.json", out)
    return out


def summarise_analyses(analyses: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per run label (in first-seen order): mean ± std over its runs of the measures; plus one
    compact record per run and the accuracy-vs-missing-rate points."""
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for a in analyses:
        by_label.setdefault(a["label"], []).append(a)
    rows = []
    for label, items in by_label.items():
        mods: list[str] = []
        for a in items:
            mods += [m for m in a["modalities"] if m not in mods]

        def per(f: Callable[[Mapping[str, Any], str], Any]) -> dict[str, Any]:
            return {m: mean_std(f(a, m) for a in items if m in a["modalities"]) for m in mods}

        rows.append({
            "label": label, "method": items[0]["method"], "fusion": items[0]["fusion"], "n_runs": len(items),
            "seeds": [a["seed"] for a in items], "missing_rate": items[0]["missing_rate"],
            "accuracy": mean_std(a["accuracy"] for a in items),
            "probe_accuracy": per(lambda a, m: a["per_modality"][m]["probe_accuracy"]),
            "probe_gap": per(lambda a, m: (a["probe_gap"] or {}).get("gap", {}).get(m)),
            "contribution_share": per(lambda a, m: a["contribution"]["share"][m]),
            "contribution": per(lambda a, m: a["contribution"]["mean"][m]),
            "grad_norm_ratio": per(lambda a, m: (a["grad_norm"] or {}).get("mean_ratio", {}).get(m)),
            "modality_gap": {k: mean_std(a["modality_gap"]["pairs"].get(k) for a in items)
                             for k in items[0]["modality_gap"]["pairs"]},
        })
    # accuracy vs missing rate: one series per configuration apart from the rate (and seed)
    series: dict[str, dict[float, list[float]]] = {}
    for a in analyses:
        name = a["method"] if a.get("fusion") is None else f"{a['method']} ({a['fusion']})"
        series.setdefault(name, {}).setdefault(_rate_value(a["missing_rate"]), []).append(a["accuracy"])
    missing = {s: {r: mean_std(v) for r, v in pts.items()} for s, pts in series.items()}
    runs = [{"label": a["label"], "path": a.get("path"), "seed": a["seed"], "accuracy": a["accuracy"],
             "notes": a["notes"]} for a in analyses]
    return {"rows": rows, "runs": runs, "missing_rate": missing}


def experiment_plots(exp_dir: Path, summary: Mapping[str, Any]) -> list[str]:
    """An experiment's plots into ``exp_dir/plots``; returns PNG paths relative to ``exp_dir``."""
    from .plots import plot_comparison, plot_imbalance_gap, plot_missing_rate

    out = exp_dir / "plots"
    made = []
    s = read_json(exp_dir / "summary.json")
    if s and s.get("rows"):
        made.append(plot_comparison(s, out)[0])
    gaps = {r["label"]: {m: (v["mean"], v["std"]) for m, v in r["probe_gap"].items() if v["n"]}
            for r in summary["rows"]}
    gaps = {k: v for k, v in gaps.items() if v}
    if gaps:
        made.append(plot_imbalance_gap(gaps, out)[0])
    rates = {r for pts in summary["missing_rate"].values() for r in pts}
    if len(rates) > 1:
        pts = {s: {r: (v["mean"], v["std"]) for r, v in p.items()} for s, p in summary["missing_rate"].items()}
        made.append(plot_missing_rate(pts, out)[0])
    return [str(p.relative_to(exp_dir)) for p in made]


def analyze(path: str | Path, reference: Sequence[str | Path] = (), **kwargs: Any) -> dict[str, Any]:
    """:func:`analyze_run` for a run folder, :func:`analyze_experiment` for any other folder."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder (give a run folder or an experiment folder)")
    if is_run(path):
        return analyze_run(path, unimodal_references(reference), **kwargs)
    return analyze_experiment(path, reference, **kwargs)


# ----------------------------------------------------------------------------- text output
def _f(v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table; the first row is the header."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def format_run_analysis(a: Mapping[str, Any]) -> str:
    mods = a["modalities"]
    gap = (a.get("probe_gap") or {}).get("gap", {})
    grad = (a.get("grad_norm") or {}).get("mean_ratio", {})
    rows = [("modality", "acc (z_m)", "probe", "probe gap", "contribution", "share", "grad-norm ratio")]
    for m in mods:
        pm = a["per_modality"][m]
        rows.append((m, _f(pm["accuracy"]), _f(pm["probe_accuracy"]), _f(gap.get(m), True),
                     _f(a["contribution"]["mean"][m]), _f(a["contribution"]["share"][m]), _f(grad.get(m))))
    lines = [f"{a['method']} + {a['fusion']} on {a['dataset']} ({', '.join(mods)}), seed {a['seed']}: "
             f"{a['split']} accuracy {_f(a['accuracy'])}", table(rows)]
    for k, e in a["error_matrices"]["pairs"].items():
        x, y = k.split("|")
        lines.append(f"{x} vs {y} ({a['error_matrices']['source']}): both {_f(e['both'])}, only {x} "
                     f"{_f(e['only'][x])}, only {y} {_f(e['only'][y])}, neither {_f(e['neither'])}")
    for k, g in a["modality_gap"]["pairs"].items():
        lines.append(f"modality gap {k.replace('|', '-')} ({a['modality_gap']['space']}): {_f(g)}")
    lines += [f"note: {n}" for n in a["notes"]]
    return "\n".join(lines)


def format_experiment_analysis(a: Mapping[str, Any]) -> str:
    def pm(s: Mapping[str, Any], signed: bool = False) -> str:
        if not s or s.get("mean") is None:
            return "-"
        v = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
        return v if s.get("std") is None else f"{v} ± {s['std']:.3f}"

    mods: list[str] = []
    for r in a["rows"]:
        mods += [m for m in r["probe_accuracy"] if m not in mods]
    head = ["run", "n", "accuracy"] + [f"gap {m}" for m in mods] + [f"share {m}" for m in mods]
    rows = [tuple(head)]
    for r in a["rows"]:
        rows.append((r["label"], str(r["n_runs"]), pm(r["accuracy"]),
                     *[pm(r["probe_gap"].get(m, {}), True) for m in mods],
                     *[pm(r["contribution_share"].get(m, {})) for m in mods]))
    return table(rows)


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Analyse a finished run (or every run of an experiment folder): Shapley contribution of "
                     "each modality (overall, per class, over epochs), probe gap to unimodal references, "
                     "contribution and gradient-norm ratios, modality gap, head singular values, error "
                     "matrices. Writes analysis.json (and plots/) into the folder.")
    p.add_argument("path", metavar="RUN", help="run folder or experiment folder")
    p.add_argument("--reference", nargs="+", default=[], metavar="DIR",
                   help="unimodal reference run(s), or folders holding them (default: those in the experiment)")
    p.add_argument("--split", default="test", choices=["test", "val"], help="split to analyse (default test)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    p.add_argument("--per-modality", dest="per_modality", default="probe", choices=["probe", "logits"],
                   help="per-modality predictions of the error matrices: linear probe (default) or unimodal logits")
    p.add_argument("--absent-policy", dest="absent_policy", choices=["input", "feature"],
                   help="absent modalities in the Shapley games (default: the model's)")
    p.add_argument("--no-epochs", dest="epochs", action="store_false",
                   help="skip the contribution over kept epoch checkpoints")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write no plots")


def run(args: argparse.Namespace, rest: Sequence[str] = ()) -> int:
    if rest:
        raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
    a = analyze(args.path, args.reference, split=args.split, device=args.device, per_modality=args.per_modality,
                absent_policy=args.absent_policy, epochs=args.epochs, plots=args.plots)
    print(format_run_analysis(a) if a["kind"] == "run" else format_experiment_analysis(a))
    print(f"wrote {Path(args.path) / 'analysis.json'}")
    return 0
