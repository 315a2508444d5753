"""mmbalance analyze: imbalance measures against hand-made numbers, contributions against a
brute-force re-encoding of every modality subset, gradient-norm ratios, epoch checkpoints,
unimodal references and experiment folders."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from mmbalance.evaluation.imbalance import (contribution_summary, error_matrices, error_matrix, head_singular_values,
                                            imbalance_ratio, modality_gap, modality_gaps, probe_gap, ratios_to_max,
                                            singular_values)
from mmbalance.experiments.analyze import (analyze, analyze_run, find_runs, grad_norm_analysis,
                                           pick_reference, unimodal_references)
from mmbalance.registry import ConfigError

from _analysis_fixtures import brute_force_phi, cli, train_tiny, write_npz
from helpers import tiny_data


# ----------------------------------------------------------------------------- pure measures
def test_error_matrix_by_hand():
    a = torch.tensor([1, 1, 1, 0, 0, 1]).bool()
    b = torch.tensor([1, 0, 0, 1, 0, 1]).bool()
    e = error_matrix(a, b, "a", "b")
    assert e["n"] == 6 and e["counts"] == [[2, 2], [1, 1]]
    assert e["both"] == pytest.approx(2 / 6) and e["neither"] == pytest.approx(1 / 6)
    assert e["only"] == {"a": pytest.approx(2 / 6), "b": pytest.approx(1 / 6)}
    assert e["matrix"] == [[pytest.approx(2 / 6), pytest.approx(2 / 6)], [pytest.approx(1 / 6), pytest.approx(1 / 6)]]
    # only the valid samples count: drop samples 0 and 1 -> a right only on 2 and 5 (5 both right)
    v = error_matrix(a, b, "a", "b", valid=torch.tensor([0, 0, 1, 1, 1, 1]).bool())
    assert v["n"] == 4 and v["counts"] == [[1, 1], [1, 1]]
    assert error_matrix(a[:0], b[:0], "a", "b")["both"] is None
    with pytest.raises(ValueError):
        error_matrix(a, b[:3], "a", "b")


def test_error_matrices_every_pair_and_presence():
    c = {"x": torch.tensor([1, 0, 1, 1]).bool(), "y": torch.tensor([0, 0, 1, 1]).bool(),
         "z": torch.tensor([1, 1, 1, 0]).bool()}
    pres = {"y": torch.tensor([1, 1, 0, 1]).bool()}
    out = error_matrices(c, pres)
    assert list(out) == ["x|y", "x|z", "y|z"]
    assert out["x|z"]["n"] == 4 and out["x|z"]["counts"] == [[2, 1], [1, 0]]
    assert out["x|y"]["n"] == 3 and out["x|y"]["only"]["x"] == pytest.approx(1 / 3)  # sample 2 (y missing) left out
    assert out["y|z"]["counts"] == [[0, 1], [2, 0]]


def test_gaps_and_ratios_by_hand():
    assert probe_gap({"a": 0.79, "b": 0.96, "c": None}, {"a": 0.83, "b": 0.96}) == \
        {"a": pytest.approx(-0.04), "b": pytest.approx(0.0), "c": None}
    assert ratios_to_max({"a": 3.0, "b": 1.5, "c": None}) == {"a": 1.0, "b": 0.5, "c": None}
    assert ratios_to_max({"a": 0.0, "b": 0.0}) == {"a": None, "b": None}
    assert ratios_to_max({"a": None, "b": float("nan")}) == {"a": None, "b": None}  # nothing to divide by
    assert ratios_to_max({}) == {}
    assert imbalance_ratio({"a": 4.0, "b": 1.0, "c": 2.0}) == pytest.approx(0.25)
    assert imbalance_ratio({"a": 4.0}) is None


def test_contribution_summary_by_hand():
    phi = torch.tensor([[1.5, 0.5], [1.0, 1.0], [0.0, 0.0], [-0.5, 0.5], [1.5, 0.5]])
    y = torch.tensor([0, 0, 1, 1, 2])
    s = contribution_summary(phi, y, ["a", "b"], 4)
    assert s["mean"] == {"a": pytest.approx(3.5 / 5), "b": pytest.approx(2.5 / 5)}
    assert s["share"]["a"] == pytest.approx(3.5 / 6) and s["share"]["b"] == pytest.approx(2.5 / 6)
    assert s["per_class"]["a"] == [pytest.approx(1.25), pytest.approx(-0.25), pytest.approx(1.5), None]
    assert s["per_class"]["b"] == [pytest.approx(0.75), pytest.approx(0.25), pytest.approx(0.5), None]
    assert s["class_counts"] == [2, 2, 1, 0]
    assert s["ratio"] == {"a": 1.0, "b": pytest.approx(2.5 / 3.5)} and s["imbalance"] == pytest.approx(2.5 / 3.5)
    assert s["n"] == 5


def test_contribution_shares_at_a_total_of_one_and_of_zero():
    y = torch.tensor([0, 1])
    one = contribution_summary(torch.tensor([[0.5, 0.25], [1.0, 0.25]]), y, ["a", "b"], 2)  # means 0.75 + 0.25
    assert one["share"] == {"a": pytest.approx(0.75), "b": pytest.approx(0.25)}
    zero = contribution_summary(torch.tensor([[1.0, -1.0], [0.5, -0.5]]), y, ["a", "b"], 2)  # they cancel
    assert zero["share"] == {"a": None, "b": None} and zero["mean"] == {"a": 0.75, "b": -0.75}


def test_modality_gap_by_hand():
    a = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # normalised: (1,0), (0,1) -> centroid (0.5, 0.5)
    b = torch.tensor([[2.0, 0.0]])               # centroid (1, 0)
    assert modality_gap(a, b) == pytest.approx(math.sqrt(0.5))
    assert modality_gap(a * 7, b * 0.1) == pytest.approx(math.sqrt(0.5))  # scale-free per sample
    assert modality_gap(a, a) == 0.0
    assert modality_gap(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        modality_gap(a, torch.ones(2, 3))
    gaps = modality_gaps({"a": a, "b": b, "c": torch.ones(2, 3)})
    assert gaps["a|b"] == pytest.approx(math.sqrt(0.5)) and gaps["a|c"] is None and gaps["b|c"] is None


def test_singular_values_of_heads():
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    w = rot @ torch.diag(torch.tensor([3.0, 0.5])) @ rot.T
    assert singular_values(w) == [pytest.approx(3.0), pytest.approx(0.5)]
    from mmbalance.models import create_fusion

    head = create_fusion("concat", {"a": 3, "b": 2}, 4)
    with torch.no_grad():
        head.fc.weight.copy_(torch.arange(20, dtype=torch.float32).reshape(4, 5))
    spec = head_singular_values(head, head.blocks, "fc")
    assert set(spec) == {"fc", "fc[a]", "fc[b]"}
    ref = torch.linalg.svdvals(head.fc.weight[:, 3:5].double())
    assert spec["fc[b]"]["singular_values"] == pytest.approx(ref.tolist())
    assert spec["fc[b]"]["shape"] == [4, 2]
    assert spec["fc"]["condition"] is None or spec["fc"]["condition"] > 1e6  # rank 2 of 4: (near) singular
    late = head_singular_values(create_fusion("late", {"a": 3, "b": 2}, 4))
    assert set(late) == {"heads.a", "heads.b"} and late["heads.a"]["shape"] == [4, 3]


def test_spectra_of_other_shapes_norms_and_a_zero_layer():
    # trailing dimensions flattened (a convolution's weight): the spectrum of the (out, rest) matrix
    w = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2) - 5.0
    assert singular_values(w) == pytest.approx(torch.linalg.svdvals(w.reshape(2, 6).double()).tolist())
    # a bare linear layer is keyed "head"; its Frobenius norm and condition number
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -0.5]]))
    spec = head_singular_values(lin)
    assert set(spec) == {"head"}
    assert spec["head"]["frobenius"] == pytest.approx(math.sqrt(9.25))
    assert spec["head"]["condition"] == pytest.approx(6.0)
    with torch.no_grad():
        lin.weight.zero_()  # a zero-initialised layer: no condition number, norm 0
    spec = head_singular_values(lin)
    assert spec["head"]["condition"] is None and spec["head"]["frobenius"] == 0.0


# ----------------------------------------------------------------------------- a run
@pytest.mark.parametrize("policy,missing", [("input", 0.0), ("feature", 0.3)])
def test_contributions_match_brute_force_re_encoding(tmp_path, policy, missing):
    data = tiny_data(n=48, mods=("a", "b", "c"), n_eval=15, missing=missing, signal={"a": 1.0, "b": 0.3, "c": 0.0})
    run, _ = train_tiny(tmp_path / "r", data, epochs=2, **{"model.absent_policy": policy})
    a = analyze_run(tmp_path / "r", data=data, plots=False, progress=False)
    from mmbalance.api import load_run

    model = load_run(tmp_path / "r").model
    phi, y = brute_force_phi(model, data.test)
    total = phi.sum(1)  # efficiency: v(all) = M (correct) or 0
    assert bool((total.sub(3).abs().lt(1e-9) | total.abs().lt(1e-9)).all())
    for i, m in enumerate(("a", "b", "c")):
        assert a["contribution"]["mean"][m] == pytest.approx(float(phi[:, i].mean()), abs=1e-6)
        for c in range(3):
            assert a["contribution"]["per_class"][m][c] == pytest.approx(float(phi[y == c, i].mean()), abs=1e-6)
    assert a["contribution"]["absent_policy"] == policy
    # error matrices from the linear probes (default): consistent with each probe's accuracy, which is
    # the trainer's probe recomputed on the same features
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    e = a["error_matrices"]["pairs"]["a|c"]
    assert a["error_matrices"]["source"] == "probe"
    if not missing:
        for m in ("a", "c"):
            assert e["both"] + e["only"][m] == pytest.approx(a["per_modality"][m]["probe_accuracy_computed"])
            assert a["per_modality"][m]["probe_accuracy_computed"] == pytest.approx(
                res["test"]["per_modality"][m]["probe_accuracy"])
    else:
        both_present = data.test.present["a"] & data.test.present["c"]
        assert e["n"] == int(both_present.sum()) < 15
    saved = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert saved["contribution"]["mean"] == pytest.approx(a["contribution"]["mean"])


def test_run_analysis_error_matrices_gaps_and_gradient_norms(tmp_path):
    data = tiny_data(n=48, n_eval=15, signal={"a": 1.0, "b": 0.2})
    run, _ = train_tiny(tmp_path / "r", data, epochs=3)
    a = analyze_run(tmp_path / "r", data=data, per_modality="logits", plots=True, progress=False)
    # error matrices from the unimodal logits, recomputed by hand from the loaded run's predictions
    from mmbalance.api import load_run

    loaded = load_run(tmp_path / "r")
    pred = loaded.predict(data.test.arrays)
    ca = pred.unimodal_logits["a"].argmax(1) == data.test.labels
    cb = pred.unimodal_logits["b"].argmax(1) == data.test.labels
    e = a["error_matrices"]["pairs"]["a|b"]
    assert a["error_matrices"]["source"] == "logits"
    assert e["counts"] == [[int((ca & cb).sum()), int((ca & ~cb).sum())], [int((~ca & cb).sum()), int((~ca & ~cb).sum())]]
    assert a["per_modality"]["a"]["accuracy"] == pytest.approx(float(ca.double().mean()))
    assert a["accuracy"] == pytest.approx(float((pred.labels == data.test.labels).double().mean()))
    # probe accuracy as reported by results.json (the trainer's probe)
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert a["per_modality"]["b"]["probe_accuracy"] == res["test"]["per_modality"]["b"]["probe_accuracy"]
    # the embeddings of concat are the encoder features (equal widths): the gap is defined
    assert a["modality_gap"]["space"] == "encoder features" and a["modality_gap"]["pairs"]["a|b"] is not None
    assert set(a["singular_values"]) == {"fc", "fc[a]", "fc[b]"}
    assert "plots/curves.png" in a["plots"] and (tmp_path / "r" / "plots" / "curves.csv").exists()
    assert any("no unimodal reference" in n for n in a["notes"])
    # gradient norms: ratio to the largest modality per epoch, from metrics.jsonl
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    if "grad_norm" not in recs[0]:
        pytest.skip("the engine does not record grad_norm yet")
    g = a["grad_norm"]
    assert g["epochs"] == [1, 2, 3]
    for i, r in enumerate(recs):
        top = max(r["grad_norm"].values())
        for m in ("a", "b"):
            assert g["norm"][m][i] == pytest.approx(r["grad_norm"][m])
            assert g["ratio"][m][i] == pytest.approx(r["grad_norm"][m] / top)
    assert g["mean_ratio"]["a"] == pytest.approx(sum(g["ratio"]["a"]) / 3)
    curves = list(csv.DictReader(open(tmp_path / "r" / "plots" / "curves.csv")))  # plot_run's series
    assert [float(c["grad_norm/b"]) for c in curves] == pytest.approx([r["grad_norm"]["b"] for r in recs])


def test_grad_norm_analysis_from_metrics(tmp_path):
    rd = tmp_path / "r"
    rd.mkdir()
    recs = [{"epoch": 1, "val": {"accuracy": 0.5, "per_modality": {}}, "grad_norm": {"a": 2.0, "b": 1.0}},
            {"epoch": 2, "val": {"accuracy": 0.6, "per_modality": {}}, "grad_norm": {"a": 1.0, "b": 4.0}}]
    (rd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    g = grad_norm_analysis(rd)
    assert g["ratio"] == {"a": [1.0, 0.25], "b": [0.5, 1.0]}
    assert g["mean_ratio"] == {"a": pytest.approx(0.625), "b": pytest.approx(0.75)}
    assert g["mean_norm"] == {"a": 1.5, "b": 2.5} and g["imbalance"] == pytest.approx(0.6)
    (rd / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val": {"accuracy": 0.5, "per_modality": {}}}) + "\n")
    assert grad_norm_analysis(rd) is None


def test_contribution_over_kept_epoch_checkpoints(tmp_path):
    from mmbalance.config import TrainConfig

    if not hasattr(TrainConfig(), "keep_checkpoints"):
        pytest.skip("the engine does not keep epoch checkpoints yet")
    data = tiny_data(n=48, n_eval=15)
    train_tiny(tmp_path / "r", data, epochs=3, **{"train.keep_checkpoints": True})
    assert sorted(p.name for p in (tmp_path / "r").glob("epoch*.pt")) == ["epoch1.pt", "epoch2.pt", "epoch3.pt"]
    a = analyze_run(tmp_path / "r", data=data, progress=False)
    curves = a["contribution_epochs"]
    assert curves["epochs"] == [1, 2, 3]
    # epoch 2's values are those of the model with epoch2.pt's weights (brute force)
    from mmbalance.api import load_run

    model = load_run(tmp_path / "r", checkpoint="epoch2.pt").model
    phi, _ = brute_force_phi(model, data.test)
    assert curves["mean"]["a"][1] == pytest.approx(float(phi[:, 0].mean()), abs=1e-6)
    assert curves["mean"]["b"][1] == pytest.approx(float(phi[:, 1].mean()), abs=1e-6)
    # and the overall contribution is the selected checkpoint's, not the last epoch loaded
    best = load_run(tmp_path / "r").model
    phi_best, _ = brute_force_phi(best, data.test)
    assert a["contribution"]["mean"]["a"] == pytest.approx(float(phi_best[:, 0].mean()), abs=1e-6)
    rows = list(csv.DictReader(open(tmp_path / "r" / "plots" / "contribution_epochs.csv")))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    assert float(rows[2]["b"]) == pytest.approx(curves["mean"]["b"][2])
    assert "plots/contribution_epochs.png" in a["plots"]


def test_references_same_seed_first_then_mean():
    refs = [{"path": "u0", "modality": "a", "seed": 0, "dataset": "d", "value": 0.8, "measure": "probe_accuracy",
             "accuracy": 0.81},
            {"path": "u1", "modality": "a", "seed": 1, "dataset": "d", "value": 0.9, "measure": "probe_accuracy",
             "accuracy": 0.91},
            {"path": "x", "modality": "a", "seed": 1, "dataset": "other", "value": 0.1, "measure": "probe_accuracy",
             "accuracy": 0.1}]
    r = pick_reference(refs, "a", "d", 1)
    assert r["value"] == 0.9 and r["runs"] == ["u1"] and r["same_seed"]
    r = pick_reference(refs, "a", "d", 5)
    assert r["value"] == pytest.approx(0.85) and not r["same_seed"] and r["runs"] == ["u0", "u1"]
    assert pick_reference(refs, "b", "d", 0) is None


# ----------------------------------------------------------------------------- an experiment
def test_experiment_analysis_gaps_missing_rate_and_plots(tmp_path):
    from mmbalance.experiments.runner import run_experiment

    npz = write_npz(tmp_path / "tiny.npz", signal={"a": 1.5, "b": 0.4})
    exp = tmp_path / "exp"
    run_experiment(["joint", "joint-miss=joint:dataset.missing_rate=0.3", "uni-a=unimodal:modality=a",
                    "uni-b=unimodal:modality=b"], [0, 1], exp,
                   overrides={"dataset.name": str(npz), "train.epochs": 1, "train.batch_size": 16,
                              "train.eval_batch_size": 64})
    a = analyze(exp, progress=False)
    assert a["kind"] == "experiment" and len(find_runs(exp)) == 8
    rows = {r["label"]: r for r in a["rows"]}
    assert set(rows) == {"joint", "joint-miss", "uni-a", "uni-b"}
    # the probe gap of each joint run uses the unimodal run of its own seed
    gaps = []
    for seed in (0, 1):
        ja = json.loads((exp / "joint" / f"seed{seed}" / "analysis.json").read_text())
        ub = json.loads((exp / "uni-b" / f"seed{seed}" / "results.json").read_text())
        ref = ub["test"]["per_modality"]["b"]["probe_accuracy"]
        assert ja["probe_gap"]["reference"]["b"]["same_seed"]
        assert ja["probe_gap"]["gap"]["b"] == pytest.approx(ja["per_modality"]["b"]["probe_accuracy"] - ref)
        gaps.append(ja["probe_gap"]["gap"]["b"])
    assert rows["joint"]["probe_gap"]["b"]["mean"] == pytest.approx(sum(gaps) / 2)
    assert rows["joint"]["probe_gap"]["b"]["std"] == pytest.approx(abs(gaps[0] - gaps[1]) / math.sqrt(2))
    assert rows["uni-a"]["probe_gap"]["a"]["n"] == 0  # a reference has no gap to itself
    # accuracy vs missing rate: joint at 0 and 0.3, the unimodal runs at 0
    mr = a["missing_rate"]["joint (concat)"]
    assert set(mr) == {0.0, 0.3}
    assert mr[0.3]["mean"] == pytest.approx(rows["joint-miss"]["accuracy"]["mean"])
    saved = json.loads((exp / "analysis.json").read_text())
    assert saved["rows"][0]["label"] == a["rows"][0]["label"]
    assert set(saved["plots"]) == {"plots/comparison.png", "plots/imbalance_gap.png", "plots/missing_rate.png"}
    summary = json.loads((exp / "summary.json").read_text())
    comp = list(csv.DictReader(open(exp / "plots" / "comparison.csv")))
    fused = {r["category"]: float(r["value"]) for r in comp if r["series"] == "fused"}
    assert fused == {r["label"]: pytest.approx(r["accuracy"]["mean"]) for r in summary["rows"]}
    gap_csv = list(csv.DictReader(open(exp / "plots" / "imbalance_gap.csv")))
    row = next(r for r in gap_csv if r["category"] == "joint" and r["series"] == "b")
    assert float(row["value"]) == pytest.approx(rows["joint"]["probe_gap"]["b"]["mean"])
    mcsv = list(csv.DictReader(open(exp / "plots" / "missing_rate.csv")))
    assert [float(r["missing_rate"]) for r in mcsv] == [0.0, 0.3]
    assert float(mcsv[1]["joint (concat)"]) == pytest.approx(mr[0.3]["mean"])


def test_analyze_refuses_what_is_not_a_finished_run(tmp_path):
    with pytest.raises(ConfigError, match="holds no finished run"):
        analyze(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        analyze(tmp_path / "nope")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match="not finished"):
        analyze(tmp_path / "r")
    with pytest.raises(ConfigError, match="does not exist"):
        unimodal_references([tmp_path / "missing"])


def test_analyze_cli_with_a_reference_run(tmp_path, capsys):
    import mmbalance

    npz = write_npz(tmp_path / "tiny.npz", signal={"a": 1.5, "b": 0.3})
    common = {"dataset.name": str(npz), "train.epochs": 2, "train.progress": "off", "train.batch_size": 16}
    mmbalance.train(common, output_dir=str(tmp_path / "joint"))
    mmbalance.train(common, output_dir=str(tmp_path / "uni-b"), **{"method": "unimodal", "method.modality": "b"})
    assert cli(["analyze", str(tmp_path / "joint"), "--reference", str(tmp_path / "uni-b"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "probe gap" in printed and "a vs b (probe)" in printed and "analysis.json" in printed
    a = json.loads((tmp_path / "joint" / "analysis.json").read_text())
    joint = json.loads((tmp_path / "joint" / "results.json").read_text())
    uni = json.loads((tmp_path / "uni-b" / "results.json").read_text())
    ref = uni["test"]["per_modality"]["b"]["probe_accuracy"]
    assert a["probe_gap"]["reference"]["b"]["value"] == ref and a["probe_gap"]["reference"]["a"] is None
    assert a["probe_gap"]["gap"]["b"] == pytest.approx(joint["test"]["per_modality"]["b"]["probe_accuracy"] - ref)
    assert a["plots"] == [] and not (tmp_path / "joint" / "plots").exists()
    assert cli(["analyze", str(tmp_path / "joint"), "--split", "val", "--per-modality", "logits"]) == 0
    assert json.loads((tmp_path / "joint" / "analysis.json").read_text())["split"] == "val"
