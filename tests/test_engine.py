"""Engine behaviour: seeding, resume, evaluate, results contract, CLI."""
import json
import math

import pytest
import torch

from mmbalance.cli import main
from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.evaluation.metrics import classification_metrics
from mmbalance.evaluation.probe import probe_accuracy

QUICK = ["--epochs", "4", "--train.progress", "off", "--train.eval_batch_size", "512"]


def run_cli(args, capsys=None):
    code = main(["-q", "train", *args])
    return code


def metrics_only(results):
    return {k: results[k] for k in ("val", "test", "best_epoch")}


def check_contract(res):
    for key in ("method", "dataset", "fusion", "seed", "best_epoch", "train_seconds", "test", "val"):
        assert key in res, key
    for split in ("test", "val"):
        r = res[split]
        for k in ("accuracy", "macro_f1", "map"):
            assert 0.0 <= r[k] <= 1.0
        for m, pm in r["per_modality"].items():
            assert 0.0 <= pm["accuracy"] <= 1.0
            assert 0.0 <= pm["probe_accuracy"] <= 1.0


def test_same_seed_same_results_and_contract(tmp_path):
    assert run_cli([*QUICK, "--seed", "3", "--output-dir", str(tmp_path / "a")]) == 0
    assert run_cli([*QUICK, "--seed", "3", "--output-dir", str(tmp_path / "b")]) == 0
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    check_contract(ra)
    assert (ra["method"], ra["dataset"], ra["fusion"], ra["seed"]) == ("joint", "uci_mfeat", "concat", 3)
    assert set(ra["test"]["per_modality"]) == {"pix", "fou"}
    assert metrics_only(ra) == metrics_only(rb)
    # metrics.jsonl: one line per epoch with validation and per-modality metrics
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3, 4]  # 1-based, like best_epoch
    assert 1 <= ra["best_epoch"] <= 4
    assert set(lines[0]["val"]["per_modality"]) == {"pix", "fou"}
    for f in ("config.yaml", "train.log", "best.pt", "last.pt"):
        assert (tmp_path / "a" / f).exists()
    # a different seed gives a different run
    assert run_cli([*QUICK, "--seed", "4", "--output-dir", str(tmp_path / "c")]) == 0
    rc = json.loads((tmp_path / "c" / "results.json").read_text())
    assert metrics_only(rc) != metrics_only(ra)


def test_resume_equals_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = [*QUICK, "--train.probe", "false", "--optim.scheduler", "cosine"]
    assert run_cli([*common, "--output-dir", str(full)]) == 0
    assert run_cli([*common, "--output-dir", str(part), "--train.stop_after_epochs", "2"]) == 0
    assert not (part / "results.json").exists()
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 2
    assert run_cli(["--resume", str(part), "--train.progress", "off"]) == 0
    rf = json.loads((full / "results.json").read_text())
    rp = json.loads((part / "results.json").read_text())
    assert metrics_only(rf) == metrics_only(rp)
    lf = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    lp = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [x["val"] for x in lf] == [x["val"] for x in lp]
    # a resumed run refuses to change what it trains, and a finished run has nothing to resume
    assert main(["-q", "train", "--resume", str(part), "--train.batch_size", "32"]) == 2
    assert main(["-q", "train", "--resume", str(part)]) == 2


def test_evaluate_reproduces_saved_metrics(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_cli([*QUICK, "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", "--run", str(run), "--train.progress", "off"]) == 0
    out = capsys.readouterr().out
    assert "matches results.json" in out
    saved = json.loads((run / "results.json").read_text())
    again = json.loads((run / "evaluation.json").read_text())
    assert again["test"] == saved["test"] and again["val"] == saved["val"]


def test_default_cli_job_on_short_schedule(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "3", "--train.progress", "off"]) == 0
    out = capsys.readouterr().out
    assert "joint + concat on uci_mfeat (pix, fou)" in out
    for word in ("fused", "pix", "fou", "probe_acc", "run folder: runs"):
        assert word in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "results.json").exists()


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_cli([*QUICK, "--epochs", "1", "--output-dir", str(run)]) == 0
    assert run_cli([*QUICK, "--epochs", "1", "--output-dir", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "unknown method 'nope'; valid methods: "),
    (["--fusion", "nope"], "unknown fusion 'nope'; valid fusions: "),
    (["--dataset", "nope"], "unknown dataset 'nope'; valid datasets: "),
    (["--encoder", "nope"], "unknown encoder 'nope'; valid encoders: "),
    (["--optimizer", "nope"], "config key 'optim.name' takes one of 'sgd', 'adam', 'adamw', 'adagrad', got 'nope'"),
    (["--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
    (["--method.bogus", "1"], "method 'joint' has no option 'bogus'"),
])
def test_unknown_names_fail_with_valid_names(tmp_path, capsys, args, needle):
    assert run_cli([*QUICK, "--output-dir", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("methods:", "fusions:", "encoders:", "datasets:", "joint", "unimodal", "concat", "gated",
                 "mlp", "uci_mfeat"):
        assert word in out


def test_config_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.2, name: adam}\ntrain: {epochs: 7}\nmethod: {name: joint, unimodal_weight: 0.5}\n")
    cfg = load_config(str(f), {"optim.lr": 0.3})
    assert cfg.optim.lr == 0.3 and cfg.optim.name == "adam" and cfg.train.epochs == 7
    assert cfg.optim.momentum == 0.9  # default kept
    assert cfg.method.options == {"unimodal_weight": 0.5}


def test_unimodal_trains_one_modality(tmp_path):
    assert run_cli([*QUICK, "--method", "unimodal", "--method.modality", "fou", "--output-dir", str(tmp_path / "u")]) == 0
    r = json.loads((tmp_path / "u" / "results.json").read_text())
    assert r["modalities"] == ["fou"] and list(r["test"]["per_modality"]) == ["fou"]
    assert math.isclose(r["test"]["accuracy"], r["test"]["per_modality"]["fou"]["accuracy"])


def test_three_modalities_and_every_optimizer_and_schedule():
    for opt, sched in (("sgd", "step"), ("adam", "multistep"), ("adamw", "cosine"), ("adagrad", "none")):
        cfg = load_config(None, {"train.epochs": 2, "train.progress": "off", "train.probe": False,
                                 "dataset.modalities": ["pix", "fou", "zer"], "optim.name": opt,
                                 "optim.scheduler": sched, "optim.step_size": 1, "optim.milestones": [1],
                                 "optim.lr": 0.01 if opt != "sgd" else 0.05, "optim.grad_clip": 5.0})
        res = Trainer(cfg).fit()
        assert set(res["test"]["per_modality"]) == {"pix", "fou", "zer"}
        assert res["test"]["accuracy"] > 0.5, (opt, sched)


def test_diverging_loss_gives_one_line_error(tmp_path, capsys):
    code = run_cli([*QUICK, "--lr", "1e12", "--optim.momentum", "0", "--output-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 1 and "training diverged" in err and "lower optim.lr" in err


def test_metrics_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 2])
    m = classification_metrics(logits, y, 3)
    assert m["accuracy"] == pytest.approx(0.5)
    # per-class F1: class0 p=1/2 r=1 -> 2/3; class1 p=1 r=1/2 -> 2/3; class2 p=0 r=0 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_probe_separates_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    centers = torch.randn(4, 8, generator=g) * 5
    x = centers[y] + torch.randn(200, 8, generator=g)
    assert probe_accuracy(x[:100], y[:100], x[100:], y[100:], 4) > 0.95
    noise = torch.randn(200, 8, generator=g)
    assert probe_accuracy(noise[:100], y[:100], noise[100:], y[100:], 4) < 0.5


def test_drop_last_rule_for_one_sample_trailing_batches(monkeypatch):
    """The training loader (and methods' auxiliary loaders) drop a trailing batch of one sample
    (BatchNorm cannot train on it); with two processes each gets n // 2 samples."""
    from helpers import quick_config

    tr = Trainer(quick_config("joint", epochs=1, **{"train.batch_size": 16}))
    assert tr.drop_last_for(49) and tr.drop_last_for(17)
    assert not tr.drop_last_for(48) and not tr.drop_last_for(50)
    monkeypatch.setattr(type(tr), "world_size", property(lambda self: 2))
    # per-process batch 8: 34 or 35 samples -> 17 per process -> a trailing batch of 1; 33 -> 16
    assert tr.drop_last_for(34) and tr.drop_last_for(35)
    assert not tr.drop_last_for(33) and not tr.drop_last_for(36)
    tr.cfg.train.drop_last = True
    assert tr.drop_last_for(32)
