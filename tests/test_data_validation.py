"""Bad data is reported in one line before anything is built: the .npz loader, validate_splits
for any DataSplits, and the command line (exit status 2, no traceback)."""

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from helpers import tiny_data
from mmbalance.cli import main
from mmbalance.data import ArrayDataset, DataSplits, build_dataset, validate_splits
from mmbalance.data.features import features_from_arrays
from mmbalance.registry import ConfigError


def arrays(n=40, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"labels": np.arange(n) % classes, "audio": rng.normal(size=(n, 5)).astype(np.float32),
            "image": rng.normal(size=(n, 2, 3)).astype(np.float32)}


def split_array(n=40, train=24, val=8):
    return np.array(["train"] * train + ["val"] * val + ["test"] * (n - train - val))


def with_(**changes):
    a = arrays()
    for k, v in changes.items():
        if v is None:
            a.pop(k)
        else:
            a[k] = v(a) if callable(v) else v
    return a


def raises_one_line(fn, *fragments):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


@pytest.fixture
def logged(warnings_of_mmbalance):
    return warnings_of_mmbalance


# ----------------------------------------------------------------------------- the .npz format
N = 40
BAD_FILES = {
    "single class": (with_(labels=np.zeros(N, int)), ["'labels' hold a single class (0)"]),
    "single class not zero": (with_(labels=np.full(N, 2)), ["single class (2)"]),
    "huge label": (with_(labels=lambda a: np.where(np.arange(N) == 5, 10**12, a["labels"])),
                   ["value 1000000000000", "but only 40 samples", "np.unique"]),
    "uint64 max label": (with_(labels=np.full(N, np.iinfo(np.uint64).max, dtype=np.uint64)), ["but only 40 samples"]),
    "name with a space": (with_(**{"my audio": lambda a: a["audio"]}), ["'my audio' is not a valid identifier"]),
    "name starting with a digit": (with_(**{"1x": lambda a: a["audio"]}), ["'1x' is not a valid identifier"]),
    "dotted name in modality_names": (with_(**{"a.b": lambda a: a["audio"]}, modality_names=np.array(["a.b"])),
                                      ["modality_names", "'a.b' is not a valid identifier"]),
    "zero features": (with_(audio=np.zeros((N, 0), np.float32)), ["modality 'audio' has no features", "(40, 0)"]),
    "zero trailing size": (with_(image=np.zeros((N, 3, 0), np.float32)), ["modality 'image' has no features"]),
    "mask for no modality": (with_(present_text=np.ones(N, bool)),
                             ["'present_text' is a presence mask for modality 'text'", "modalities: audio, image"]),
    "mask not boolean": (with_(present_audio=np.array(["yes"] * N)), ["'present_audio' must be booleans"]),
    "mask of other values": (with_(present_audio=np.full(N, 2)), ["'present_audio' must be booleans", "other values"]),
    "mask wrong length": (with_(present_audio=np.ones(N - 1, bool)), ["'present_audio' must have shape (40,)"]),
    "class only in test": (with_(labels=lambda a: np.where(np.arange(N) >= 32, 4, a["labels"]), split=split_array()),
                           ["class 4 has no training sample"]),
    "classes skipped": (with_(labels=lambda a: a["labels"] * 2), ["'labels' skip classes 1, 3, 5"]),
    "more classes than training samples": (
        with_(labels=np.arange(N) % 20, split=split_array(train=10, val=10)),
        ["20 classes but only 10 training samples"]),
    "modality absent from train": (with_(present_audio=np.arange(N) >= 24, split=split_array()),
                                   ["modality 'audio' has 0 training sample(s) present"]),
    "non-integer float labels": (with_(labels=lambda a: a["labels"] + 0.25), ["'labels' must be integers", "0.25"]),
    "NaN label": (with_(labels=lambda a: np.where(np.arange(N) == 3, np.nan, a["labels"])),
                  ["'labels' has NaN or inf at index 3"]),
    "string labels": (with_(labels=np.array(["cat", "dog"] * 20)), ["'labels' must be integers", "strings"]),
    "0-d labels": (with_(labels=np.array(3)), ["'labels' must be 1-D", "0-d"]),
    "inf feature": (with_(audio=lambda a: np.where(np.arange(N)[:, None] == 9, np.inf, a["audio"])),
                    ["modality 'audio' has NaN or inf values in 1 sample(s), first at index 9"]),
    "beyond float32": (with_(audio=lambda a: np.where(np.arange(N)[:, None] == 2, 1e300, a["audio"].astype(float))),
                       ["beyond the float32 range", "index 2"]),
    "length mismatch": (with_(image=lambda a: a["image"][:-1]), ["modality 'image' has 39 samples but 'labels' has 40"]),
    "split wrong length": (with_(split=split_array()[:-2]), ["'split' must have shape (40,)"]),
    "split numbers": (with_(split=np.zeros(N, int)), ["'split' must hold the strings"]),
    "empty split": (with_(split=split_array(train=30, val=10)), ["split 'test' is empty"]),
    "too few samples to split": (with_(labels=np.array([0, 0, 1, 1]), audio=np.ones((4, 2)), image=None),
                                 ["split 'test' is empty", "automatic stratified split of 4 samples"]),
    "bool features": (with_(audio=np.ones((N, 3), bool)), ["modality 'audio' holds booleans", ".astype(np.float32)"]),
    "string features": (with_(audio=np.array([["x"]] * N)), ["modality 'audio' holds strings"]),
    "complex features": (with_(audio=np.ones((N, 2), np.complex64)), ["complex numbers"]),
    "0-d modality": (with_(audio=np.array(1.5)), ["modality 'audio' is a 0-d array"]),
    "modality_names repeats": (with_(modality_names=np.array(["audio", "audio"])), ["lists ['audio'] more than once"]),
    "modality_names reserved": (with_(modality_names=np.array(["labels"])), ["lists ['labels']"]),
    "no modality": ({"labels": np.arange(N) % 2}, ["no modality arrays"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_npz_is_one_line_naming_the_file(tmp_path, case):
    data, fragments = BAD_FILES[case]
    path = tmp_path / "d.npz"
    np.savez(path, **data)
    msg = raises_one_line(lambda: build_dataset(str(path)), *fragments)
    assert str(path) in msg


def test_object_arrays_and_files_that_are_not_npz(tmp_path):
    p = tmp_path / "obj.npz"
    a = arrays()
    a["audio"] = np.array([object()] * N, dtype=object)
    np.savez(p, **a)
    raises_one_line(lambda: build_dataset(str(p)), str(p), "array 'audio' holds Python objects")
    p = tmp_path / "garbage.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    raises_one_line(lambda: build_dataset(str(p)), str(p), "cannot be read as a .npz file")
    p = tmp_path / "single.npz"
    with open(p, "wb") as f:
        np.save(f, np.ones(3))
    raises_one_line(lambda: build_dataset(str(p)), str(p), "holds a single array")


def test_dataset_options_on_an_npz_file(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays())
    raises_one_line(lambda: build_dataset(str(p), root="/data"), "has no option 'root'",
                    "valid options: modalities, standardize, split_seed, val_fraction")
    raises_one_line(lambda: build_dataset(str(p), val_fraction=1.5), "val_fraction")
    raises_one_line(lambda: build_dataset(str(p), modalities=["audio", "audio"]), "names a modality twice")
    d = build_dataset(str(p), modalities="image", split_seed=3)  # a comma list from the command line
    assert d.modalities == ["image"] and d.info["name"] == "d"


def test_valid_edge_cases_load(tmp_path, logged):
    # bytes in split/modality_names, 0/1 masks, integer features, float labels with integer values
    a = arrays()
    a["split"] = split_array().astype("S5")
    a["modality_names"] = np.array([b"image", b"audio"])
    a["present_audio"] = (np.arange(N) % 5 != 0).astype(np.int8)
    a["image"] = np.arange(N * 6).reshape(N, 2, 3).astype(np.int16)
    a["labels"] = a["labels"].astype(np.float32)
    d = features_from_arrays(a, "x.npz")
    assert d.modalities == ["image", "audio"] and d.num_classes == 4 and d.info["missing"]["audio"] == 8
    # a modality absent from all of val loads, with a warning that its metrics there cannot be computed
    a = arrays()
    a["split"] = split_array()
    a["present_audio"] = ~((np.arange(N) >= 24) & (np.arange(N) < 32))
    validate_splits(features_from_arrays(a, "y.npz"))
    assert any("absent from every sample of the val split" in r.getMessage() for r in logged)


def test_nan_in_an_absent_sample_is_allowed(tmp_path):
    a = arrays()
    a["audio"][3] = np.nan
    pres = np.ones(N, bool)
    pres[3] = False
    a["present_audio"] = pres
    d = features_from_arrays(a, "z.npz")
    assert all(torch.isfinite(ds.arrays["audio"]).all() for ds in (d.train, d.val, d.test))


# ----------------------------------------------------------------------------- validate_splits
def splits(n=24, mods=("a", "b"), C=3, **over):
    d = tiny_data(n=n, mods=mods, n_eval=9)
    for k, v in over.items():
        setattr(d, k, v)
    return d


def test_valid_splits_pass_unchanged():
    d = tiny_data()
    assert validate_splits(d) is d
    validate_splits(build_dataset("uci_mfeat"))


@pytest.mark.parametrize("change, fragments", [
    (dict(num_classes=1), ["has 1 class", "at least 2"]),
    (dict(num_classes=10**12), ["1000000000000 classes but only 24 training samples"]),
    (dict(num_classes=4), ["class 3 has no training sample"]),
    (dict(num_classes=2), ["label 2, outside [0, 2)"]),
    (dict(modalities=["a", "a.b"]), ["'a.b' is not a valid identifier"]),
    (dict(modalities=[]), ["has no modalities"]),
    (dict(input_shapes={"a": (0,), "b": (5,)}), ["modality 'a' has no features"]),
    (dict(input_shapes={"a": (5,)}), ["input_shapes has no entry for modality 'b'"]),
    (dict(input_shapes={"a": (4,), "b": (5,)}), ["modality 'a' of the train split has sample shape (5,)"]),
])
def test_validate_splits_errors(change, fragments):
    raises_one_line(lambda: validate_splits(splits(**change), source="mydata"), "mydata:", *fragments)


def test_validate_splits_on_array_contents(logged):
    y = np.arange(12) % 3
    x = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    ok = ArrayDataset({"a": x, "b": x}, y)

    def make(train=ok, val=ok, test=ok):
        return DataSplits(train=train, val=val, test=test, modalities=["a", "b"], num_classes=3,
                          input_shapes={"a": (5,), "b": (5,)}, default_encoders={})

    empty = ArrayDataset({"a": x[:0], "b": x[:0]}, y[:0])
    raises_one_line(lambda: validate_splits(make(val=empty)), "the val split is empty")
    bad = x.copy()
    bad[4, 1] = np.nan
    raises_one_line(lambda: validate_splits(make(test=ArrayDataset({"a": bad, "b": x}, y))),
                    "modality 'a' has NaN or inf values in 1 sample(s) of the test split")
    one = ArrayDataset({"a": x, "b": x}, y, {"b": np.arange(12) == 0})
    raises_one_line(lambda: validate_splits(make(train=one)), "modality 'b' is present in 1 training sample")
    none = ArrayDataset({"a": x, "b": x}, y, {"b": np.zeros(12, bool)})
    validate_splits(make(test=none))
    assert any("'b' is absent from every sample of the test split" in r.getMessage() for r in logged)
    ds = ArrayDataset({"a": x, "b": x}, y)
    ds.labels = ds.labels.float()
    raises_one_line(lambda: validate_splits(make(train=ds)), "labels of the train split must be integers")
    # ArrayDataset itself refuses inconsistent arrays in one line
    raises_one_line(lambda: ArrayDataset({"a": x}, y, {"c": np.ones(12, bool)}), "present names modality ['c']")
    raises_one_line(lambda: ArrayDataset({"a": x[:5]}, y), "modality 'a' has 5 samples but labels has 12")
    raises_one_line(lambda: ArrayDataset({"a": np.array([["s"]] * 12)}, y), "modality 'a' must be a numeric array")


class Custom(Dataset):
    """A dataset with random augmentation and no labels attribute."""

    def __init__(self, n=12, shape=(5,), fail=False):
        self.n, self.shape, self.fail = n, shape, fail

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.fail:
            raise FileNotFoundError("clip_0.npy\nsecond line")
        x = torch.randn(self.shape) + float(np.random.rand())
        return {"inputs": {"a": x}, "label": torch.tensor(i % 2), "index": torch.tensor(i),
                "present": {"a": torch.tensor(True)}}


def custom_splits(**kw):
    return DataSplits(train=Custom(**kw), val=Custom(), test=Custom(), modalities=["a"], num_classes=2,
                      input_shapes={"a": (5,)}, default_encoders={})


def test_custom_dataset_samples_are_checked_without_touching_the_random_state():
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    validate_splits(custom_splits())
    assert (torch.rand(1), np.random.rand()) == expected
    raises_one_line(lambda: validate_splits(custom_splits(shape=(4,))),
                    "the input of modality 'a' in the train split has shape (4,) but input_shapes says (5,)")
    raises_one_line(lambda: validate_splits(custom_splits(fail=True)),
                    "reading the first sample of the train split failed (FileNotFoundError: clip_0.npy)")


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("case", ["single class", "huge label", "name with a space", "mask for no modality"])
def test_cli_reports_bad_data_in_one_line(tmp_path, capsys, case):
    data, fragments = BAD_FILES[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **data)
    rc = main(["train", "--dataset", str(path), "--epochs", "1", "--output-dir", str(tmp_path / "run"),
               "--train.progress", "off"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmbalance: error:")]
    assert len(lines) == 1 and str(path) in lines[0] and fragments[0] in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was written


def test_cli_dataset_option_on_npz(tmp_path, capsys):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays())
    rc = main(["train", "--dataset", str(path), "--dataset.root", "x", "--epochs", "1",
               "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "has no option 'root'" in err
