"""Self-describing CLI and run-folder behaviour: list NAME, plot, loggers, output folders that are
not runs, resume with a changed learning rate, SIGTERM."""
import csv
import inspect
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmbalance.cli import main
from mmbalance.methods import get_method_class

QUICK = ["-q", "train", "--epochs", "2", "--train.progress", "off", "--train.probe", "false"]


def test_list_method_options_generated_from_signature(capsys):
    assert main(["list", "methods", "arl"]) == 0
    out = capsys.readouterr().out
    params = [p for p in inspect.signature(get_method_class("arl").__init__).parameters if p != "self"]
    lines = out.splitlines()
    assert lines[0].startswith("method arl: ") and lines[1].split()[:2] == ["option", "type"]
    assert [ln.split()[0] for ln in lines[2:2 + len(params)]] == params
    assert lines[-2].startswith('paper: Wei et al., "Improving Multimodal Learning via Imbalanced Learning" (ICCV 2025)')
    assert lines[-1].startswith("category: optimisation; step cost")
    t_line = next(ln for ln in lines if ln.split()[0] == "T")
    assert "8.0" in t_line and "temperature" in t_line
    assert main(["list", "fusions", "concat"]) == 0
    assert "unimodal_bias" in capsys.readouterr().out
    assert main(["list", "encoders", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "hidden" in out and "input_shape" not in out
    assert main(["list", "methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_plot_and_loggers(tmp_path, capsys):
    rd = tmp_path / "r"
    assert main([*QUICK, "--method", "arl", "--method.warmup_epochs", "1", "--output-dir", str(rd),
                 "--logger", "csv", "--logger", "tensorboard"]) == 0
    rows = list(csv.DictReader(open(rd / "metrics.csv")))
    lines = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [float(r["epoch"]) for r in rows] == [1.0, 2.0]
    assert float(rows[1]["val/accuracy"]) == pytest.approx(lines[1]["val"]["accuracy"])
    assert float(rows[1]["diagnostics/k_fou"]) == pytest.approx(lines[1]["diagnostics"]["k_fou"])
    assert any(p.name.startswith("events.out.tfevents") for p in (rd / "tensorboard").iterdir())
    assert main(["plot", str(rd)]) == 0
    curves = list(csv.DictReader(open(rd / "curves.csv")))
    assert (rd / "curves.png").stat().st_size > 1000
    assert float(curves[0]["val/fou"]) == pytest.approx(lines[0]["val"]["per_modality"]["fou"]["accuracy"])
    assert float(curves[1]["diag/k_pix"]) == pytest.approx(lines[1]["diagnostics"]["k_pix"])
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_output_folders_that_are_not_runs_are_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main([*QUICK, "--output-dir", str(f)]) == 2
    assert f"output folder {f} is a file" in capsys.readouterr().err
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    assert main([*QUICK, "--output-dir", str(d)]) == 2
    assert "is not empty and is not a run folder (it holds notes.txt)" in capsys.readouterr().err
    assert (d / "notes.txt").read_text() == "precious" and sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert main([*QUICK, "--output-dir", str(ro / "run")]) == 2
        assert "permission denied" in capsys.readouterr().err


def test_resume_with_a_lower_learning_rate_is_recorded(tmp_path, capsys):
    rd = tmp_path / "r"
    assert main([*QUICK[:2], "--epochs", "3", "--train.progress", "off", "--train.probe", "false",
                 "--output-dir", str(rd), "--train.stop_after_epochs", "1"]) == 0
    assert main(["-q", "train", "--resume", str(rd), "--optim.lr", "1e-3", "--train.progress", "off"]) == 0
    res = json.loads((rd / "results.json").read_text())
    assert res["history"] == [{"resumed_at_epoch": 2, "changed": {"optim.lr": 0.001}}]
    lrs = [json.loads(x)["lr"] for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] < 0.0011  # cosine from the new base rate
    assert main(["-q", "train", "--resume", str(rd), "--train.epochs", "5"]) == 2
    assert "cannot change train.epochs when resuming" in capsys.readouterr().err


def test_sigterm_stops_cleanly_and_resumes(tmp_path):
    rd = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmbalance", "train", "--epochs", "200", "--train.progress", "off",
           "--train.probe", "false", "--output-dir", str(rd)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (rd / "last.pt").exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and f"continue with: mmbalance train --resume {rd}" in err
    assert not [c for c in rd.iterdir() if c.name.startswith(".")]  # no temporary files left
    lines = (rd / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)  # every line complete
