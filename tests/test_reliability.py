"""Nothing wrong is ever written silently: a table of bad inputs across data files, config and
flags, output folders, checkpoints and experiments, each answered by the command line with its
exit status and one specific line (never a traceback); and training killed at random moments
resumes to the results of an uninterrupted run, leaving no stray files.

docs/reliability.md lists what is validated and what each fault does; this file is its proof.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mmbalance.cli import main

QUICK = ["--epochs", "2", "--train.progress", "off", "--train.probe", "false"]


def npz(tmp, name="d.npz", n=40, **changes):
    rng = np.random.default_rng(0)
    a = {"labels": np.arange(n) % 4, "audio": rng.normal(size=(n, 5)).astype(np.float32),
         "text": rng.normal(size=(n, 3)).astype(np.float32)}
    for k, v in changes.items():
        if v is None:
            a.pop(k)
        else:
            a[k] = v
    path = Path(tmp) / name
    np.savez(path, **a)
    return str(path)


def a_run(tmp, name="run", epochs=2, extra=()):
    rd = Path(tmp) / name
    assert main(["-q", "train", *QUICK[2:], "--epochs", str(epochs), "--output-dir", str(rd), *extra]) == 0
    return rd


def stopped_run(tmp):
    return a_run(tmp, "part", epochs=3, extra=("--train.stop_after_epochs", "1"))


def write(path, data: bytes | str):
    path = Path(path)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# (id, setup(tmp) -> argv, expected exit status, expected text in stderr)
CASES = [
    # ---- data files
    ("npz-missing-labels", lambda t: ["train", "--dataset", npz(t, labels=None)], 2, "labels"),
    ("npz-length-mismatch", lambda t: ["train", "--dataset", npz(t, text=np.zeros((39, 3), np.float32))], 2, "39"),
    ("npz-fractional-labels", lambda t: ["train", "--dataset", npz(t, labels=np.arange(40) / 3)], 2, "labels"),
    ("npz-nan", lambda t: ["train", "--dataset", npz(t, audio=np.full((40, 5), np.nan, np.float32))], 2, "NaN"),
    ("npz-single-class", lambda t: ["train", "--dataset", npz(t, labels=np.zeros(40, int))], 2, "single class"),
    ("npz-huge-label", lambda t: ["train", "--dataset", npz(t, labels=np.r_[np.arange(39) % 4, 10**12])], 2,
     "labels"),
    ("npz-bad-modality-name", lambda t: ["train", "--dataset", npz(t, **{"my audio": np.zeros((40, 2), np.float32)})],
     2, "my audio"),
    ("npz-zero-features", lambda t: ["train", "--dataset", npz(t, text=np.zeros((40, 0), np.float32))], 2, "text"),
    ("npz-mask-for-unknown-modality", lambda t: ["train", "--dataset", npz(t, present_video=np.ones(40, bool))], 2,
     "video"),
    ("npz-empty-split", lambda t: ["train", "--dataset", npz(t, split=np.array(["train"] * 30 + ["val"] * 10))], 2,
     "test"),
    ("npz-option-not-taken", lambda t: ["train", "--dataset", npz(t), "--dataset.root", "x"], 2,
     "has no option 'root'"),
    ("npz-not-a-file", lambda t: ["train", "--dataset", str(write(Path(t) / "x.npz", b"garbage"))], 2, "x.npz"),
    ("npz-does-not-exist", lambda t: ["train", "--dataset", str(Path(t) / "none.npz")], 2, "none.npz"),
    # ---- config and flags
    ("negative-grad-clip", lambda t: ["train", "--optim.grad_clip", "-1"], 2, "'optim.grad_clip' takes a number > 0"),
    ("lr-not-a-number", lambda t: ["train", "--optim.lr", "abc"], 2, "'optim.lr' takes a number > 0, got 'abc'"),
    ("momentum-out-of-range", lambda t: ["train", "--optim.momentum", "1.5"], 2, "takes a number in [0, 1)"),
    ("negative-workers", lambda t: ["train", "--train.num_workers", "-1"], 2, "'train.num_workers' takes an integer >= 0"),
    ("eval-batch-zero", lambda t: ["train", "--train.eval_batch_size", "0"], 2, "'train.eval_batch_size'"),
    ("seed-beyond-64-bits", lambda t: ["train", "--seed", str(2**70)], 2, "'train.seed' takes an integer in"),
    ("duplicate-modalities", lambda t: ["train", "--modalities", "pix,pix"], 2, "names pix twice"),
    ("empty-modalities", lambda t: ["train", "--modalities", ","], 2, "names no modality"),
    ("stop-after-zero", lambda t: ["train", "--train.stop_after_epochs", "0"], 2, "'train.stop_after_epochs'"),
    ("unknown-progress", lambda t: ["train", "--train.progress", "sometimes"], 2, "one of 'auto', 'on', 'off'"),
    ("unknown-method", lambda t: ["train", "--method", "arll"], 2, "unknown method 'arll'; valid methods:"),
    ("method-option-type", lambda t: ["train", "--method", "arl", "--method.T", "abc"], 2,
     "method 'arl' option 'T' takes a number"),
    ("method-unknown-option", lambda t: ["train", "--method", "arl", "--method.TT", "3"], 2,
     "method 'arl' has no option 'TT'"),
    ("unknown-fusion", lambda t: ["train", "--fusion", "avg"], 2, "unknown fusion 'avg'"),
    ("unknown-key", lambda t: ["train", "--optim.lrr", "1"], 2, "unknown config key 'optim.lrr'"),
    ("config-file-missing", lambda t: ["train", "--config", str(Path(t) / "no.yaml")], 2, "config file not found"),
    ("config-not-yaml", lambda t: ["train", "--config", str(write(Path(t) / "c.yaml", "a: [1, 2"))], 2,
     "is not valid YAML"),
    ("batch-size-zero", lambda t: ["train", "--batch-size", "0"], 2, "'train.batch_size' takes an integer >= 1"),
    ("missing-rate-out-of-range", lambda t: ["train", "--missing-rate", "1.5"], 2, "'dataset.missing_rate'"),
    ("cuda-not-available", lambda t: ["train", "--device", "cuda"], 2, "CUDA is not available"),
    ("bad-device-name", lambda t: ["train", "--device", "tpu"], 2, "unknown device 'tpu'"),
    # ---- output folders
    ("output-is-a-file", lambda t: ["train", "--output-dir", str(write(Path(t) / "f", "x"))], 2, "is a file"),
    ("output-holds-user-files", lambda t: ["train", "--output-dir",
                                           str(write(Path(t) / "notes.txt", "mine").parent)], 2,
     "is not empty and is not a run folder"),
    ("output-holds-a-run", lambda t: ["train", *QUICK, "--output-dir", str(a_run(t))], 2,
     "already holds a run; continue it with --resume"),
    # ---- checkpoints and resume
    ("resume-not-a-run", lambda t: ["train", "--resume", str(t)], 2, "is not a run folder"),
    ("resume-empty-last", lambda t: ["train", "--resume", str(write(stopped_run(t) / "last.pt", b"").parent)], 2,
     "last.pt is empty"),
    ("resume-truncated-last", lambda t: ["train", "--resume", str(_truncate(stopped_run(t) / "last.pt"))], 2,
     "is corrupt or truncated"),
    ("resume-corrupt-config", lambda t: ["train", "--resume", str(write(stopped_run(t) / "config.yaml",
                                                                        "train: [").parent)], 2, "not valid YAML"),
    ("resume-finished-run", lambda t: ["train", "--resume", str(a_run(t))], 2, "is finished"),
    ("resume-changes-epochs", lambda t: ["train", "--resume", str(stopped_run(t)), "--train.epochs", "9"], 2,
     "cannot change train.epochs when resuming"),
    ("resume-checkpoint-of-another-run", lambda t: ["train", "--resume", str(_swap_last(t))], 2,
     "belongs to another run"),
    ("evaluate-corrupt-best", lambda t: ["evaluate", "--run", str(_truncate(a_run(t) / "best.pt"))], 2,
     "best.pt is corrupt or truncated"),
    ("evaluate-not-a-run", lambda t: ["evaluate", "--run", str(t)], 2, "is not a run folder"),
    # ---- experiments
    ("experiment-unknown-method", lambda t: ["experiment", "--runs", "joint", "nope", "--seeds", "0",
                                             "--output-dir", str(Path(t) / "e")], 2, "unknown method 'nope'"),
    ("experiment-duplicate-spec", lambda t: ["experiment", "--runs", "joint", "joint", "--seeds", "0",
                                             "--output-dir", str(Path(t) / "e")], 2, "joint"),
    ("experiment-bad-option", lambda t: ["experiment", "--runs", "arl:T=abc", "--seeds", "0",
                                         "--output-dir", str(Path(t) / "e")], 2, "option 'T' takes a number"),
    ("plot-not-a-run", lambda t: ["plot", str(t)], 2, "no metrics.jsonl"),
]


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.parent


def _swap_last(tmp) -> Path:
    part = stopped_run(tmp)
    other = a_run(tmp, "other", epochs=3, extra=("--seed", "5", "--train.stop_after_epochs", "1"))
    (part / "last.pt").write_bytes((other / "last.pt").read_bytes())
    return part


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(tmp_path, capsys, case):
    name, setup, status, needle = case
    argv = setup(tmp_path)
    capsys.readouterr()
    if argv[0] == "train" and "--resume" not in argv:
        for key, value in zip(QUICK[::2], QUICK[1::2]):
            if key not in argv:
                argv = [*argv, key, value]
        if "--output-dir" not in argv:
            argv += ["--output-dir", str(tmp_path / "out")]
    assert main(["-q", *argv]) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmbalance: error:")]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    if name.startswith(("npz-", "negative", "lr-", "momentum", "seed", "unknown", "method-", "config-",
                        "batch", "missing", "cuda", "bad-device", "duplicate", "empty", "stop", "eval-batch")):
        assert not (tmp_path / "out").exists(), "a run folder was created for a bad input"


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# ------------------------------------------------------------------- kills at random moments
def _cmd(*args):
    return [sys.executable, "-m", "mmbalance", "-q", *args]


def test_training_killed_at_random_moments_resumes_to_the_same_results(tmp_path):
    args = ["train", "--epochs", "25", "--batch-size", "32", "--train.progress", "off", "--train.probe", "false"]
    ref = tmp_path / "ref"
    assert subprocess.run(_cmd(*args, "--output-dir", str(ref)), env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, timeout=600).returncode == 0
    rd = tmp_path / "run"
    first = _cmd(*args, "--output-dir", str(rd))
    resume = _cmd("train", "--resume", str(rd), "--train.progress", "off")
    # a kill during the first seconds may come before the run folder exists: start again then
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hits = 0
    for k in range(4):
        cmd = resume if (rd / "last.pt").exists() else first
        if not (rd / "last.pt").exists() and rd.exists():
            import shutil

            shutil.rmtree(rd)  # killed before its first checkpoint: nothing to resume
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(4.0, 8.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            hits += 1
        p.communicate(timeout=120)
        if (rd / "results.json").exists():
            break
        if k == 1 and (rd / "last.pt").exists():  # what a kill in the middle of a checkpoint write leaves
            (rd / ".last.pt.deadbeef").write_bytes((rd / "last.pt").read_bytes()[:100])
    if not (rd / "results.json").exists():
        cmd = resume if (rd / "last.pt").exists() else first
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert hits >= 1
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((rd / "results.json").read_text())
    assert a["test"] == b["test"] and a["val"] == b["val"] and a["best_epoch"] == b["best_epoch"]
    la = [json.loads(x)["val"] for x in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["val"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert la == lb  # every epoch once, the same numbers
    assert not [c.name for c in rd.iterdir() if c.name.startswith(".")]  # no temporary files left


def test_experiment_killed_at_random_moments_completes_without_repeating_or_losing_runs(tmp_path):
    out = tmp_path / "e"
    args = ["experiment", "--runs", "joint", "ogm_ge", "--seeds", "0,1", "--output-dir", str(out),
            "--train.epochs", "8", "--train.progress", "off", "--train.probe", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(1)
    hits = 0
    for _ in range(3):
        p = subprocess.Popen(_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(5.0, 10.0))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            hits += 1
        p.communicate(timeout=120)
        if (out / "summary.json").exists():
            break
    res = subprocess.run(_cmd(*args), env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert hits >= 1
    for label in ("joint", "ogm_ge"):
        for seed in (0, 1):
            rd = out / label / f"seed{seed}"
            lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
            assert [x["epoch"] for x in lines] == list(range(1, 9))  # no epoch repeated or lost
            assert not [c.name for c in rd.iterdir() if c.name.startswith(".")]
    summary = json.loads((out / "summary.json").read_text())
    assert "joint" in json.dumps(summary) and "ogm_ge" in json.dumps(summary)
    # the same runs uninterrupted give the same test accuracy
    ref = tmp_path / "ref"
    assert main(["-q", "train", "--method", "ogm_ge", "--seed", "1", "--epochs", "8", "--train.progress", "off",
                 "--train.probe", "false", "--output-dir", str(ref)]) == 0
    a = json.loads((ref / "results.json").read_text())["test"]
    b = json.loads((out / "ogm_ge" / "seed1" / "results.json").read_text())["test"]
    assert a == b
