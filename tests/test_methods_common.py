"""What every registered method must do on the engine: run from the CLI, write the results
contract with its diagnostics, resume exactly (stopped after 2 of 3 epochs, continued), and
be re-evaluated by `mmbalance evaluate` to the same numbers."""
import json

import pytest

from mmbalance.cli import main
from mmbalance.methods import list_methods

METHODS = list_methods()
# methods whose per-epoch work only starts after a warm-up get a short one here
FAST = {"arl": ["--method.warmup_epochs", "1"], "sample_valuation": ["--method.warmup_epochs", "1"],
        "modality_valuation": ["--method.warmup_epochs", "1"],
        "reconboost": ["--method.epochs_per_stage", "1", "--method.correct_epochs", "1"],
        "opm": ["--method.modulation_start", "0"], "dr": ["--method.interval", "1"]}


def common(method):
    return ["-q", "train", "--method", method, "--epochs", "3", "--train.progress", "off",
            "--train.probe", "false", "--train.eval_batch_size", "512", *FAST.get(method, [])]


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted_and_contract(tmp_path, method):
    assert main([*common(method), "--output-dir", str(tmp_path / "full")]) == 0
    assert main([*common(method), "--output-dir", str(tmp_path / "part"), "--train.stop_after_epochs", "2"]) == 0
    assert main(["-q", "train", "--resume", str(tmp_path / "part"), "--train.progress", "off"]) == 0
    lines = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
             for k in ("full", "part")}
    assert [x["val"] for x in lines["full"]] == [x["val"] for x in lines["part"]]
    assert [x["diagnostics"] for x in lines["full"]] == [x["diagnostics"] for x in lines["part"]]
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    part = json.loads((tmp_path / "part" / "results.json").read_text())
    assert full["test"] == part["test"] and full["best_epoch"] == part["best_epoch"]
    assert full["method"] == method and 0.0 <= full["test"]["accuracy"] <= 1.0
    for pm in full["test"]["per_modality"].values():
        assert 0.0 <= pm["accuracy"] <= 1.0
    if method not in ("joint", "unimodal"):
        assert lines["full"][-1]["diagnostics"], f"{method} logs no diagnostics"
    # the Python API rebuilds the run for inference (no data, no optimizer): same numbers
    import mmbalance

    loaded = mmbalance.load_run(tmp_path / "full")
    ev = loaded.evaluate("test")
    assert ev["accuracy"] == full["test"]["accuracy"]
    assert {m: v["accuracy"] for m, v in ev["per_modality"].items()} == \
        {m: v["accuracy"] for m, v in full["test"]["per_modality"].items()}
    # evaluate re-creates the method's prediction rule from the saved run: same numbers
    assert main(["-q", "evaluate", "--run", str(tmp_path / "full"), "--train.progress", "off"]) == 0
    again = json.loads((tmp_path / "full" / "evaluation.json").read_text())
    assert again["test"] == full["test"] and again["val"] == full["val"]


@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_on_av_digits_with_resnets(tmp_path, method):
    """The audio-visual code path (spectrogram + image through ResNet-18 trunks) for every
    method: a tiny generated av_digits and width-4 ResNets, one epoch."""
    args = ["-q", "train", "--dataset", "av_digits", "--dataset.size", "100", "--method", method,
            "--epochs", "1", "--batch-size", "16", "--train.progress", "off", "--train.probe", "false",
            "--model.encoder_options.width", "4", "--output-dir", str(tmp_path / "r")]
    if "--method.warmup_epochs" in FAST.get(method, []):
        args += ["--method.warmup_epochs", "0"]
    elif method in FAST:
        args += FAST[method]
    assert main(args) == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(res["test"]["per_modality"]) <= {"audio", "visual"} and res["dataset"] == "av_digits"
