"""Multi-seed experiments: run a list of (method, options) x seeds, then summarise.

A *run spec* is ``label=method:key=value,key=value`` (label and options optional), e.g.
``joint``, ``arl``, ``mla:gradient_modification=false``, ``uni-fou=unimodal:modality=fou``.
Option values are parsed as YAML (``modalities=[pix,fou]`` is one option). Dotted keys set any
config key for that run only (``joint:model.fusion=sum``); plain keys are method options.

Each run is a normal run folder ``OUT/<label>/seed<k>``. Nothing stale is ever reported:

* Every spec is resolved and validated *before* anything runs (unknown method, option, dataset,
  fusion, encoder or config key; option types and ranges; duplicate labels, seeds or runs) —
  without loading any data.
* An existing run folder is compared with the run the spec asks for: its ``config.yaml`` (the
  resolved configuration the trainer wrote) must have the spec's :func:`~mmbalance.config.config_fingerprint`.
  A matching finished run is reused, a matching interrupted run resumes from its last checkpoint,
  and a run folder with other settings is refused (one line naming the folder and the differing
  keys) unless ``restart=True`` (``--restart``), which *moves it aside* to
  ``OUT/_replaced/<time>/<label>/seed<k>`` — never deletes it — and trains the run again.
* ``summary.json`` / ``summary.md`` / ``command.txt`` are removed before anything runs and
  written again only when every run has finished, so they always describe the runs they
  summarise.

The summary — mean ± sample std over seeds of the fused test accuracy / macro-F1 and of each
modality's test accuracy and linear-probe accuracy — is written to ``OUT/summary.json`` and
``OUT/summary.md``.

>>> spec = RunSpec.parse("uni=unimodal:modality=fou,model.fusion=sum")
>>> spec.label, spec.method, spec.overrides()
('uni', 'unimodal', {'method.name': 'unimodal', 'method.modality': 'fou', 'model.fusion': 'sum'})
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import shutil
import socket
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import (FINGERPRINT_IGNORES, RunConfig, config_difference, config_fingerprint, dump_yaml,
                      from_dict, load_config, parse_value)
from ..registry import ConfigError

log = logging.getLogger("mmbalance")

#: folder under the experiment folder that receives run folders replaced by ``restart``
REPLACED_DIR = "_replaced"
#: files the experiment itself writes in its folder (removed before a run, rewritten after)
SUMMARY_FILES = ("summary.json", "summary.md", "summary.png", "command.txt")
#: config keys the experiment sets itself, per run
_OWN_KEYS = {"method.name": "choose methods with --runs", "method": "choose methods with --runs",
             "train.seed": "choose seeds with --seeds", "output_dir": "choose the folder with --output-dir"}


class ExperimentInterrupted(KeyboardInterrupt):
    """An experiment stopped by Ctrl-C or SIGTERM. Rerunning the same experiment continues it:
    finished runs are reused and the interrupted one resumes from its last checkpoint."""

    def __init__(self, output_dir: str | Path, run_dir: str | Path | None = None, signal_name: str = ""):
        self.output_dir = str(output_dir)
        self.run_dir = None if run_dir is None else str(run_dir)
        self.signal_name = signal_name or "SIGINT"
        where = f" during {self.run_dir}" if self.run_dir else ""
        super().__init__(f"experiment in {self.output_dir} interrupted ({self.signal_name}){where}; rerun the same "
                         "experiment to continue (finished runs are reused, unfinished ones resume from their last "
                         "checkpoint)")

    def __str__(self) -> str:
        return str(self.args[0])


# ----------------------------------------------------------------------------- run specs
def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and quotes: ``a=[1,2],b=x`` -> ``['a=[1,2]', 'b=x']``."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


@dataclass
class RunSpec:
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # as the user wrote it (for error messages)

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        text = str(text)
        label, body = text.split("=", 1) if "=" in text.split(":")[0] else ("", text)
        method, _, opts = body.partition(":")
        method = method.strip()
        options: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in _split_top_level(opts))):
            if "=" not in item:
                raise ConfigError(f"run spec '{text}': option '{item}' is not key=value")
            k, v = item.split("=", 1)
            k = k.strip()
            if not k:
                raise ConfigError(f"run spec '{text}': option '{item}' has no key")
            if k in options:
                raise ConfigError(f"run spec '{text}' sets option '{k}' twice")
            options[k] = parse_value(v.strip())
        if not method:
            raise ConfigError(f"run spec '{text}' names no method")
        label = label.strip()
        if not label:
            label = method if not options else method + "-" + "-".join(f"{k}={v}" for k, v in options.items())
        label = label.replace("/", "_").replace(os.sep, "_")
        if label in (".", "..", REPLACED_DIR) or label.startswith("-"):
            raise ConfigError(f"run spec '{text}': label '{label}' cannot name a folder; choose another label")
        return cls(label, method, options, text)

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method.name": self.method}
        for k, v in self.options.items():
            out[k if "." in k else f"method.{k}"] = v
        return out


def _as_specs(specs: Iterable[RunSpec | str]) -> list[RunSpec]:
    return [s if isinstance(s, RunSpec) else RunSpec.parse(s) for s in specs]


# ----------------------------------------------------------------------------- resolution and validation
def resolve_config(cfg: RunConfig) -> RunConfig:
    """The configuration a run folder's ``config.yaml`` holds for ``cfg`` (the method's full
    hyperparameters filled in, by the trainer's own :func:`mmbalance.engine.assembly.resolve_config`),
    as it reads back from that file — built without loading any data."""
    import yaml

    from ..engine.assembly import resolve_config as trainer_resolution

    resolved = trainer_resolution(cfg, _create_method(cfg.method.name, cfg.method.options))
    return from_dict(yaml.safe_load(dump_yaml(resolved)) or {})


def _create_method(name: str, options: dict[str, Any]):
    from ..methods import create_method

    try:
        return create_method(name, **options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a constructor's own check of a value
        raise ConfigError(f"method '{name}': invalid options {options}: {e}") from None


def check_components(cfg: RunConfig) -> None:
    """Check every name and option of ``cfg`` that can be checked without data: the trainer's
    own configuration checks, the method and its options, the dataset (registered name or an
    existing ``.npz`` file) and its options, fusion options, named encoders and their options,
    optimizer and schedule. Raises :class:`~mmbalance.registry.ConfigError`; loads no data and
    builds no model."""
    import torch

    from ..data import DATASETS, list_datasets
    from ..engine.assembly import check_config
    from ..engine.optim import build_optimizer, build_scheduler
    from ..models import ENCODERS, FUSIONS, list_encoders, list_fusions
    from ..registry import check_options

    check_config(cfg)
    _create_method(cfg.method.name, cfg.method.options)

    name = str(cfg.dataset.name)
    list_datasets()
    if name.endswith(".npz") or (os.path.sep in name and os.path.exists(name)):  # as build_dataset decides
        if not Path(name).is_file():
            raise ConfigError(f"dataset file not found: {name}")
        from ..data.features import load_features

        check_options("dataset", name, load_features, dict(cfg.dataset.options), skip=("path",))
    else:
        check_options("dataset", name, DATASETS.get(name), dict(cfg.dataset.options))

    mc = cfg.model
    list_fusions(), list_encoders()
    check_options("fusion", mc.fusion, FUSIONS.get(mc.fusion), dict(mc.fusion_options),
                  skip=("feature_dims", "num_classes"))
    if mc.encoder is not None:
        check_options("encoder", mc.encoder, ENCODERS.get(mc.encoder), dict(mc.encoder_options), skip=("input_shape",))
    for m, per in mc.encoders.items():
        if not isinstance(per, dict):
            raise ConfigError(f"model.encoders.{m} must be a mapping (name: ENCODER, options...), got {per!r}")
        per = dict(per)
        enc = per.pop("name", None) or mc.encoder
        if enc is not None:  # (an encoder chosen by the dataset is known only with the data)
            opts = dict(mc.encoder_options) if enc == mc.encoder else {}
            opts.update(per)
            check_options("encoder", enc, ENCODERS.get(enc), opts, skip=("input_shape",))

    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim)
    build_scheduler(optimizer, cfg.optim, cfg.train.epochs)


# ----------------------------------------------------------------------------- planning
@dataclass
class PlannedRun:
    """One (spec, seed) of an experiment and what will happen to its run folder.

    ``action``: ``reuse`` (finished, same settings), ``resume`` (interrupted, same settings),
    ``new`` (train from scratch), ``replace`` (other settings or not a clean run folder: moved
    aside, then trained — only with ``restart``). ``reason`` says why for ``replace`` and for a
    discarded folder that held no progress."""

    spec: RunSpec
    seed: int
    run_dir: Path
    config: RunConfig  # as requested (before the method's hyperparameters are filled in)
    fingerprint: str
    action: str = "new"
    reason: str = ""
    results: dict[str, Any] | None = None


def _read_results(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _inspect_run_dir(run: PlannedRun, resolved: RunConfig) -> None:
    """Set ``run.action`` / ``run.reason`` from what the run folder holds."""
    from ..engine import load_run_config

    rd = run.run_dir
    if not rd.exists():
        return
    if not rd.is_dir():
        run.action, run.reason = "replace", "is a file, not a run folder"
        return
    names = {p.name for p in rd.iterdir()}
    progress = "results.json" in names or "last.pt" in names
    if "config.yaml" not in names:  # the trainer writes config.yaml first: this is not its folder
        if names:
            run.action, run.reason = "replace", "is not a run folder (no config.yaml)"
        return
    try:
        stored = load_run_config(rd)
    except ConfigError as e:
        run.action, run.reason = "replace", f"has an unreadable config.yaml ({e})"
        return
    except Exception as e:  # noqa: BLE001 - a damaged YAML file
        run.action, run.reason = "replace", f"has an unreadable config.yaml ({type(e).__name__})"
        return
    if config_fingerprint(stored) != run.fingerprint:
        diff = config_difference(stored, resolved)
        if diff:  # (an empty difference: values equal but spelled differently, e.g. 1 and 1.0)
            if not progress:
                run.action, run.reason = "discard", "holds an unfinished run with no checkpoint and other settings"
                return
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            run.action, run.reason = "replace", f"holds a run with other settings ({shown})"
            return
    if "results.json" in names:
        res = _read_results(rd / "results.json")
        problem = _results_problem(res, run, config_fingerprint(stored))
        if problem:
            run.action, run.reason = "replace", f"has a results.json that does not match its config.yaml ({problem})"
            return
        run.action, run.results = "reuse", res
    elif "last.pt" in names:
        run.action = "resume"
    else:
        run.action, run.reason = "discard", "holds an unfinished run with no checkpoint"


def _results_problem(res: dict[str, Any] | None, run: PlannedRun, stored_fingerprint: str) -> str:
    """Why ``results.json`` may not be reported as the results of the run folder's config.yaml
    ('' if it may): unreadable, another method/seed/epoch count, another configuration's
    fingerprint, or settings changed when it was resumed."""
    if res is None:
        return "unreadable"
    want = {"method": run.config.method.name, "seed": run.seed, "epochs": run.config.train.epochs}
    bad = [f"{k} {res.get(k)!r}, config {v!r}" for k, v in want.items() if res.get(k) != v]
    if bad:
        return "; ".join(bad)
    if res.get("fingerprint") not in (None, stored_fingerprint):
        return f"fingerprint {res['fingerprint']}, config {stored_fingerprint}"
    changed = [f"{k} = {v!r}" for h in res.get("history") or [] if isinstance(h, dict)
               for k, v in (h.get("changed") or {}).items()]
    if changed:
        return f"resumed with {', '.join(changed)}"
    return ""


def plan_experiment(specs: Iterable[RunSpec | str], seeds: Iterable[int], output_dir: str | Path,
                    config: str | Path | None = None, overrides: dict[str, Any] | None = None,
                    restart: bool = False) -> list[PlannedRun]:
    """Validate every spec and decide what happens to every run folder, without running or
    changing anything. Raises :class:`ConfigError` (one line) for a bad spec, duplicates, or a run
    folder with other settings (unless ``restart``)."""
    specs = _as_specs(specs)
    seeds = list(seeds)
    if not specs:
        raise ConfigError("an experiment needs at least one run spec (--runs)")
    if not seeds:
        raise ConfigError("an experiment needs at least one seed (--seeds)")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"seeds must be integers, got {s!r}")
    dup_seeds = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup_seeds:
        raise ConfigError(f"seed {dup_seeds[0]} is listed twice in --seeds; list each seed once")
    overrides = dict(overrides or {})
    for key, why in _OWN_KEYS.items():
        if key in overrides:
            raise ConfigError(f"'{key}' cannot be set for a whole experiment: {why}")
    load_config(config, overrides)  # the shared settings alone: their errors name no spec
    seen: dict[str, RunSpec] = {}
    for spec in specs:
        if spec.label in seen:
            raise ConfigError(f"run specs '{seen[spec.label].text or spec.label}' and '{spec.text or spec.label}' "
                              f"have the same label '{spec.label}'; give one a label (LABEL=METHOD:...) or remove it")
        seen[spec.label] = spec
        for key in spec.options:
            if key in ("name", "method.name", "train.seed", "output_dir"):
                why = "the method is the spec's METHOD part" if "name" in key else _OWN_KEYS[key]
                raise ConfigError(f"run spec '{spec.text or spec.label}' sets '{key}': {why}")

    out = Path(output_dir)
    runs: list[tuple[PlannedRun, RunConfig]] = []
    by_fingerprint: dict[tuple[int, str], PlannedRun] = {}
    for spec in specs:
        for seed in seeds:
            ov = dict(overrides)
            ov.update(spec.overrides())
            ov["train.seed"] = seed
            ov.setdefault("train.progress", "off")
            try:
                cfg = load_config(config, ov)
                check_components(cfg)
                resolved = resolve_config(cfg)
            except ConfigError as e:
                raise ConfigError(f"run spec '{spec.text or spec.label}': {e}") from None
            run = PlannedRun(spec, seed, out / spec.label / f"seed{seed}", cfg, config_fingerprint(resolved))
            other = by_fingerprint.get((seed, run.fingerprint))
            if other is not None:
                raise ConfigError(f"run specs '{other.spec.text or other.spec.label}' and '{spec.text or spec.label}' "
                                  "describe the same run (same resolved configuration); remove one or change its options")
            by_fingerprint[(seed, run.fingerprint)] = run
            runs.append((run, resolved))
    for run, resolved in runs:
        _inspect_run_dir(run, resolved)
    planned = [run for run, _ in runs]
    refused = [r for r in planned if r.action == "replace"]
    if refused and not restart:
        more = f" ({len(refused) - 1} more run folder(s) too)" if len(refused) > 1 else ""
        raise ConfigError(f"{refused[0].run_dir} {refused[0].reason}{more}; rerun with --restart to move such run "
                          f"folders aside to {out / REPLACED_DIR} and train them again, or choose another --output-dir")
    return planned


def format_plan(runs: Sequence[PlannedRun]) -> str:
    """One line per run: its folder and what will happen to it."""
    words = {"reuse": "reuse finished run", "resume": "resume from last checkpoint", "new": "train",
             "discard": "train again", "replace": "move aside and train again"}
    lines = []
    for r in runs:
        why = f" ({r.reason})" if r.reason else ""
        lines.append(f"{r.run_dir}: {words[r.action]}{why}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- execution
def _execute(task: tuple[RunConfig, str, bool, int]) -> dict[str, Any] | None:
    """Train (or resume) one run in this process; None if it stopped on train.stop_after_epochs."""
    cfg, run_dir, resume, threads = task
    import torch

    from ..engine import Trainer, TrainingDiverged

    if threads:
        torch.set_num_threads(threads)
    try:
        trainer = Trainer(cfg, run_dir, resume=resume)
        trainer.continue_hint = "rerun the same experiment command to continue"
        return trainer.fit()
    except KeyboardInterrupt:
        if _IN_POOL_WORKER:  # stopped by the parent, files consistent: end quietly (it reports)
            raise SystemExit(130) from None
        raise
    except ConfigError as e:
        raise ConfigError(f"{run_dir}: {e}") from None
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{run_dir}: {e}") from None


_IN_POOL_WORKER = False


def _worker_init() -> None:
    """Pool workers: Ctrl-C reaches the parent, which stops them; SIGTERM (sent by the parent
    then) ends a run cleanly, after the checkpoint being written."""
    import signal

    from ..engine.rundir import interrupt_handler

    global _IN_POOL_WORKER
    _IN_POOL_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, interrupt_handler)


def _resume_config(run: PlannedRun) -> RunConfig:
    """The run folder's own configuration, with the keys that do not change what a run computes
    (progress, device, workers, stop_after_epochs) taken from this invocation."""
    from ..engine import load_run_config

    stored = load_run_config(run.run_dir)
    for key in FINGERPRINT_IGNORES:
        section, _, name = key.rpartition(".")
        src, dst = (getattr(run.config, section, None), getattr(stored, section, None)) if section else (run.config, stored)
        if src is not None and dst is not None and hasattr(src, name) and hasattr(dst, name):
            setattr(dst, name, getattr(src, name))
    return stored


def _move_aside(out: Path, run: PlannedRun, stamp: str) -> Path:
    dest = out / REPLACED_DIR / stamp / run.spec.label / run.run_dir.name
    k = 1
    while dest.exists():
        k += 1
        dest = out / REPLACED_DIR / f"{stamp}-{k}" / run.spec.label / run.run_dir.name
    from ..engine.rundir import filesystem_errors

    with filesystem_errors(run.run_dir, f"move aside to {dest}"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run.run_dir), str(dest))
    return dest


class _Lock:
    """``OUT/.lock``: one experiment at a time in a folder (a stale lock of a dead process on this
    host is taken over)."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.held = False

    def __enter__(self) -> "_Lock":
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except PermissionError:
                raise ConfigError(f"cannot write in {self.path.parent}: permission denied; choose another "
                                  "--output-dir") from None
            except FileExistsError:
                try:
                    pid_text, _, host = self.path.read_text().strip().partition(" ")
                    pid = int(pid_text)
                except (OSError, ValueError):
                    pid, host = -1, ""
                if host == socket.gethostname() and not _alive(pid):
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError(f"{self.path.parent} is in use by another mmbalance experiment (pid {pid_text or '?'}"
                                  f"{' on ' + host if host else ''}); wait for it to finish, or delete {self.path} "
                                  "if no experiment is running there") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.held = True
            return self
        raise ConfigError(f"cannot lock {self.path}; delete it if no experiment is running there")

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_text(path: Path, text: str) -> None:
    from ..engine.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def run_experiment(specs: Sequence[RunSpec | str], seeds: Iterable[int], output_dir: str | Path,
                   config: str | Path | None = None, overrides: dict[str, Any] | None = None,
                   jobs: int = 1, restart: bool = False, command: str | None = None) -> dict[str, Any]:
    """Run every spec for every seed and return the summary (``rows``, see :func:`summarise`).

    ``specs``: :class:`RunSpec` or spec strings (``"arl"``, ``"uni=unimodal:modality=fou"``);
    ``overrides``: dotted config keys for every run (``{"train.epochs": 10}``); ``jobs``: runs in
    parallel (processes, one thread each); ``restart``: move run folders with other settings
    aside and train them again instead of refusing; ``command``: written to ``command.txt`` with
    the summary. Finished runs with the same settings are reused and interrupted ones resume, so
    calling this again after an interruption continues the experiment.

    The summary's ``unfinished`` lists run folders stopped by ``train.stop_after_epochs``; the
    summary files are then not written (call again to continue).

    >>> run_experiment(["joint", "arl"], seeds=[0, 1], output_dir="runs/cmp",
    ...                overrides={"train.epochs": 10})  # doctest: +SKIP
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs takes a positive integer, got {jobs!r}")
    out = Path(output_dir)
    plan = plan_experiment(specs, seeds, out, config, overrides, restart)  # validates; changes nothing
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the experiment folder {out}: {e.strerror or e}") from None
    if not out.is_dir():
        raise ConfigError(f"--output-dir {out} is not a folder")
    from ..engine.rundir import filesystem_errors

    with _Lock(out):
        plan = plan_experiment(specs, seeds, out, config, overrides, restart)  # again, now that no one else runs here
        for name in SUMMARY_FILES:  # from now on the folder's runs may change: no stale summary
            with filesystem_errors(out / name, "remove"):
                (out / name).unlink(missing_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        tasks: list[tuple[PlannedRun, tuple[RunConfig, str, bool, int]]] = []
        for run in plan:
            if run.action == "replace":
                dest = _move_aside(out, run, stamp)
                log.info("%s %s: moved aside to %s", run.run_dir, run.reason, dest)
            elif run.action == "discard":
                log.info("%s %s: starting it again", run.run_dir, run.reason)
                with filesystem_errors(run.run_dir, "remove"):
                    shutil.rmtree(run.run_dir)
            if run.action == "reuse":
                continue
            resume = run.action == "resume"
            cfg = _resume_config(run) if resume else run.config
            tasks.append((run, (cfg, str(run.run_dir), resume, 1 if jobs > 1 else 0)))
        reused = len(plan) - len(tasks)
        if reused:
            log.info("reusing %d finished run(s) with the same settings", reused)
        results = _run_tasks(out, tasks, jobs)
    unfinished = []
    for run, _ in tasks:
        res = results.get(str(run.run_dir))
        if res is None:
            unfinished.append(str(run.run_dir))
            continue
        run.results = res
        _check_written_config(run)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for run in plan:
        by_label.setdefault(run.spec.label, [])
        if run.results is not None:
            by_label[run.spec.label].append(run.results)
    summary = summarise(by_label)
    for row in summary["rows"]:
        row["runs"] = [str(r.run_dir.relative_to(out)) for r in plan
                       if r.spec.label == row["label"] and r.results is not None]
    summary["unfinished"] = unfinished
    if unfinished:
        log.info("%d run(s) stopped before finishing (train.stop_after_epochs); rerun the same experiment "
                 "to continue them", len(unfinished))
        return summary
    from ..engine.checkpoint import write_json

    with filesystem_errors(out, "write the summary in"):
        write_json(out / "summary.json", summary)
        _write_text(out / "summary.md", format_summary(summary) + "\n")
        if command:
            _write_text(out / "command.txt", command.rstrip("\n") + "\n")
    return summary


def _run_tasks(out: Path, tasks: list[tuple[PlannedRun, tuple[RunConfig, str, bool, int]]],
               jobs: int) -> dict[str, dict[str, Any] | None]:
    results: dict[str, dict[str, Any] | None] = {}
    if jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(min(jobs, len(tasks)), initializer=_worker_init)
        try:
            for (run, _), res in zip(tasks, pool.imap(_execute, [t for _, t in tasks])):
                results[str(run.run_dir)] = res
                log.info("finished %s", run.run_dir)
        except BaseException as e:  # a failed or interrupted run: stop the others (they can resume)
            pool.terminate()
            pool.join()
            if isinstance(e, KeyboardInterrupt):
                raise ExperimentInterrupted(out, signal_name=str(e)) from None
            raise
        pool.close()
        pool.join()
        return results
    for i, (run, task) in enumerate(tasks):
        log.info("[%d/%d] %s: %s", i + 1, len(tasks), run.run_dir, "resuming" if task[2] else "training")
        try:
            results[str(run.run_dir)] = _execute(task)
        except KeyboardInterrupt as e:
            raise ExperimentInterrupted(out, run.run_dir, str(e)) from None
    return results


def _check_written_config(run: PlannedRun) -> None:
    """Warn if the trainer resolved the run differently from :func:`resolve_config` (a method
    that fills a hyperparameter from the data): a rerun would then not recognise the run."""
    from ..engine import load_run_config

    try:
        written = load_run_config(run.run_dir)
    except ConfigError:
        return
    if config_fingerprint(written) != run.fingerprint:
        diff = config_difference(resolve_config(run.config), written)
        if diff:
            log.warning("%s: the trainer resolved the configuration differently from the experiment (%s); "
                        "rerunning this experiment will report the run as having other settings",
                        run.run_dir, "; ".join(diff[:3]))


# ----------------------------------------------------------------------------- summaries
def _ms(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std of the finite values; None where undefined (std needs two values)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def summarise(by_label: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± sample std over seeds, per label, of ``results.json`` dicts."""
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


def _pm(s: dict[str, Any]) -> str:
    if not s["n"]:
        return "–"
    return f"{s['mean']:.3f}" if s["std"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


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
        secs = r["train_seconds"]["mean"]
        cells.append("–" if secs is None else f"{secs:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    n = max((len(r["seeds"]) for r in rows), default=0)
    lines.append("")
    lines.append(f"Mean ± sample std over {n} seed(s){' (a single value: no std)' if n == 1 else ''}; test split, checkpoint selected on validation. "
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
    def num(x: float | None) -> float:
        return float("nan") if x is None else float(x)

    series = [("fused", [r["accuracy"] for r in rows])] + [
        (f"probe {m}", [r["per_modality"].get(m, {}).get("probe_accuracy", {"mean": None, "std": None})
                        for r in rows]) for m in mods]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) * len(series) / 2), 4))
    width = 0.8 / len(series)
    for k, (name, vals) in enumerate(series):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [num(v["mean"]) for v in vals], width, yerr=[num(v["std"] or 0.0) for v in vals], label=name,
               capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r["label"] for r in rows], rotation=45, ha="right")
    finite = [v["mean"] for _, vals in series for v in vals if v["mean"] is not None]
    ax.set_ylim(max(0.0, min(finite, default=0.0) - 0.05), 1.0)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
