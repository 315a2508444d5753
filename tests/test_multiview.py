"""Multi-view .mat datasets: v5 (scipy) and v7.3 (HDF5, as MATLAB writes it) read alike, view
picking, label remapping, one-line errors, and one epoch of joint and ARL from the CLI."""
import json
import sys

import numpy as np
import pytest
import scipy.io

from mmbalance.cli import main
from mmbalance.data import build_dataset
from mmbalance.data.multiview import CALTECH101_20_VIEWS, read_multiview, select_views
from mmbalance.registry import ConfigError

DIMS = (5, 3, 4)


def make_views(n=60, dims=DIMS, classes=(1, 2, 3), seed=0):
    """Views N x d whose first feature carries the label (so views are learnable), labels 1..C."""
    rng = np.random.default_rng(seed)
    y = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.float64)
    views = []
    for d in dims:
        v = rng.standard_normal((n, d))
        v[:, 0] += 2.0 * y
        views.append(v)
    return views, y


def save_v5(path, views, y, transpose=False, x_key="X", y_key="Y"):
    cell = np.empty((1, len(views)), dtype=object)
    for k, v in enumerate(views):
        cell[0, k] = v.T if transpose else v
    scipy.io.savemat(str(path), {x_key: cell, y_key: y.reshape(-1, 1)})
    return path


def save_v73(path, views, y):
    """A MATLAB v7.3 file: HDF5 with the 512-byte MATLAB header, the cell X as object references
    into #refs#, every matrix stored column-major (h5py sees the transpose)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(str(path), "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        cell = np.empty((len(views), 1), dtype=h5py.ref_dtype)  # MATLAB 1 x V -> h5py (V, 1)
        for k, v in enumerate(views):
            ds = refs.create_dataset(f"v{k}", data=np.asarray(v, dtype=np.float64).T)
            ds.attrs["MATLAB_class"] = np.bytes_(b"double")
            cell[k, 0] = ds.ref
        x = f.create_dataset("X", data=cell)
        x.attrs["MATLAB_class"] = np.bytes_(b"cell")
        yd = f.create_dataset("Y", data=np.asarray(y, dtype=np.float64).reshape(1, -1))
        yd.attrs["MATLAB_class"] = np.bytes_(b"double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM")
    return path


def test_v5_files_read_samples_first_in_either_orientation(tmp_path):
    views, y = make_views()
    a = read_multiview(save_v5(tmp_path / "a.mat", views, y))
    b = read_multiview(save_v5(tmp_path / "b.mat", views, y, transpose=True))  # d x N views
    for got in (a, b):
        assert [v.shape for v in got[0]] == [(60, d) for d in DIMS]
        for v, ref in zip(got[0], views):
            np.testing.assert_array_equal(v, ref)
        np.testing.assert_array_equal(got[1], y)


def test_v73_file_reads_like_v5(tmp_path):
    views, y = make_views()
    c = read_multiview(save_v73(tmp_path / "c.mat", views, y))  # skipped without h5py (the mat73 extra)
    d = build_dataset("multiview_mat", root=str(tmp_path / "c.mat"), views=["v2"])
    assert d.modalities == ["v2"] and d.num_classes == 3
    for got in (c,):
        assert [v.shape for v in got[0]] == [(60, d) for d in DIMS]
        for v, ref in zip(got[0], views):
            np.testing.assert_array_equal(v, ref)
        np.testing.assert_array_equal(got[1], y)


def test_dataset_views_labels_and_split(tmp_path):
    views, y = make_views(classes=(3, 7, 11))
    path = save_v5(tmp_path / "mv.mat", views, y)
    d = build_dataset("multiview_mat", root=str(path))
    assert d.modalities == ["v1", "v2", "v3"] and d.num_classes == 3
    assert d.class_names == ["3", "7", "11"]  # labels remapped to 0..C-1 in sorted order
    assert d.input_shapes == {"v1": (5,), "v2": (3,), "v3": (4,)}
    assert (len(d.train), len(d.val), len(d.test)) == (36, 12, 12)  # stratified 60/20/20
    assert d.default_encoders == {"v1": "mlp", "v2": "mlp", "v3": "mlp"}
    # the label is recoverable from the first feature of v1 (standardised, monotone in the label)
    x0 = d.train.arrays["v1"][:, 0].numpy()
    lab = d.train.labels.numpy()
    assert x0[lab == 0].mean() < x0[lab == 1].mean() < x0[lab == 2].mean()
    assert abs(float(d.train.arrays["v2"].mean())) < 1e-5  # standardised with training statistics
    two = build_dataset("multiview_mat", root=str(path), views=["3", "v1"])
    assert two.modalities == ["v3", "v1"]
    same = build_dataset("multiview_mat", root=str(path), modalities=["v3", "v1"])
    assert same.modalities == ["v3", "v1"]
    named = build_dataset("multiview_mat", root=str(path), view_names=["a", "b", "c"], views=["b", "1"])
    assert named.modalities == ["b", "a"]
    assert select_views(["a", "b"], None) == [0, 1]
    with pytest.raises(ConfigError, match=r"unknown view 'v9'; views: v1, v2, v3"):
        build_dataset("multiview_mat", root=str(path), views=["v9"])
    with pytest.raises(ConfigError, match="disagree"):
        build_dataset("multiview_mat", root=str(path), views=["v1"], modalities=["v2"])
    with pytest.raises(ConfigError, match="twice"):
        build_dataset("multiview_mat", root=str(path), views=["1", "v1"])


def test_caltech101_20_names_its_views_by_dimension(tmp_path):
    views, y = make_views(n=40, dims=tuple(CALTECH101_20_VIEWS.values()), classes=(1, 2))
    (tmp_path / "cal").mkdir()
    save_v5(tmp_path / "cal" / "Caltech101-20.mat", views, y)
    d = build_dataset("caltech101_20", root=str(tmp_path / "cal"), views=["hog", "2", "gist"])
    assert d.modalities == ["hog", "wm", "gist"]
    assert d.input_shapes == {"hog": (1984,), "wm": (40,), "gist": (512,)}
    assert d.info["all_views"] == list(CALTECH101_20_VIEWS)
    # a file whose dimensions differ keeps the generic names
    v2, y2 = make_views(n=40)
    save_v5(tmp_path / "other.mat", v2, y2)
    assert build_dataset("caltech101_20", root=str(tmp_path / "other.mat")).modalities == ["v1", "v2", "v3"]


def test_one_line_errors(tmp_path, monkeypatch):
    views, y = make_views()
    path = save_v5(tmp_path / "keys.mat", views, y, x_key="data", y_key="truth")
    with pytest.raises(ConfigError, match=r"no variable 'X' \(variables: data, truth\); expected a cell array X of views"):
        build_dataset("multiview_mat", root=str(path))
    ok = build_dataset("multiview_mat", root=str(path), x_key="data", y_key="truth")
    assert ok.modalities == ["v1", "v2", "v3"]
    scipy.io.savemat(str(tmp_path / "notcell.mat"), {"X": np.ones((60, 4)), "Y": y.reshape(-1, 1)})
    with pytest.raises(ConfigError, match="not a cell array of views"):
        build_dataset("multiview_mat", root=str(tmp_path / "notcell.mat"))
    bad = [views[0], np.ones((7, 3))]
    save_v5(tmp_path / "shape.mat", bad, y)
    with pytest.raises(ConfigError, match=r"X\{2\} has shape \(7, 3\) but Y has 60 labels"):
        build_dataset("multiview_mat", root=str(tmp_path / "shape.mat"))
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ConfigError, match="cannot be read as a MATLAB .mat file"):
        build_dataset("multiview_mat", root=str(tmp_path / "junk.mat"))
    with pytest.raises(ConfigError, match="needs the option root"):
        build_dataset("caltech101_20")
    with pytest.raises(ConfigError, match="has no Caltech101-20.mat"):
        build_dataset("caltech101_20", root=str(tmp_path))
    with pytest.raises(ConfigError, match="view_names must be distinct identifiers"):
        build_dataset("multiview_mat", root=str(tmp_path / "keys.mat"), x_key="data", y_key="truth",
                      view_names=["a", "labels", "c"])
    v73 = tmp_path / "v73.mat"  # what MATLAB's save -v7.3 starts with: a 512-byte header, then HDF5
    v73.write_bytes(b"MATLAB 7.3 MAT-file".ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + bytes(64))
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    with pytest.raises(ConfigError, match=r"MATLAB v7.3 \(HDF5\) file; reading it needs h5py: pip install 'mmbalance\[mat73\]'"):
        build_dataset("multiview_mat", root=str(v73))


@pytest.mark.parametrize("method", ["joint", "arl"])
def test_one_epoch_from_the_cli(tmp_path, method):
    views, y = make_views(n=60)
    path = save_v5(tmp_path / "mv.mat", views, y)
    out = tmp_path / "run"
    args = ["-q", "train", "--dataset", "multiview_mat", "--dataset.root", str(path), "--dataset.views", "1,3",
            "--method", method, "--epochs", "1", "--batch-size", "16", "--train.progress", "off",
            "--train.probe", "false", "--output-dir", str(out)]
    if method == "arl":
        args += ["--method.warmup_epochs", "0"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and set(res["test"]["per_modality"]) == {"v1", "v3"}
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    if method == "arl":
        diag = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["diagnostics"]
        assert diag  # ARL's coefficients were computed on these views


def test_caltech_configs_build_and_run(tmp_path):
    from pathlib import Path

    from mmbalance.config import load_config

    views, y = make_views(n=40, dims=tuple(CALTECH101_20_VIEWS.values()), classes=(1, 2))
    save_v5(tmp_path / "Caltech101-20.mat", views, y)
    configs = Path(__file__).resolve().parents[1] / "configs" / "caltech101_20"
    for p in sorted(configs.glob("*.yaml")):
        cfg = load_config(p, {"dataset.root": str(tmp_path)})
        assert build_dataset(cfg.dataset.name, **cfg.dataset.options).modalities == list(CALTECH101_20_VIEWS)
    out = tmp_path / "run"
    assert main(["-q", "train", "--config", str(configs / "sample_valuation.yaml"), "--dataset.root", str(tmp_path),
                 "--dataset.views", "gabor,wm,centrist", "--method.warmup_epochs", "0", "--epochs", "1",
                 "--batch-size", "8", "--train.progress", "off", "--train.probe", "false", "--output-dir", str(out)]) == 0
    assert set(json.loads((out / "results.json").read_text())["test"]["per_modality"]) == {"gabor", "wm", "centrist"}
