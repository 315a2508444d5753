"""Builders shared by the analyze / diagnose / report tests: tiny .npz data, tiny runs, and a
brute-force Shapley reference that re-runs the whole model for every subset of modalities."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from helpers import tiny_data


def write_npz(path: Path, mods: Sequence[str] = ("a", "b"), n: int = 90, signal: Mapping[str, float] | None = None,
              seed: int = 0) -> Path:
    """A tiny features file: three classes, 5-d features per modality (noise + signal * label),
    a fixed 60/20/20 split."""
    rng = np.random.default_rng(seed)
    signal = signal or {}
    y = np.arange(n) % 3
    arrays = {m: (rng.standard_normal((n, 5)) + y[:, None] * signal.get(m, 1.0)).astype(np.float32) for m in mods}
    split = np.array(["train"] * (n * 6 // 10) + ["val"] * (n * 2 // 10) + ["test"] * (n - n * 8 // 10))
    np.savez(path, labels=y, split=split, **arrays)
    return path


QUICK = {"train.progress": "off", "train.eval_batch_size": 16, "train.batch_size": 16}


def train_tiny(run_dir: Path, data=None, epochs: int = 2, **overrides: Any):
    """A finished run on ``tiny_data`` (or ``data``) in ``run_dir``; returns (Run, data)."""
    import mmbalance

    data = data if data is not None else tiny_data()
    cfg = {**QUICK, "train.epochs": epochs, **overrides}
    run = mmbalance.train(cfg, data=data, output_dir=str(run_dir))
    return run, data


@torch.no_grad()
def brute_force_phi(model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Shapley values (N, M) of the correctness game v(S) = |S| * [correct], by running
    the *whole model* (encoders included) once per subset S with the modalities outside S absent
    (per the model's absent policy, via ``present``) and applying the Shapley formula with
    factorial weights; a modality missing in the data stays absent in every subset."""
    model.eval()
    mods = model.modalities
    M = len(mods)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    y = batch["label"]
    B = len(y)
    data_present = {m: batch["present"][m].bool() for m in mods}
    v: dict[frozenset, torch.Tensor] = {}
    for r in range(M + 1):
        for S in itertools.combinations(range(M), r):
            S = frozenset(S)
            if not S:
                v[S] = torch.zeros(B, dtype=torch.float64)
                continue
            present = {m: torch.full((B,), i in S) & data_present[m] for i, m in enumerate(mods)}
            out = model(batch["inputs"], present)
            v[S] = len(S) * (out.logits.argmax(1) == y).double()
    phi = torch.zeros(B, M, dtype=torch.float64)
    for i in range(M):
        for S in v:
            if i in S:
                continue
            w = math.factorial(len(S)) * math.factorial(M - len(S) - 1) / math.factorial(M)
            phi[:, i] += w * (v[S | {i}] - v[S])
    return phi, y


def cli(argv: Sequence[str]) -> int:
    """``mmbalance ARGV`` through :func:`mmbalance.cli.main` when the command is wired there,
    else through the command module's own ``add_arguments`` / ``run`` (same exit codes)."""
    import argparse
    import sys

    from mmbalance.cli import build_parser, main
    from mmbalance.experiments import analyze, diagnose, report
    from mmbalance.registry import ConfigError

    argv = list(argv)
    cmd = next(a for a in argv if not a.startswith("-"))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if cmd in sub.choices:
        return main(argv)
    module = {"diagnose": diagnose, "analyze": analyze, "report": report}[cmd]
    p = argparse.ArgumentParser(prog=f"mmbalance {cmd}")
    module.add_arguments(p)
    args, rest = p.parse_known_args(argv[argv.index(cmd) + 1:])
    args.argv = argv
    try:
        return int(module.run(args, rest) or 0)
    except ConfigError as e:
        print(f"mmbalance: error: {e}", file=sys.stderr)
        return 2
