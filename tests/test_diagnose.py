"""mmbalance diagnose: the verdict and the recommendation by hand, one diagnosis of the embedded
data (fou under-learned, numbers as in docs/methods.md), and a tiny end-to-end comparison."""
from __future__ import annotations

import json
import statistics
import time

import pytest

from mmbalance.experiments.diagnose import (diagnose, paired_margin, recommend, recommendation_sentence,
                                            verdict)
from mmbalance.registry import ConfigError

from _analysis_fixtures import cli, write_npz


def _row(ref, probe, share, alone):
    return {"reference": ref, "joint_probe": probe, "gap": probe - ref, "share": share, "unimodal_accuracy": alone}


def test_verdict_under_learning_threshold_dominance_and_fusion():
    rows = {"pix": _row(0.96, 0.96, 0.66, 0.96), "fou": _row(0.83, 0.78, 0.34, 0.83)}
    v = verdict(rows, {}, 0.97)
    assert v["under_learned"] == ["fou"] and v["dominant"] == "pix"
    assert v["sentences"][0].startswith("`fou` is under-learned: its encoder reaches 0.780 inside the joint model "
                                        "vs 0.830 alone")
    assert "contribution share 0.34" in v["sentences"][0]
    assert any("beats the best modality alone (`pix`, 0.960) by +0.010" in s for s in v["sentences"])
    # exactly at the threshold: not under-learned; just beyond: under-learned, largest gap first
    rows = {"a": {**_row(0.80, 0.78, 0.40, 0.8), "gap": -0.02}, "b": {**_row(0.80, 0.7799, 0.3, 0.8), "gap": -0.0201},
            "c": {**_row(0.9, 0.7, 0.3, 0.9), "gap": -0.2}}
    v = verdict(rows, {}, 0.85, gap_threshold=0.02)
    assert v["under_learned"] == ["c", "b"]
    assert v["dominant"] is None  # 0.40 of 3 modalities: within 0.1 of an even split
    assert any(s.startswith("Fusion hurts: the joint model (0.850) is less accurate than `c` alone (0.900)")
               for s in v["sentences"])
    balanced = verdict({"a": _row(0.8, 0.8, 0.55, 0.8), "b": _row(0.7, 0.71, 0.45, 0.7)}, {}, 0.9)
    assert balanced["under_learned"] == [] and balanced["dominant"] is None
    assert balanced["sentences"][0].startswith("No modality is under-learned beyond 0.020")
    errors = {"a|b": {"both": 0.7, "only": {"a": 0.2, "b": 0.05}, "neither": 0.05}}
    s = verdict({"a": _row(0.8, 0.8, 0.9, 0.8), "b": _row(0.7, 0.7, 0.1, 0.7)}, errors, 0.9)["sentences"]
    assert "Alone, `a` is right where `b` is wrong on 20.0% of test samples, and `b` where `a` is wrong on 5.0% " \
           "(both right 70.0%)." in s


def test_recommendation_by_validation_with_paired_margin():
    runs = {"joint": {0: {"val": 0.90, "test": 0.88}, 1: {"val": 0.92, "test": 0.90}},
            "arl": {0: {"val": 0.93, "test": 0.89}, 1: {"val": 0.93, "test": 0.95}},
            "mla": {0: {"val": 0.91, "test": 0.99}, 1: {"val": 0.91, "test": 0.99}}}  # best test, not chosen
    rec = recommend(runs)
    assert rec["best"] == "arl"
    assert rec["table"]["arl"]["val"]["mean"] == pytest.approx(0.93)
    assert rec["table"]["arl"]["test"]["std"] == pytest.approx(statistics.stdev([0.89, 0.95]))
    assert rec["margin"]["mean"] == pytest.approx(0.03) and rec["margin"]["n"] == 2
    assert rec["margin"]["std"] == pytest.approx(statistics.stdev([0.01, 0.05]))
    text = recommendation_sentence(rec)
    assert text.startswith("Recommended: `arl` (best validation accuracy 0.930 over 2 seed(s)); test 0.920 ± 0.042, "
                           "+0.030 ± 0.028 over `joint`")
    # a tie on validation goes to joint
    tie = recommend({"joint": {0: {"val": 0.9, "test": 0.8}}, "arl": {0: {"val": 0.9, "test": 0.85}}})
    assert tie["best"] == "joint" and recommendation_sentence(tie).startswith("Recommended: plain `joint` training")
    m = paired_margin({0: 0.9, 1: 0.8, 3: 0.5}, {0: 0.85, 1: 0.8, 2: 0.7})
    assert m["seeds"] == [0, 1] and m["mean"] == pytest.approx(0.025)


def test_diagnose_embedded_data_finds_fou_under_learned(tmp_path):
    t0 = time.perf_counter()
    d = diagnose("uci_mfeat", output_dir=tmp_path / "diag", progress=False)
    seconds = time.perf_counter() - t0
    rows = d["per_modality"]
    assert d["modalities"] == ["pix", "fou"] and d["epochs"] == 40
    assert d["under_learned"] == ["fou"] and d["dominant"] == "pix"
    # docs/methods.md (3 seeds): joint probe fou 0.775 ± 0.013, uni-fou probe 0.830 ± 0.013, probe pix 0.96
    assert 0.74 <= rows["fou"]["joint_probe"] <= 0.81
    assert 0.80 <= rows["fou"]["reference"] <= 0.86
    assert rows["fou"]["gap"] < -0.02 < rows["pix"]["gap"]
    assert 0.94 <= rows["pix"]["joint_probe"] <= 0.98
    assert rows["fou"]["share"] < 0.5 < rows["pix"]["share"]
    assert d["verdict"][0].startswith("`fou` is under-learned")
    e = d["error_matrices"]["pix|fou"]
    assert e["n"] == 400 and e["only"]["pix"] > e["only"]["fou"]
    saved = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    assert saved["under_learned"] == ["fou"]
    assert (tmp_path / "diag" / "report.html").stat().st_size > 10000
    print(f"diagnose on the embedded data: {seconds:.1f} s")


def test_diagnose_cli_compares_methods_and_recommends_by_validation(tmp_path, capsys):
    npz = write_npz(tmp_path / "tiny.npz", signal={"a": 1.5, "b": 0.3})
    out = tmp_path / "diag"
    rc = cli(["diagnose", "--train.batch_size", "16", str(npz), "--epochs", "2", "--methods", "ogm_ge,qmf",
              "--seeds", "0,1", "--output-dir", str(out), "--jobs", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    d = json.loads((out / "diagnosis.json").read_text())
    cmp = d["comparison"]
    assert cmp["methods"] == ["joint", "ogm_ge", "qmf"] and cmp["seeds"] == [0, 1]
    # the choice and the margin, recomputed from the runs' results.json
    res = {lab: {s: json.loads((out / "comparison" / lab / f"seed{s}" / "results.json").read_text()) for s in (0, 1)}
           for lab in cmp["methods"]}
    val = {lab: statistics.fmean(r["val"]["accuracy"] for r in per.values()) for lab, per in res.items()}
    top = max(val.values())
    assert cmp["best"] == next(lab for lab in ["joint", "ogm_ge", "qmf"] if val[lab] == top)
    diffs = [res[cmp["best"]][s]["test"]["accuracy"] - res["joint"][s]["test"]["accuracy"] for s in (0, 1)]
    assert cmp["margin"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert cmp["margin"]["std"] == pytest.approx(statistics.stdev(diffs))
    assert "Recommended:" in printed and "comparison (* = best on validation)" in printed
    assert d["command"].startswith("mmbalance diagnose ") and "--methods ogm_ge,qmf" in d["command"]
    assert json.loads((out / "reference" / "joint" / "seed0" / "results.json").read_text())["dataset"] == "tiny"
    assert "batch_size: 16" in (out / "comparison" / "qmf" / "seed0" / "config.yaml").read_text()
    assert (out / "comparison" / "summary.json").exists() and "plots/comparison.png" in d["plots"]
    assert (out / "reference" / "command.txt").read_text().startswith("mmbalance experiment --runs joint")
    # a rerun (default --jobs 2) reuses every finished run
    stamp = (out / "comparison" / "qmf" / "seed1" / "results.json").stat().st_mtime_ns
    assert cli(["diagnose", str(npz), "--epochs", "2", "--methods", "ogm_ge,qmf", "--seeds", "0,1",
                "--output-dir", str(out), "--train.batch_size", "16"]) == 0
    assert (out / "comparison" / "qmf" / "seed1" / "results.json").stat().st_mtime_ns == stamp


def test_diagnose_refuses_in_one_line(tmp_path, capsys):
    npz = write_npz(tmp_path / "one.npz", mods=("a",))
    assert cli(["diagnose", str(npz), "--output-dir", str(tmp_path / "o")]) == 2
    assert "diagnose needs at least two modalities" in capsys.readouterr().err
    npz2 = write_npz(tmp_path / "two.npz")
    assert cli(["diagnose", str(npz2), "--methods", "nope", "--epochs", "1", "--output-dir", str(tmp_path / "o2")]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert cli(["diagnose", str(npz2), "--train.epochs", "3"]) == 2
    assert "diagnose sets 'train.epochs' itself" in capsys.readouterr().err
    assert cli(["diagnose", str(npz2), "other.npz"]) == 2
    assert "unexpected argument 'other.npz'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--epochs takes a positive integer"):
        diagnose(str(npz2), epochs=0)
    assert not (tmp_path / "o2").exists()  # methods are checked before anything trains
