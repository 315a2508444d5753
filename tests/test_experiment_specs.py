"""Experiment specs are validated before anything runs, without loading data; the experiment CLI
stands on its own; the Python API."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmbalance.cli import main
from mmbalance.config import config_fingerprint, load_config
from mmbalance.experiments import RunSpec, plan_experiment, resolve_config, run_experiment
from mmbalance.experiments.cli import parse_flags, parse_seeds
from mmbalance.methods import list_methods
from mmbalance.registry import ConfigError

TINY = {"train.epochs": 2, "train.probe": False, "train.progress": "off"}
TINY_FLAGS = ["--train.epochs", "2", "--train.probe", "false", "--train.progress", "off"]


@pytest.mark.parametrize("spec, extra, message", [
    ("nosuch", [], "unknown method 'nosuch'"),
    ("arl:nosuch=1", [], "method 'arl' has no option 'nosuch'"),
    ("arl:T=abc", [], "method 'arl' option 'T' takes a number"),
    ("joint:dataset.name=nosuch", [], "unknown dataset 'nosuch'"),
    ("joint:dataset.name=missing.npz", [], "dataset file not found: missing.npz"),
    ("joint:dataset.nosuch=1", [], "dataset 'uci_mfeat' has no option 'nosuch'"),
    ("joint:train.nosuch=1", [], "unknown config key 'train.nosuch'"),
    ("joint:model.fusion=nosuch", [], "unknown fusion 'nosuch'"),
    ("joint:model.fusion_options={nosuch: 1}", [], "fusion 'concat' has no option 'nosuch'"),
    ("joint:optim.name=nosuch", [], "optim.name"),
    ("joint:name=arl", [], "sets 'name'"),
    ("joint:train.seed=3", [], "choose seeds with --seeds"),
])
def test_a_bad_spec_fails_before_any_run_folder_is_created(tmp_path, capsys, spec, extra, message):
    out = tmp_path / "exp"
    rc = main(["-q", "experiment", "--runs", "joint", spec, "--seeds", "0,1", "--output-dir", str(out),
               *TINY_FLAGS, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err and f"run spec '{spec}'" in err
    assert not out.exists()  # not even the experiment folder: the good spec 'joint' did not run


@pytest.mark.parametrize("flags, message", [
    (["--train.nosuch", "1"], "unknown config key 'train.nosuch'"),
    (["--seed", "3"], "choose seeds with --seeds"),
    (["--method", "arl"], "choose methods with --runs"),
    (["--seeds", "0,x"], "--seeds takes comma-separated integers"),
    (["--jobs", "0"], "--jobs takes a positive integer"),
    (["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_experiment_flags_fail_in_one_line(tmp_path, capsys, flags, message):
    out = tmp_path / "exp"
    assert main(["-q", "experiment", "--runs", "joint", "--output-dir", str(out), *TINY_FLAGS, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_planning_loads_no_data(tmp_path, monkeypatch):
    path = tmp_path / "d.npz"
    np.savez(path, labels=np.arange(30) % 3, a=np.zeros((30, 2)), b=np.ones((30, 2)))

    def forbidden(*a, **k):
        raise AssertionError("data loaded while validating")

    monkeypatch.setattr(np, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    plan = plan_experiment(["joint", "arl:T=2", "uni=unimodal:modality=fou"], [0, 1], tmp_path / "exp",
                           overrides=TINY)
    assert [(r.spec.label, r.seed, r.action) for r in plan][:3] == [("joint", 0, "new"), ("joint", 1, "new"),
                                                                    ("arl-T=2", 0, "new")]
    plan_experiment(["joint"], [0], tmp_path / "exp2", overrides={**TINY, "dataset.name": str(path)})
    assert not (tmp_path / "exp").exists()


@pytest.fixture(scope="module")
def embedded():
    from mmbalance.data import build_dataset

    return build_dataset("uci_mfeat")


@pytest.mark.parametrize("method", list_methods())
def test_resolution_without_data_is_what_the_trainer_writes(method, embedded, tmp_path):
    """The experiment recognises a run folder by this equality: a method that filled a
    hyperparameter from the data would make every rerun look like other settings."""
    from mmbalance.engine import Trainer

    cfg = load_config(None, {**TINY, "method.name": method})
    try:
        trainer = Trainer(cfg, None, data=embedded)
    except ConfigError as e:  # a method that needs other data (e.g. specific encoders)
        pytest.skip(str(e))
    trainer.method.modalities(list(embedded.modalities))  # what the data may resolve
    assert config_fingerprint(resolve_config(cfg)) == config_fingerprint(trainer.resolved_config())


def test_a_run_of_a_default_resolved_from_data_is_reused(tmp_path):
    out = tmp_path / "exp"
    run_experiment(["unimodal"], [0], out, overrides=TINY)  # modality: the dataset's first
    plan = plan_experiment(["unimodal"], [0], out, overrides=TINY)
    assert plan[0].action == "reuse"


def test_python_api_runs_plans_and_continues(tmp_path):
    out = tmp_path / "exp"
    summary = run_experiment([RunSpec.parse("joint"), "j-half=joint:unimodal_weight=0.5"], [0], out,
                             overrides=TINY)
    assert [r["label"] for r in summary["rows"]] == ["joint", "j-half"] and summary["unfinished"] == []
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rows"][1]["runs"] == ["j-half/seed0"]
    assert on_disk["rows"][0]["accuracy"]["std"] is None  # one seed: no std, not a fake 0
    assert not (out / "command.txt").exists()  # no command given
    assert [r.action for r in plan_experiment(["joint", "j-half=joint:unimodal_weight=0.5"], [0, 1], out,
                                              overrides=TINY)] == ["reuse", "new", "reuse", "new"]
    # a run folder that saved no epoch (killed during the first) is simply started again
    (out / "joint" / "seed0" / "results.json").unlink()
    (out / "joint" / "seed0" / "last.pt").unlink()
    plan = plan_experiment(["joint"], [0], out, overrides=TINY)
    assert plan[0].action == "discard"
    run_experiment(["joint"], [0], out, overrides=TINY, command="mmbalance experiment --runs joint")
    assert json.loads((out / "joint" / "seed0" / "results.json").read_text())["epochs"] == 2
    assert (out / "command.txt").read_text() == "mmbalance experiment --runs joint\n"
    assert [r["label"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["joint"]


def test_dry_run_shows_the_plan_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "--dry-run", "--runs", "joint", "--seeds", "0,1", "--output-dir", str(out),
                 *TINY_FLAGS]) == 0
    text = capsys.readouterr().out
    assert f"{out / 'joint' / 'seed0'}: train" in text and f"{out / 'joint' / 'seed1'}: train" in text
    assert not out.exists()


def test_spec_parsing_and_flags():
    s = RunSpec.parse("m=joint:dataset.modalities=[pix,fou],unimodal_weight=0.5")
    assert (s.label, s.method) == ("m", "joint")
    assert s.options == {"dataset.modalities": ["pix", "fou"], "unimodal_weight": 0.5}
    assert RunSpec.parse("a/b=joint").label == "a_b"
    for bad, msg in [("..=joint", "cannot name a folder"), ("_replaced=joint", "cannot name a folder"),
                     ("joint:a=1,a=2", "sets option 'a' twice"), ("j=:a=1", "names no method")]:
        with pytest.raises(ConfigError, match=msg):
            RunSpec.parse(bad)
    assert parse_flags(["--epochs", "3", "--modalities", "pix,fou", "--optim.lr=0.1"]) == {
        "train.epochs": 3, "dataset.modalities": ["pix", "fou"], "optim.lr": 0.1}
    assert parse_seeds("0, 2,") == [0, 2]


def test_the_experiment_cli_does_not_import_the_main_cli():
    code = ("import sys, mmbalance.experiments.cli, mmbalance.experiments; "
            "assert 'mmbalance.cli' not in sys.modules, 'imports the main CLI'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
