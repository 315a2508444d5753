"""Experiments: several methods x several seeds, resumable and never stale, summarised as mean ± std.

>>> from mmbalance.experiments import run_experiment
>>> summary = run_experiment(["joint", "uni-fou=unimodal:modality=fou"], seeds=[0, 1],
...                          output_dir="runs/cmp", overrides={"train.epochs": 10})  # doctest: +SKIP
>>> print(format_summary(summary))  # doctest: +SKIP

See :mod:`mmbalance.experiments.runner` for run specs and what happens to existing run folders.
"""
from .runner import (ExperimentInterrupted, PlannedRun, RunSpec, check_components, format_plan, format_summary,
                     plan_experiment, plot_summary, resolve_config, run_experiment, summarise)

__all__ = ["ExperimentInterrupted", "PlannedRun", "RunSpec", "check_components", "format_plan", "format_summary",
           "plan_experiment", "plot_summary", "resolve_config", "run_experiment", "summarise"]
