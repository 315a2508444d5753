"""The generic .npz features format: validation errors (one per bad input) and loading."""
import numpy as np
import pytest
import torch

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


def test_options_are_typed_in_one_place(tmp_path):
    from mmbalance.data.features import features_from_arrays

    a = good_arrays()
    # a direct call checks the same declared types and ranges as the config layer does for a file
    for bad, msg in ((dict(val_fraction=0.0), "'val_fraction' takes a number in (0, 1), got 0.0"),
                     (dict(split_seed=-1), "'split_seed' takes an integer >= 0, got -1"),
                     (dict(standardize="perhaps"), "'standardize' takes true/false, got 'perhaps'")):
        with pytest.raises(ConfigError) as e:
            features_from_arrays(a, "p.npz", **bad)
        assert str(e.value) == f"dataset 'p.npz' option {msg}"
        p = write(tmp_path, a)
        with pytest.raises(ConfigError) as e:
            build_dataset(str(p), **bad)
        assert str(e.value) == f"dataset '{p}' option {msg}"
    with pytest.raises(ConfigError, match="^p.npz: option modalities names a modality twice"):
        features_from_arrays(a, "p.npz", modalities=["audio", "audio"])
    # numpy scalars and command-line strings are coerced, not refused
    d = features_from_arrays(a, "p.npz", modalities="image", standardize=np.bool_(False), split_seed=np.int64(2),
                             val_fraction="0.25")
    assert d.modalities == ["image"]
    same = features_from_arrays(a, "p.npz", modalities=["image"], standardize=False, split_seed=2, val_fraction=0.25)
    assert torch.equal(d.train.arrays["image"], same.train.arrays["image"])
    off = features_from_arrays(a, "p.npz", modalities="image", standardize="false")
    assert not torch.equal(off.train.arrays["image"], features_from_arrays(a, "p.npz", modalities="image").train.arrays["image"])


def test_errors_are_one_line(tmp_path):
    a = good_arrays()
    del a["labels"]
    with pytest.raises(ConfigError) as e:
        load(tmp_path, a)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- property-based
# Whatever arrays a file holds, loading gives valid splits or one ConfigError line, never any
# other exception.
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from mmbalance.data import DataSplits, validate_splits  # noqa: E402
from mmbalance.data.features import features_from_arrays  # noqa: E402

NAMES = ["a", "b", "img", "a b", "1x", "_z"]
DTYPES = [np.float32, np.float64, np.int64, np.uint8, np.int8, np.bool_, np.complex64, "U3"]
PROPERTY = settings(max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def values(dtype):
    if np.dtype(dtype).kind == "f":
        return st.one_of(st.floats(-5, 5, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 1e30, 0.0]))
    if np.dtype(dtype).kind in "iu":
        return st.integers(0, 5)
    return None


@st.composite
def any_array(draw, length, dtypes=DTYPES, max_dims=2):
    dtype = draw(st.sampled_from(dtypes))
    shape = (length,) + tuple(draw(st.lists(st.integers(0, 3), max_size=max_dims)))
    if draw(st.integers(0, 9)) == 0:
        shape = ()
    return draw(hnp.arrays(dtype, shape, elements=values(dtype)))


@st.composite
def npz_contents(draw):
    """A mostly valid file (so every stage of loading is reached) with 0-3 random faults."""
    n = draw(st.integers(4, 14))
    data = {"labels": np.arange(n) % draw(st.integers(2, 3))}
    mods = draw(st.lists(st.sampled_from(["a", "b", "img"]), min_size=1, max_size=3, unique=True))
    finite = st.floats(-3, 3, width=32)
    for m in mods:
        data[m] = draw(hnp.arrays(np.float32, (n, *draw(st.lists(st.integers(1, 3), max_size=2))), elements=finite))
        if draw(st.booleans()):
            data[f"present_{m}"] = draw(hnp.arrays(np.bool_, (n,)))
    if draw(st.booleans()):
        data["split"] = draw(hnp.arrays("U5", (n,), elements=st.sampled_from(["train", "val", "test"])))
    if draw(st.integers(0, 3)) == 0:
        data["modality_names"] = np.array(draw(st.permutations(mods)))

    def length():
        return n if draw(st.booleans()) else draw(st.integers(0, 15))

    for fault in draw(st.lists(st.integers(0, 11), max_size=3)):
        key = draw(st.sampled_from(sorted(data) or ["labels"]))
        data.setdefault(key, np.arange(n) % 2)
        if fault == 0:  # any array, any dtype and shape, in place of one
            data[key] = draw(any_array(length()))
        elif fault == 1:
            data["labels"] = draw(hnp.arrays(np.int64, (length(),), elements=st.integers(-1, 6)))
        elif fault == 2:
            data["labels"] = draw(hnp.arrays(np.float64, (n,), elements=st.sampled_from([0, 1, 2, 0.5, np.nan])))
        elif fault == 3:
            del data[key]
        elif fault == 4:  # a modality with an invalid or new name
            data[draw(st.sampled_from(NAMES))] = draw(any_array(n))
        elif fault == 5:
            data[f"present_{draw(st.sampled_from(NAMES + ['zz']))}"] = draw(
                any_array(length(), [np.bool_, np.int8, np.float32, "U3"], max_dims=0))
        elif fault == 6 and data[key].dtype.kind == "f" and data[key].size:  # non-finite or huge values
            a = data[key].astype(np.float64)
            a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, 1e39, 1e300]))
            data[key] = a
        elif fault == 7:
            data["split"] = draw(hnp.arrays("U5", (length(),), elements=st.sampled_from(["train", "val", "test", "dev"])))
        elif fault == 8:
            data["modality_names"] = np.array(draw(st.lists(st.sampled_from(NAMES + ["labels"]), max_size=3)),
                                              dtype="U6")
        elif fault == 9 and key.startswith("present_"):  # a modality absent from most samples
            data[key] = np.arange(n) < draw(st.integers(0, 3))
        elif fault == 10:
            data["labels"] = np.full(n, draw(st.integers(0, 2)))
        elif fault == 11:  # a huge class index
            data["labels"] = np.where(np.arange(n) == 0, draw(st.sampled_from([10**9, 2**62])), np.arange(n) % 2)
    options = draw(st.fixed_dictionaries({}, optional={
        "modalities": st.lists(st.sampled_from(NAMES), max_size=2),
        "standardize": st.booleans(), "split_seed": st.integers(0, 3),
        "val_fraction": st.sampled_from([0.2, 0.2, 0.5, 0.0])}))
    return data, options


def check_outcome(load):
    try:
        d = load()
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return None
    assert isinstance(d, DataSplits)
    validate_splits(d)
    assert d.num_classes >= 2 and min(len(d.train), len(d.val), len(d.test)) >= 1
    for ds in (d.train, d.val, d.test):
        for m in d.modalities:
            assert ds.arrays[m].dtype == torch.float32 and torch.isfinite(ds.arrays[m]).all()
            assert tuple(ds.arrays[m].shape[1:]) == d.input_shapes[m]
    return d


@PROPERTY
@given(npz_contents())
def test_any_arrays_give_valid_splits_or_one_config_error(contents):
    data, options = contents
    d = check_outcome(lambda: features_from_arrays(data, "p.npz", **options))
    if d is not None:
        assert len(d.train) + len(d.val) + len(d.test) == len(data["labels"])


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(npz_contents(), st.sampled_from(["whole", "truncated", "garbage"]))
def test_any_npz_file_loads_or_fails_in_one_line(tmp_path, contents, damage):
    data, options = contents
    p = tmp_path / "p.npz"
    np.savez(p, **data)
    if damage == "truncated":
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])
    elif damage == "garbage":
        p.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    options.pop("val_fraction", None)
    check_outcome(lambda: build_dataset(str(p), **options))
