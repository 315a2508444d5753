"""``mmbalance experiment`` never reports stale or mixed results: reruns, restarts, interruptions."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from mmbalance.cli import main
from mmbalance.engine import rundir
from mmbalance.engine import trainer as trainer_mod

TINY = ["--train.probe", "false", "--train.progress", "off"]


def _exp(out, *extra, runs=("joint",), seeds="0", epochs=2):
    return ["-q", "experiment", "--runs", *runs, "--seeds", seeds, "--output-dir", str(out),
            "--train.epochs", str(epochs), *TINY, *extra]


def _results(out, label="joint", seed=0):
    return json.loads((out / label / f"seed{seed}" / "results.json").read_text())


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished experiment: joint, seed 0, 2 epochs (copied by each test that needs it)."""
    out = tmp_path_factory.mktemp("finished") / "exp"
    assert main(_exp(out)) == 0
    return out


@pytest.fixture
def exp(finished, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(finished, out)
    return out


@pytest.fixture
def trainers(monkeypatch):
    """Record every Trainer the experiment builds: (run folder name, resume)."""
    made = []
    orig = trainer_mod.Trainer.__init__

    def init(self, cfg, run_dir=None, resume=False, **kw):
        made.append((f"{os.path.basename(os.path.dirname(run_dir))}/{os.path.basename(run_dir)}", resume))
        orig(self, cfg, run_dir, resume=resume, **kw)

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
    return made


def test_changed_settings_are_refused_and_nothing_is_touched(exp, capsys, trainers):
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_exp(exp, epochs=3)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(exp / "joint" / "seed0") in err and "train.epochs: 2 -> 3" in err and "--restart" in err
    assert trainers == []  # nothing ran
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before  # nothing changed
    assert "--train.epochs 2" in (exp / "command.txt").read_text()


def test_restart_moves_the_old_run_aside_and_reports_the_new_numbers(exp, capsys):
    old = _results(exp)
    capsys.readouterr()
    assert main(_exp(exp, "--restart", epochs=3)) == 0
    new = _results(exp)
    assert new["epochs"] == 3 and len(_lines(exp / "joint" / "seed0" / "metrics.jsonl")) == 3
    moved = list((exp / "_replaced").glob("*/joint/seed0/results.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text()) == old  # moved aside, not deleted
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["rows"][0]["accuracy"]["mean"] == pytest.approx(new["test"]["accuracy"])
    assert summary["rows"][0]["seeds"] == [0] and summary["rows"][0]["runs"] == ["joint/seed0"]
    command = (exp / "command.txt").read_text()
    assert "--train.epochs 3" in command and "--train.epochs 2" not in command and "--restart" not in command
    assert f"{new['test']['accuracy']:.3f}" in capsys.readouterr().out
    # the restarted run now matches: a plain rerun reuses it
    assert main(_exp(exp, epochs=3)) == 0
    assert _results(exp) == new


def test_matching_rerun_reuses_and_display_settings_do_not_count(exp, trainers):
    stamp = (exp / "joint" / "seed0" / "results.json").stat().st_mtime_ns
    assert main(_exp(exp, "--train.progress", "on", "--train.device", "cpu")) == 0
    assert trainers == []
    assert (exp / "joint" / "seed0" / "results.json").stat().st_mtime_ns == stamp


def test_results_that_do_not_match_their_config_are_refused(exp, capsys):
    path = exp / "joint" / "seed0" / "results.json"
    res = json.loads(path.read_text())
    res["epochs"] = 4  # e.g. resumed under other flags by an older version
    path.write_text(json.dumps(res))
    capsys.readouterr()
    assert main(_exp(exp)) == 2
    err = capsys.readouterr().err
    assert "results.json that does not match its config.yaml" in err and "epochs 4" in err


@pytest.mark.parametrize("change, message", [
    ({"history": [{"resumed_at_epoch": 2, "changed": {"optim.lr": 0.001}}]}, "resumed with optim.lr = 0.001"),
    ({"fingerprint": "0123456789abcdef"}, "fingerprint 0123456789abcdef"),
    ({"seed": 7}, "seed 7"),
])
def test_results_computed_with_other_settings_are_refused(exp, capsys, change, message):
    path = exp / "joint" / "seed0" / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    capsys.readouterr()
    assert main(_exp(exp)) == 2
    assert message in capsys.readouterr().err


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "exp"
    (out / "joint" / "seed0").mkdir(parents=True)
    (out / "joint" / "seed0" / "notes.txt").write_text("mine")
    assert main(_exp(out)) == 2
    assert "is not a run folder (no config.yaml)" in capsys.readouterr().err
    assert (out / "joint" / "seed0" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("runs, seeds, message", [
    (("joint", "joint"), "0", "same label 'joint'"),
    (("joint", "j2=joint"), "0", "describe the same run"),
    (("joint", "w=joint:unimodal_weight=0.0"), "0", "describe the same run"),  # the default, spelled out
    (("a/b=joint", "a_b=joint:unimodal_weight=0.5"), "0", "same label 'a_b'"),
    (("joint",), "0,1,0", "seed 0 is listed twice"),
])
def test_duplicate_specs_fail_before_anything_runs(tmp_path, capsys, runs, seeds, message):
    out = tmp_path / "exp"
    assert main(_exp(out, runs=runs, seeds=seeds)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_interrupted_experiment_resumes_without_repeating_or_losing_a_run(exp, tmp_path, monkeypatch, capsys,
                                                                          trainers):
    args = _exp(exp, seeds="0,1,2")
    orig = rundir.RunFolder.save
    calls = []

    def save_then_interrupt(folder, name, *a, **kw):  # Ctrl-C right after seed 1 saved its first epoch
        orig(folder, name, *a, **kw)
        if name == "last.pt" and folder.path.name == "seed1":
            calls.append(name)
            if len(calls) == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(rundir.RunFolder, "save", save_then_interrupt)
    capsys.readouterr()
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT) during" in err and str(exp / "joint" / "seed1") in err
    assert "rerun the same command" in err and "mmbalance -q experiment --runs joint --seeds 0,1,2" in err
    assert "--resume" not in err
    assert not (exp / "summary.json").exists() and not (exp / "command.txt").exists()  # no stale summary
    assert trainers == [("joint/seed1", False)]  # seed 0 reused
    assert len(_lines(exp / "joint" / "seed1" / "metrics.jsonl")) == 1

    trainers.clear()
    assert main(args) == 0
    assert trainers == [("joint/seed1", True), ("joint/seed2", False)]
    for seed in (0, 1, 2):
        assert [r["epoch"] for r in _lines(exp / "joint" / f"seed{seed}" / "metrics.jsonl")] == [1, 2]
    row = json.loads((exp / "summary.json").read_text())["rows"][0]
    assert row["seeds"] == [0, 1, 2] and row["accuracy"]["n"] == 3

    # the resumed run gives what an uninterrupted one gives
    monkeypatch.setattr(rundir.RunFolder, "save", orig)
    ref = tmp_path / "ref"
    assert main(_exp(ref, seeds="1")) == 0
    assert _results(exp, seed=1)["test"] == _results(ref, seed=1)["test"]


def test_stop_after_epochs_then_the_same_command_finishes(tmp_path, capsys, trainers):
    out = tmp_path / "exp"
    args = _exp(out, seeds="0,1")
    assert main(args + ["--train.stop_after_epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "2 run(s) stopped" in text and "rerun the same command" in text
    assert not (out / "summary.json").exists() and not (out / "command.txt").exists()
    trainers.clear()
    assert main(args) == 0  # stop_after_epochs does not change what a run computes: they resume
    assert trainers == [("joint/seed0", True), ("joint/seed1", True)]
    for seed in (0, 1):
        assert [r["epoch"] for r in _lines(out / "joint" / f"seed{seed}" / "metrics.jsonl")] == [1, 2]
    assert "--train.stop_after_epochs" not in (out / "command.txt").read_text()


def test_sigterm_stops_the_experiment_with_the_rerun_message(tmp_path, monkeypatch, capsys):
    out = tmp_path / "exp"
    orig = rundir.RunFolder.save

    def save_then_term(folder, name, *a, **kw):
        orig(folder, name, *a, **kw)
        if name == "last.pt":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rundir.RunFolder, "save", save_then_term)
    assert main(_exp(out)) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM) during" in err and "rerun the same command" in err and "Traceback" not in err
    assert not (out / ".lock").exists()
    monkeypatch.setattr(rundir.RunFolder, "save", orig)
    assert main(_exp(out)) == 0 and _results(out)["epochs"] == 2


def test_a_running_experiment_locks_its_folder(exp, capsys):
    (exp / ".lock").write_text(f"{os.getpid()} {__import__('socket').gethostname()}\n")  # alive: this process
    assert main(_exp(exp)) == 2
    assert "in use by another mmbalance experiment" in capsys.readouterr().err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (exp / ".lock").write_text(f"{dead} {__import__('socket').gethostname()}\n")  # a killed experiment's lock
    assert main(_exp(exp)) == 0
    assert not (exp / ".lock").exists()
