"""Experiment files: a whole comparison in one YAML file (``mmbalance experiment FILE.yaml``).

.. code-block:: yaml

    name: methods-uci                  # default: the file's name
    output_dir: runs/methods-uci       # default: runs/<name>
    seeds: [0, 1, 2]
    config: base.yaml                  # optional config file(s) for every run (relative to this file)
    settings:                          # dotted config keys for every run
      train.epochs: 40
    runs:                              # explicit runs: spec strings or mappings
      - joint
      - uni-fou=unimodal:modality=fou
      - {label: arl-t4, method: arl, options: {T: 4}}
    grid:                              # and/or a grid: methods x fusions x datasets x options
      methods: [joint, arl, {method: mla, options: {alpha: 1.0}}]
      fusions: [concat, sum]
      datasets: [uci_mfeat]
      options: {optim.lr: [0.01, 0.05]}
    tune:                              # optional: the fair protocol (same budget per method)
      trials: 8
      select: accuracy
      seed: 0

Labels are built from what varies (``arl-sum-lr0.05``), so every run gets its own folder
``OUT/<label>/seed<k>``; the whole file is validated (every run resolved, no duplicates) before
the first run starts. With ``tune``, the grid's methods are tuned instead (see
:mod:`.tuning`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..registry import ConfigError
from .runner import RunSpec

KEYS = {"name", "output_dir", "seeds", "config", "settings", "runs", "grid", "tune", "jobs", "description"}
GRID_KEYS = {"methods", "fusions", "datasets", "options"}
TUNE_KEYS = {"trials", "select", "seed", "shared"}


@dataclass
class ExperimentFile:
    path: Path
    name: str
    output_dir: Path
    seeds: list[int]
    config: list[Path]
    settings: dict[str, Any]
    specs: list[RunSpec]
    tune: dict[str, Any] | None = None
    jobs: int = 1
    methods: list[str] = field(default_factory=list)


def _short(key: str, value: Any) -> str:
    k = key.split(".")[-1]
    k = {"lr": "lr", "weight_decay": "wd", "fusion": "", "name": ""}.get(k, k)
    v = value if not isinstance(value, (list, tuple)) else "+".join(map(str, value))
    return f"{k}{v}" if k else str(v)


def _method_entry(entry: Any, where: str) -> tuple[str, str | None, dict[str, Any]]:
    """(method, label or None, options) from a grid/runs entry."""
    if isinstance(entry, str):
        spec = RunSpec.parse(entry)
        explicit = "=" in entry.split(":")[0]
        return spec.method, spec.label if explicit else None, dict(spec.options)
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"method", "label", "options"}
        if unknown or "method" not in entry:
            raise ConfigError(f"{where}: a run is a spec string or a mapping with method, label, options; got {dict(entry)}")
        opts = entry.get("options") or {}
        if not isinstance(opts, Mapping):
            raise ConfigError(f"{where}: options of {entry['method']} must be a mapping")
        return str(entry["method"]), entry.get("label"), dict(opts)
    raise ConfigError(f"{where}: a run is a spec string or a mapping, got {entry!r}")


def load_experiment_file(path: str | Path) -> ExperimentFile:
    """Read and expand an experiment file; one-line errors naming the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {p} must hold a mapping")
    unknown = set(data) - KEYS
    if unknown:
        raise ConfigError(f"experiment file {p}: unknown key {', '.join(sorted(unknown))}; valid: {', '.join(sorted(KEYS))}")
    name = str(data.get("name") or p.stem)
    seeds = data.get("seeds", [0, 1, 2])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"experiment file {p}: seeds must be a list of integers, got {seeds!r}")
    configs = data.get("config") or []
    configs = [configs] if isinstance(configs, str) else list(configs)
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"experiment file {p}: settings must be a mapping of dotted config keys")
    specs: list[RunSpec] = []
    methods: list[str] = []
    for i, entry in enumerate(data.get("runs") or []):
        if isinstance(entry, str):
            spec = RunSpec.parse(entry)
        else:
            method, label, opts = _method_entry(entry, f"{p} runs[{i}]")
            auto = method + "".join(f"-{_short(k, v)}" for k, v in opts.items())
            spec = RunSpec(str(label or auto).replace("/", "_"), method, opts)
        specs.append(spec)
        methods.append(spec.method)
    grid = data.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or set(grid) - GRID_KEYS:
            raise ConfigError(f"experiment file {p}: grid takes {', '.join(sorted(GRID_KEYS))}")
        entries = [_method_entry(e, f"{p} grid.methods") for e in grid.get("methods") or ["joint"]]
        fusions = grid.get("fusions") or [None]
        datasets = grid.get("datasets") or [None]
        options = grid.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"experiment file {p}: grid.options maps a key to a list of values")
        keys = list(options)
        values = [v if isinstance(v, list) else [v] for v in options.values()]
        for (method, label, opts), fusion, dataset, combo in itertools.product(entries, fusions, datasets,
                                                                                itertools.product(*values)):
            o = dict(opts)
            parts = [label or method + "".join(f"-{_short(k, v)}" for k, v in opts.items())]
            if fusion is not None:
                o["model.fusion"] = fusion
                if len(fusions) > 1:
                    parts.append(str(fusion))
            if dataset is not None:
                o["dataset.name"] = dataset
                if len(datasets) > 1:
                    parts.append(Path(str(dataset)).stem)
            for k, v, vals in zip(keys, combo, values):
                o[k] = v
                if len(vals) > 1:
                    parts.append(_short(k, v))
            specs.append(RunSpec("-".join(parts).replace("/", "_"), method, o))
            methods.append(method)
    if not specs:
        raise ConfigError(f"experiment file {p} declares no run (give runs: or grid:)")
    tune = data.get("tune")
    if tune is not None:
        if not isinstance(tune, dict) or set(tune) - TUNE_KEYS:
            raise ConfigError(f"experiment file {p}: tune takes {', '.join(sorted(TUNE_KEYS))}")
        if any(s.options for s in specs):
            raise ConfigError(f"experiment file {p}: with tune, list plain methods (the search sets their options)")
    out = Path(data.get("output_dir") or Path("runs") / name)
    return ExperimentFile(p, name, out, list(seeds), [p.parent / c for c in configs], dict(settings), specs,
                          tune, int(data.get("jobs", 1)), list(dict.fromkeys(methods)))
