"""The generic .npz features format: validation errors (one per bad input) and loading."""
import numpy as np
import pytest

from mmbalance.data import build_dataset
from mmbalance.registry import ConfigError


def good_arrays(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    return {"labels": y, "audio": rng.normal(size=(n, 5)).astype(np.float32),
            "image": rng.normal(size=(n, 2, 3)).astype(np.float32)}


def write(tmp_path, arrays, name="d.npz"):
    p = tmp_path / name
    np.savez(p, **arrays)
    return str(p)


def load(tmp_path, arrays, **kw):
    return build_dataset(write(tmp_path, arrays), **kw)


def test_loads_any_trailing_shape_and_makes_a_stratified_split(tmp_path):
    d = load(tmp_path, good_arrays())
    assert d.modalities == ["audio", "image"]
    assert d.input_shapes == {"audio": (5,), "image": (2, 3)}
    assert d.num_classes == 4
    assert len(d.train) + len(d.val) + len(d.test) == 40
    assert len(d.train) == 24 and len(d.val) == 8 and len(d.test) == 8
    s = d.train[0]
    assert set(s) == {"inputs", "label", "index", "present"}
    assert s["inputs"]["image"].shape == (2, 3)
    # standardised with training statistics only: train mean ~0, std ~1
    tr = d.train.arrays["audio"]
    assert np.allclose(tr.mean(0).numpy(), 0, atol=1e-5)
    assert np.allclose(tr.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    assert not np.allclose(d.test.arrays["audio"].mean(0).numpy(), 0, atol=1e-3)


def test_explicit_split_order_and_missing_masks(tmp_path):
    a = good_arrays()
    split = np.array(["train"] * 30 + ["test"] * 10)
    a["split"] = split
    a["modality_names"] = np.array(["image", "audio"])
    pres = np.ones(40, bool)
    pres[[0, 1]] = False
    a["present_audio"] = pres
    d = load(tmp_path, a)
    assert d.modalities == ["image", "audio"]
    assert len(d.test) == 10 and len(d.train) + len(d.val) == 30 and len(d.val) > 0
    assert d.info["missing"]["audio"] == 2
    allp = np.concatenate([ds.present["audio"].numpy() for ds in (d.train, d.val, d.test)])
    assert allp.sum() == 38


def test_missing_labels(tmp_path):
    a = good_arrays()
    del a["labels"]
    with pytest.raises(ConfigError, match="missing the 'labels' array"):
        load(tmp_path, a)


def test_length_mismatch(tmp_path):
    a = good_arrays()
    a["audio"] = a["audio"][:-3]
    with pytest.raises(ConfigError, match="modality 'audio' has 37 samples but 'labels' has 40"):
        load(tmp_path, a)


def test_non_integer_labels(tmp_path):
    a = good_arrays()
    a["labels"] = a["labels"] + 0.5
    with pytest.raises(ConfigError, match="'labels' must be integers"):
        load(tmp_path, a)
    a["labels"] = np.array(["x"] * 40)
    with pytest.raises(ConfigError, match="'labels' must be integers"):
        load(tmp_path, a)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_values(tmp_path, bad):
    a = good_arrays()
    a["image"][7, 1, 2] = bad
    with pytest.raises(ConfigError, match="modality 'image' has NaN or inf values in 1 sample.*index 7"):
        load(tmp_path, a)


def test_empty_split(tmp_path):
    a = good_arrays()
    a["split"] = np.array(["train"] * 30 + ["val"] * 10)
    with pytest.raises(ConfigError, match="split 'test' is empty"):
        load(tmp_path, a)


def test_modality_with_one_sample(tmp_path):
    a = good_arrays()
    pres = np.zeros(40, bool)
    pres[0] = True
    a["present_audio"] = pres
    a["split"] = np.array(["train"] * 24 + ["val"] * 8 + ["test"] * 8)
    with pytest.raises(ConfigError, match="modality 'audio' has 1 training sample"):
        load(tmp_path, a)
    a = good_arrays()
    a["audio"] = a["audio"][:1]
    with pytest.raises(ConfigError, match="modality 'audio' has 1 samples but 'labels' has 40"):
        load(tmp_path, a)


def test_negative_labels_and_unknown_split_values(tmp_path):
    a = good_arrays()
    a["labels"] = a["labels"] - 1
    with pytest.raises(ConfigError, match=">= 0"):
        load(tmp_path, a)
    a = good_arrays()
    a["split"] = np.array(["train"] * 20 + ["dev"] * 20)
    with pytest.raises(ConfigError, match="'dev'"):
        load(tmp_path, a)


def test_missing_file_and_unknown_modality(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_dataset(str(tmp_path / "nope.npz"))
    with pytest.raises(ConfigError, match="unknown modality"):
        load(tmp_path, good_arrays(), modalities=["audio", "text"])


def test_errors_are_one_line(tmp_path):
    a = good_arrays()
    del a["labels"]
    with pytest.raises(ConfigError) as e:
        load(tmp_path, a)
    assert "\n" not in str(e.value)
