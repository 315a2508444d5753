"""The fair protocol: the same hyperparameter-search budget for every method, on the validation
split, then several seeds at the selected setting.

Search spaces: each method's hyperparameters that its paper or code varies (``SPACES`` below,
with the source of each range; a method class may declare its own ``search_space`` attribute,
which wins), plus the shared ones that matter for every method, ``joint`` included (``SHARED``:
learning rate and weight decay). ``tune`` draws ``trials`` settings per method from a random
generator seeded by (tuning seed, method name) — the first trial is always the method's
defaults — trains each once (seed ``seeds[0]``), selects the setting with the best validation
metric of the validation-selected checkpoint (``select``: accuracy, macro_f1 or map; ties go to
the earlier trial), then trains the chosen setting over every seed (the first seed's run is the chosen trial's own
run, copied, since its configuration and seed are the same). The test split is never
looked at before the final runs, and then once per run.

Folder layout: ``OUT/trials/<method>-t<k>/seed<s>`` (the search), ``OUT/final/<method>/seed<s>``
(the reported runs), ``OUT/tuning.json`` (every trial's setting and validation score, and the
chosen setting per method), ``OUT/summary_table.*`` (``mmbalance summarize``). Rerunning the
same command reuses finished runs and resumes interrupted ones.
"""
from __future__ import annotations

import json
import math
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..registry import ConfigError
from .runner import RunSpec, run_experiment

__all__ = ["Choice", "LogUniform", "SHARED", "SPACES", "Uniform", "sample_trials", "search_space", "tune"]


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def sample(self, rng: random.Random) -> Any:
        return self.values[rng.randrange(len(self.values))]

    def describe(self) -> str:
        return "{" + ", ".join(map(str, self.values)) + "}"


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return float(f"{math.exp(rng.uniform(math.log(self.low), math.log(self.high))):.3g}")

    def describe(self) -> str:
        return f"log-uniform [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def sample(self, rng: random.Random) -> float:
        return float(f"{rng.uniform(self.low, self.high):.3g}")

    def describe(self) -> str:
        return f"uniform [{self.low:g}, {self.high:g}]"


#: shared by every method (DomainBed's protocol searches learning rate and weight decay for all)
SHARED: dict[str, Any] = {
    "optim.lr": LogUniform(1e-3, 1e-1),          # around the SGD default 0.01 of the papers' feature runs
    "optim.weight_decay": Choice((0.0, 1e-4, 5e-4)),  # the values used across the papers' recipes
}

#: per method: option -> distribution (source of each range in the comment)
SPACES: dict[str, dict[str, Any]] = {
    "arl": {"T": Choice((1.0, 2.0, 4.0, 8.0, 16.0)),       # ARL paper: T sweep (Table 4); 8 CREMA-D, 4 KS/AVE
            "gamma": Choice((1.0, 2.0, 3.0, 4.0, 5.0))},   # ARL paper: gamma sweep; 4 CREMA-D, 3 KS, 5 AVE
    "mla": {"alpha": LogUniform(0.01, 10.0)},             # OWM regulariser; code 0.1 (decayed), docs: collapse vs alpha
    "mie": {"tau": Choice((0.1, 0.2, 0.4, 0.6, 0.8, 1.0)),  # MIE Fig. 4 tau sensitivity; default 0.4
            "rho": Choice((1e-10, 0.01, 0.05))},          # MIE paper value and SAM's usual range (methods spec)
    "ogm_ge": {"alpha": Uniform(0.1, 1.0)},               # OGM-GE paper: 0.1 (VGGSound) .. 0.8 (CREMA-D)
    "qmf": {"lambda_rank": Choice((0.01, 0.1, 1.0))},     # QMF code: 0.1 (RGB-D), 1 (image-text)
    "pmr": {"alpha": Choice((0.5, 1.0, 2.0, 4.0)),        # PMR code: 2.0 CREMA-D, 1.0 others
            "mu": Choice((0.0, 0.5, 0.9))},               # PMR prototype momentum (0 = recompute)
    "agm": {"alpha": Choice((0.5, 1.0, 2.0))},            # AGM code: alpha 1.0 (CREMA-D) .. 2.0
    "gblending": {"estimate_epochs": Choice((2, 5))},     # G-Blending: short estimation runs
    "mslr": {"strategy": Choice(("keep", "smooth", "dynamic"))},  # MSLR paper's three strategies
    "mses": {"patience": Choice((3, 5, 10))},             # MSES: early-stopping patience
    "greedy": {"epsilon": Choice((0.01, 0.05, 0.1))},     # Greedy code: epsilon 0.01 .. 0.1 (imbalance threshold)
    "sample_valuation": {"warmup_epochs": Choice((2, 5, 10))},    # valuation paper: warm-up before resampling
    "modality_valuation": {"warmup_epochs": Choice((2, 5, 10)),
                           "f_m": Choice(("identity", "tanh", "power"))},  # valuation suppl. Table 7 choices
    "dgl": {"alpha": Choice((1.0, 2.0, 3.0, 4.0, 5.0))},  # DGL code: unimodal-loss weight 4
    "mmcosine": {"scale": Choice((5.0, 10.0, 15.0, 20.0))},  # MMCosine paper: scale s sweep
    "lfm": {"alignment": Choice(("contrastive", "js")), "decay": Choice((0.1, 0.3, 1.0))},  # LFM code variants
    "domfn": {"tau": Choice((0.2, 0.5)), "eta": Choice((0.0, 0.5, 1.0))},  # DOMFN code defaults around
    "mmpareto": {"gamma": Choice((1.0, 1.5, 2.0))},          # MMPareto: magnitude rescaling gamma
    "reconboost": {"alpha": Choice((0.1, 0.5, 1.0))},        # ReconBoost code: reconcilement weight 0.5
    "umt": {"lambda_distill": Choice((1.0, 10.0, 100.0))},   # UMT distillation weight (BalanceBenchmark 1)
    "opm": {"q_base": Choice((0.3, 0.5, 0.7))},              # OPM code: base drop probability 0.5
}


def search_space(method: str, shared: bool = True) -> dict[str, Any]:
    """The search space of ``method``: dotted keys for shared options, plain keys for the
    method's own (a class attribute ``search_space`` wins over :data:`SPACES`)."""
    from ..methods import get_method_class

    cls = get_method_class(method)
    own = getattr(cls, "search_space", None)
    space = dict(own if isinstance(own, Mapping) else SPACES.get(method, {}))
    return {**(SHARED if shared else {}), **space}


def sample_trials(method: str, trials: int, seed: int = 0, shared: bool = True) -> list[dict[str, Any]]:
    """``trials`` settings for ``method``: the defaults first, then random draws from its space
    (seeded by ``seed`` and the method's name, so every method's draws are fixed and
    independent of which other methods are tuned).

    >>> sample_trials("joint", 3, seed=0)[0]
    {}
    >>> sample_trials("arl", 3, seed=0) == sample_trials("arl", 3, seed=0)
    True
    """
    if trials < 1:
        raise ConfigError(f"tune needs at least one trial per method, got {trials}")
    space = search_space(method, shared)
    rng = random.Random(zlib.crc32(f"{seed}:{method}".encode()))
    out: list[dict[str, Any]] = [{}]
    seen = {json.dumps({}, sort_keys=True)}
    attempts = 0
    while len(out) < trials and space and attempts < 100 * trials:
        attempts += 1
        setting = {k: dist.sample(rng) for k, dist in space.items()}
        key = json.dumps(setting, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(setting)
    return out


def _spec(label: str, method: str, setting: Mapping[str, Any]) -> RunSpec:
    return RunSpec(label, method, dict(setting))


def _reuse_search_run(trial_dir: Path, final_dir: Path) -> None:
    """The chosen trial already trained the final run of the first seed (same configuration,
    same seed): copy its folder instead of training it again. The runner still checks the copy's
    fingerprint against the final run's configuration and retrains it on any difference."""
    import shutil

    if (trial_dir / "results.json").is_file() and not final_dir.exists():
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(trial_dir, final_dir)


def tune(methods: Sequence[str], trials: int, seeds: Sequence[int], output_dir: str | Path,
         config: str | Path | Sequence[str | Path] | None = None, overrides: Mapping[str, Any] | None = None,
         select: str = "accuracy", tune_seed: int = 0, jobs: int = 1, shared: bool = True,
         command: str | None = None) -> dict[str, Any]:
    """Tune every method with the same budget, then run the chosen settings over ``seeds``.
    Returns the tuning record (also written to ``OUT/tuning.json``)."""
    if select not in ("accuracy", "macro_f1", "map"):
        raise ConfigError(f"tune: select must be accuracy, macro_f1 or map, got {select!r}")
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("tune needs at least one seed")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"tune: a method is named twice in {', '.join(methods)}")
    out = Path(output_dir)
    plans = {m: sample_trials(m, trials, tune_seed, shared) for m in methods}
    specs = [_spec(f"{m}-t{k}", m, s) for m, settings in plans.items() for k, s in enumerate(settings)]
    search = run_experiment(specs, [seeds[0]], out / "trials", config, dict(overrides or {}), jobs=jobs)
    if search.get("unfinished"):
        raise ConfigError(f"{len(search['unfinished'])} tuning run(s) stopped before finishing; rerun the command")
    record: dict[str, Any] = {"select": select, "trials_per_method": trials, "tune_seed": tune_seed,
                              "search_seed": seeds[0], "seeds": seeds, "shared_space": shared,
                              "spaces": {m: {k: d.describe() for k, d in search_space(m, shared).items()}
                                         for m in methods},
                              "methods": {}}
    chosen_specs = []
    for m, settings in plans.items():
        scored = []
        for k, setting in enumerate(settings):
            res = json.loads((out / "trials" / f"{m}-t{k}" / f"seed{seeds[0]}" / "results.json").read_text())
            scored.append({"trial": k, "setting": setting, "val": res["val"][select]})
        best = max(scored, key=lambda r: (r["val"] if r["val"] is not None else -1.0, -r["trial"]))
        record["methods"][m] = {"chosen": best["setting"], "chosen_trial": best["trial"], "trials": scored}
        chosen_specs.append(_spec(m, m, best["setting"]))
        _reuse_search_run(out / "trials" / f"{m}-t{best['trial']}" / f"seed{seeds[0]}", out / "final" / m / f"seed{seeds[0]}")
    final = run_experiment(chosen_specs, seeds, out / "final", config, dict(overrides or {}), jobs=jobs,
                           command=command)
    if final.get("unfinished"):
        raise ConfigError(f"{len(final['unfinished'])} final run(s) stopped before finishing; rerun the command")
    from ..engine.checkpoint import write_json

    write_json(out / "tuning.json", record)
    from .summarize import summarize_folder

    summarize_folder(out)
    return record
