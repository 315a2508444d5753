import json
import statistics

import pytest

from mmbalance.cli import main
from mmbalance.experiments.runner import RunSpec, format_summary, summarise
from mmbalance.registry import ConfigError


def test_run_spec_parsing():
    s = RunSpec.parse("joint")
    assert (s.label, s.method, s.options) == ("joint", "joint", {})
    s = RunSpec.parse("uni-fou=unimodal:modality=fou")
    assert (s.label, s.method, s.options) == ("uni-fou", "unimodal", {"modality": "fou"})
    assert s.overrides() == {"method.name": "unimodal", "method.modality": "fou"}
    s = RunSpec.parse("mla:gradient_modification=false,alpha=0.5,model.fusion=sum")
    assert s.options == {"gradient_modification": False, "alpha": 0.5, "model.fusion": "sum"}
    assert s.overrides()["model.fusion"] == "sum" and s.overrides()["method.alpha"] == 0.5
    with pytest.raises(ConfigError):
        RunSpec.parse("arl:T")


def _fake(seed, acc, probe):
    pm = {"accuracy": acc - 0.1, "probe_accuracy": probe}
    return {"method": "joint", "fusion": "concat", "dataset": "d", "seed": seed, "modalities": ["a"],
            "train_seconds": 1.0, "test": {"accuracy": acc, "macro_f1": acc, "per_modality": {"a": pm}}}


def test_summary_mean_and_sample_std():
    s = summarise({"joint": [_fake(0, 0.9, 0.5), _fake(1, 0.8, 0.7), _fake(2, 0.7, 0.6)]})
    row = s["rows"][0]
    assert row["accuracy"]["mean"] == pytest.approx(0.8)
    assert row["accuracy"]["std"] == pytest.approx(statistics.stdev([0.9, 0.8, 0.7]))
    assert row["per_modality"]["a"]["probe_accuracy"]["mean"] == pytest.approx(0.6)
    text = format_summary(s)
    assert "| joint | concat | 0.800 ± 0.100 |" in text and "probe a" in text


def test_experiment_cli_runs_seeds_and_resumes(tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["-q", "experiment", "--runs", "joint", "uni=unimodal:modality=fou", "--seeds", "0,1",
            "--output-dir", str(out), "--train.epochs", "1", "--train.probe", "false"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["rows"]] == ["joint", "uni"]
    assert summary["rows"][0]["seeds"] == [0, 1]
    assert (out / "uni" / "seed1" / "results.json").exists()
    stamp = (out / "joint" / "seed0" / "results.json").stat().st_mtime_ns
    assert main(args) == 0  # finished runs are reused, not retrained
    assert (out / "joint" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    assert "| uni |" in capsys.readouterr().out
