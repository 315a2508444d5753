"""The fair protocol: experiment files (grid, validated before any run, resumable), summaries
that equal the runs' results.json with a paired test against joint, and tuning with the same
budget for every method."""
import csv
import json
import math

import pytest
import yaml

from mmbalance.cli import main
from mmbalance.experiments.files import load_experiment_file
from mmbalance.experiments.summarize import paired_t_test, student_t_sf, summarize_folder
from mmbalance.experiments.tuning import SHARED, SPACES, sample_trials, search_space
from mmbalance.methods import create_method, list_methods
from mmbalance.registry import ConfigError

TINY = {"train.epochs": 2, "train.probe": False, "train.progress": "off", "train.eval_batch_size": 512}


def write(tmp_path, data, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_grid_expands_with_labels_from_what_varies(tmp_path):
    ef = load_experiment_file(write(tmp_path, {
        "seeds": [0, 1], "settings": TINY,
        "grid": {"methods": ["joint", {"method": "arl", "options": {"T": 4}}], "fusions": ["concat", "sum"],
                 "options": {"optim.lr": [0.01, 0.05]}}}))
    labels = [s.label for s in ef.specs]
    assert labels == ["joint-concat-lr0.01", "joint-concat-lr0.05", "joint-sum-lr0.01", "joint-sum-lr0.05",
                      "arl-T4-concat-lr0.01", "arl-T4-concat-lr0.05", "arl-T4-sum-lr0.01", "arl-T4-sum-lr0.05"]
    arl = ef.specs[-1]
    assert arl.overrides() == {"method.name": "arl", "method.T": 4, "model.fusion": "sum", "optim.lr": 0.05}
    assert ef.seeds == [0, 1] and str(ef.output_dir).endswith("exp")


@pytest.mark.parametrize("data,needle", [
    ({"grid": {"methods": ["joint"]}, "bogus": 1}, "unknown key bogus"),
    ({"seeds": "zero", "runs": ["joint"]}, "seeds must be a list of integers"),
    ({}, "declares no run"),
    ({"grid": {"methodz": ["joint"]}}, "grid takes"),
    ({"runs": [{"method": "arl", "opts": {}}]}, "a run is a spec string or a mapping"),
    ({"runs": ["arl:T=4"], "tune": {"trials": 2}}, "with tune, list plain methods"),
])
def test_bad_experiment_files_fail_in_one_line(tmp_path, data, needle):
    with pytest.raises(ConfigError, match=needle):
        load_experiment_file(write(tmp_path, data))


def test_a_bad_run_in_a_file_fails_before_any_run(tmp_path, capsys):
    p = write(tmp_path, {"output_dir": str(tmp_path / "out"), "settings": TINY, "runs": ["joint", "arl:T=abc"]})
    assert main(["-q", "experiment", str(p)]) == 2
    assert "option 'T' takes a number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_experiment_file_interrupted_and_resumed_and_summarised(tmp_path, capsys):
    out = tmp_path / "out"
    p = write(tmp_path, {"output_dir": str(out), "seeds": [0, 1], "settings": {**TINY, "train.epochs": 3},
                         "runs": ["joint", "ogm_ge"]})
    # first pass stops every run after one epoch (an interruption); the rerun finishes them
    assert main(["-q", "experiment", str(p), "--train.stop_after_epochs", "1"]) == 0
    assert not (out / "summary.json").exists()
    assert main(["-q", "experiment", str(p)]) == 0
    for label in ("joint", "ogm_ge"):
        for seed in (0, 1):
            lines = (out / label / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0
    res = summarize_folder(out, write=False)
    rows = {r["label"]: r for r in res["rows"]}
    accs = [json.loads((out / "ogm_ge" / f"seed{s}" / "results.json").read_text())["test"]["accuracy"] for s in (0, 1)]
    assert rows["ogm_ge"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 2, abs=1e-12)
    assert rows["ogm_ge"]["accuracy"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2), abs=1e-12)
    ref = [json.loads((out / "joint" / f"seed{s}" / "results.json").read_text())["test"]["accuracy"] for s in (0, 1)]
    assert rows["ogm_ge"]["vs_reference"]["diff"] == pytest.approx((accs[0] - ref[0] + accs[1] - ref[1]) / 2)
    table = list(csv.reader(open(out / "summary_table.csv")))
    assert table[0][:5] == ["run", "method", "fusion", "seeds", "test acc"]
    assert float(table[2][4]) == pytest.approx(sum(accs) / 2, abs=1e-6)
    tex = (out / "summary_table.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\textbf{" in tex and "ogm\\_ge" in tex


def test_paired_t_test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.81, 0.79, 0.84, 0.80], [0.78, 0.79, 0.80, 0.77]
    r = paired_t_test(a, b)
    ref = stats.ttest_rel(a, b)
    assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    for t, df in ((0.3, 1), (2.0, 3), (5.0, 10), (-1.2, 4)):
        assert student_t_sf(t, df) == pytest.approx(stats.t.sf(t, df), rel=1e-9, abs=1e-12)
    assert paired_t_test([0.5], [0.4])["p"] is None and paired_t_test([0.5, 0.6], [0.4, 0.5])["p"] is None


def test_search_spaces_name_real_options():
    for m in list_methods():
        space = search_space(m)
        assert set(SHARED) <= set(space)
        own = {k: d for k, d in space.items() if "." not in k}
        for k, dist in own.items():
            values = getattr(dist, "values", None) or (dist.low, dist.high)
            for v in values:
                create_method(m, **{k: v})  # a valid option with a valid value
    assert set(SPACES) <= set(list_methods())


def test_trials_are_seeded_defaults_first_and_distinct():
    t = sample_trials("arl", 5, seed=3)
    assert t[0] == {} and len(t) == 5 and len({json.dumps(x, sort_keys=True) for x in t}) == 5
    assert t == sample_trials("arl", 5, seed=3) and t != sample_trials("arl", 5, seed=4)
    assert all(0.001 <= x["optim.lr"] <= 0.1 for x in t[1:])


def test_tune_with_a_three_trial_budget_for_every_method(tmp_path, capsys):
    methods = ",".join(m for m in list_methods() if m != "joint")
    out = tmp_path / "tune"
    argv = ["-q", "tune", "--methods", methods, "--trials", "3", "--seeds", "0", "--output-dir", str(out),
            "--train.epochs", "1", "--train.probe", "false", "--train.progress", "off",
            "--model.encoder_options.hidden", "[32]", "--train.eval_batch_size", "512"]
    assert main(argv) == 0
    record = json.loads((out / "tuning.json").read_text())
    assert set(record["methods"]) == set(list_methods())
    for m, r in record["methods"].items():
        assert len(r["trials"]) == min(3, len(sample_trials(m, 3)))  # the same budget for everyone
        best = max(t["val"] for t in r["trials"])
        assert r["trials"][r["chosen_trial"]]["val"] == best and r["chosen"] == r["trials"][r["chosen_trial"]]["setting"]
        final = json.loads((out / "final" / m / "seed0" / "results.json").read_text())
        trial = json.loads((out / "trials" / f"{m}-t{r['chosen_trial']}" / "seed0" / "results.json").read_text())
        assert final["test"] == trial["test"] and final["fingerprint"] == trial["fingerprint"]  # reused, not retrained
        for k, v in r["chosen"].items():
            if "." not in k:
                assert final["method_options"][k] == v
    assert "chosen setting" in (out / "summary_table.md").read_text()
