"""Every paper recipe (configs/recipes/*.yaml, one experiment file per table) parses, names the
dataset it needs, and runs on the embedded data with a tiny schedule."""
from pathlib import Path

import pytest
import yaml

from mmbalance.cli import main
from mmbalance.experiments.files import load_experiment_file

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "recipes").glob("*.yaml"))
TINY = ["--dataset", "uci_mfeat", "--seeds", "0", "--train.epochs", "1", "--train.probe", "false",
        "--train.progress", "off", "--train.eval_batch_size", "512", "--model.encoder_options.hidden", "[16]"]


def test_there_are_recipes_for_each_paper():
    names = {p.stem.split("_")[0] for p in RECIPES}
    assert {"arl", "mla", "mie", "valuation"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_names_its_dataset_and_runs_tiny(tmp_path, path):
    ef = load_experiment_file(path)
    assert ef.specs and ef.seeds
    text = path.read_text()
    assert "dataset.name" in yaml.safe_load(text)["settings"] and "mmbalance experiment" in text
    argv = ["-q", "experiment", str(path), *TINY, "--output-dir", str(tmp_path / "out")]
    if "modalities" not in text:  # two-modality recipes run on the default views pix, fou
        argv += ["--dataset.modalities", "[pix, fou]"]
    assert main(argv) == 0
    assert (tmp_path / "out" / "summary.json").exists()
