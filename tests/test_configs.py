"""Every shipped config resolves: valid keys, a registered dataset, and options its method takes."""
from pathlib import Path

import pytest

from mmbalance.config import load_config
from mmbalance.data import list_datasets
from mmbalance.methods import create_method, list_methods

ROOT = Path(__file__).resolve().parents[1]
# run configs (configs/<dataset>/*.yaml); configs/recipes/ holds experiment files (tests/test_recipes.py)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "recipes" not in p.parts)


def test_there_is_a_config_per_dataset_and_method():
    names = {(p.parent.name, p.stem) for p in CONFIGS}
    for ds in ("crema_d", "kinetics_sounds", "ave"):
        for m in list_methods():
            if m == "unimodal":
                assert {(ds, "unimodal_audio"), (ds, "unimodal_visual")} <= names
            else:
                assert (ds, m) in names, (ds, m)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_resolves(path):
    cfg = load_config(path)
    assert cfg.dataset.name in list_datasets()
    assert cfg.dataset.name == path.parent.name
    method = create_method(cfg.method.name, **cfg.method.options)  # raises on an unknown option
    assert method.name == cfg.method.name
    from mmbalance.data import DATASETS
    from mmbalance.options import validate_options

    # every dataset option the file sets is one the dataset takes, with a valid value
    validate_options("dataset", cfg.dataset.name, DATASETS.get(cfg.dataset.name),
                     {k: v for k, v in cfg.dataset.options.items() if v is not None})
    if path.parent.name not in ("crema_d", "kinetics_sounds", "ave"):
        return
    assert cfg.train.epochs == 100 and cfg.train.batch_size == 64
    # the papers' SGD recipe; MIE uses its own lr 1e-2 (methods spec, audio-video)
    assert cfg.optim.lr == pytest.approx(1e-2 if cfg.method.name == "mie" else 1e-3)
