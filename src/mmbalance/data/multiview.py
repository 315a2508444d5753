"""Multi-view feature sets in MATLAB ``.mat`` files: ``caltech101_20`` and ``multiview_mat``.

The layout is the one multi-view learning code shares: a variable ``X``, a cell array of views
(1 x V or V x 1), each a numeric matrix N x d_v (d_v x N is recognised and transposed), and a
variable ``Y`` with the N labels (N x 1 or 1 x N, any integers, e.g. 1..20). ``x_key`` /
``y_key`` name other variables. Both MATLAB file versions are read:

* v5 / v7 (``save -v7``, the default before R2006b and still common): ``scipy.io.loadmat``;
  sparse views are densified.
* v7.3 (``save -v7.3``, HDF5 inside): ``h5py``, an optional dependency
  (``pip install 'mmbalance[mat73]'``, or ``pip install h5py``). MATLAB stores a cell array
  as an array of HDF5 object references into ``#refs#`` and every matrix column-major, so h5py
  sees the transpose; both are undone here.

``views`` picks the views used as modalities, by name or by 1-based position (MATLAB's
``X{1}``): ``--dataset.views hog,gist`` or ``--dataset.views 1,2,3`` (``--modalities`` does the
same). Views are named ``v1 .. vV`` unless ``view_names`` names them; ``caltech101_20`` names
the six standard views of Caltech101-20 (2,386 images, 20 classes: Gabor 48, wavelet moments
40, CENTRIST 254, HOG 1984, GIST 512, LBP 928 dimensions) when the file's dimensions match.
The valuation paper's supplement reports Caltech101-20 with 2, 3, 4 and 5 views.

The views become a features dataset (:func:`mmbalance.data.features.features_from_arrays`):
standardised with training statistics (``standardize``), a fixed stratified 60/20/20
train/validation/test split (``split_seed``; the files carry no split), MLP encoders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..registry import ConfigError
from . import register_dataset
from .base import DataSplits
from .features import features_from_arrays

__all__ = ["read_mat", "read_multiview", "select_views", "multiview_dataset", "CALTECH101_20_VIEWS"]

CALTECH101_20_VIEWS = {"gabor": 48, "wm": 40, "centrist": 254, "hog": 1984, "gist": 512, "lbp": 928}
LAYOUT = "a cell array X of views (each N x d) and labels Y (N x 1)"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_v73(path: Path) -> bool:
    """MATLAB v7.3 files are HDF5 with a 512-byte user block (the signature sits at 0 or 512)."""
    with open(path, "rb") as f:
        head = f.read(520)
    return head[:8] == _HDF5_SIGNATURE or head[512:520] == _HDF5_SIGNATURE


def read_mat(path: str | Path, x_key: str = "X", y_key: str = "Y") -> tuple[list[np.ndarray], np.ndarray]:
    """Read ``(views, labels)`` from a v5/v7 or v7.3 ``.mat`` file; views as stored (2-D each)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: no such .mat file")
    if _is_v73(p):
        return _read_v73(p, x_key, y_key)
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(p), squeeze_me=False, struct_as_record=True)
    except NotImplementedError:  # scipy's answer to v7.3 files it did not recognise above
        return _read_v73(p, x_key, y_key)
    except Exception as e:  # noqa: BLE001 - not a MAT-file, truncated
        raise ConfigError(f"{path}: cannot be read as a MATLAB .mat file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    names = sorted(k for k in mat if not k.startswith("__"))
    for k in (x_key, y_key):
        if k not in mat:
            raise ConfigError(f"{path}: no variable '{k}' (variables: {', '.join(names) or 'none'}); expected "
                              f"{LAYOUT} (other names: --dataset.x_key / --dataset.y_key)")
    x = mat[x_key]
    if not (isinstance(x, np.ndarray) and x.dtype == object):
        raise ConfigError(f"{path}: '{x_key}' is a {getattr(x, 'dtype', type(x).__name__)} array of shape "
                          f"{getattr(x, 'shape', '?')}, not a cell array of views; expected {LAYOUT}")
    views = []
    for k, v in enumerate(x.reshape(-1, order="F")):
        if hasattr(v, "toarray"):  # scipy.sparse
            v = v.toarray()
        views.append(_matrix(v, f"{path}: {x_key}{{{k + 1}}}"))
    return views, _labels_vector(mat[y_key], f"{path}: '{y_key}'")


def _read_v73(p: Path, x_key: str, y_key: str) -> tuple[list[np.ndarray], np.ndarray]:
    try:
        import h5py
    except ImportError:
        raise ConfigError(f"{p} is a MATLAB v7.3 (HDF5) file; reading it needs h5py: "
                          "pip install 'mmbalance[mat73]' (or pip install h5py), or re-save it with save -v7") from None
    try:
        f = h5py.File(str(p), "r")
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{p}: cannot be read as a MATLAB v7.3 (HDF5) file ({type(e).__name__})") from None
    with f:
        names = sorted(k for k in f.keys() if not k.startswith("#"))
        for k in (x_key, y_key):
            if k not in f:
                raise ConfigError(f"{p}: no variable '{k}' (variables: {', '.join(names) or 'none'}); expected "
                                  f"{LAYOUT} (other names: --dataset.x_key / --dataset.y_key)")
        x = f[x_key]
        if not isinstance(x, h5py.Dataset) or x.dtype != h5py.ref_dtype:
            raise ConfigError(f"{p}: '{x_key}' is not a cell array of views (MATLAB class "
                              f"{_matlab_class(x)}); expected {LAYOUT}")
        views = []
        # h5py shows MATLAB's (1, V) cell as (V, 1): cell k is element k in column-major order
        for k, ref in enumerate(np.asarray(x[()]).T.reshape(-1, order="F")):
            obj = f[ref]
            if not isinstance(obj, h5py.Dataset):
                raise ConfigError(f"{p}: {x_key}{{{k + 1}}} is not a matrix (a MATLAB {_matlab_class(obj)}); "
                                  f"expected {LAYOUT}")
            if obj.attrs.get("MATLAB_sparse") is not None:
                raise ConfigError(f"{p}: {x_key}{{{k + 1}}} is a sparse matrix, which v7.3 files store in a form "
                                  "this reader does not unpack; save the views as full() matrices")
            views.append(_matrix(np.asarray(obj[()]).T, f"{p}: {x_key}{{{k + 1}}}"))
        y = f[y_key]
        if not isinstance(y, h5py.Dataset):
            raise ConfigError(f"{p}: '{y_key}' is not a numeric array; expected {LAYOUT}")
        return views, _labels_vector(np.asarray(y[()]).T, f"{p}: '{y_key}'")


def _matlab_class(obj: Any) -> str:
    c = getattr(obj, "attrs", {}).get("MATLAB_class", b"?")
    return c.decode() if isinstance(c, bytes) else str(c)


def _matrix(v: Any, where: str) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind not in "biuf" or a.ndim != 2:
        raise ConfigError(f"{where} must be a numeric matrix (N x d), got {a.dtype} of shape {a.shape}; expected {LAYOUT}")
    return a


def _labels_vector(v: Any, where: str) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind not in "biuf" or a.ndim > 2 or (a.ndim == 2 and min(a.shape) != 1):
        raise ConfigError(f"{where} must be a label vector (N x 1), got {a.dtype} of shape {a.shape}")
    return a.reshape(-1)


def read_multiview(path: str | Path, x_key: str = "X", y_key: str = "Y") -> tuple[list[np.ndarray], np.ndarray]:
    """Views oriented samples-first (N, d_v) and labels (N,) from a ``.mat`` file."""
    views, y = read_mat(path, x_key, y_key)
    n = len(y)
    out = []
    for k, v in enumerate(views):
        if v.shape[0] == n:
            out.append(v)
        elif v.shape[1] == n:
            out.append(v.T)
        else:
            raise ConfigError(f"{path}: {x_key}{{{k + 1}}} has shape {v.shape} but {y_key} has {n} labels; each view "
                              f"must be N x d (or d x N)")
    if not out:
        raise ConfigError(f"{path}: '{x_key}' holds no views; expected {LAYOUT}")
    return out, y


def select_views(names: Sequence[str], views: Sequence[Any] | None) -> list[int]:
    """Positions of the chosen views: names, or 1-based positions (``"2"``, ``2``).

    >>> select_views(["v1", "v2", "v3"], ["3", "v1"])
    [2, 0]
    """
    if views is None:
        return list(range(len(names)))
    out = []
    for v in views:
        s = str(v).strip()
        if s in names:
            out.append(names.index(s))
        elif s.isdigit() and 1 <= int(s) <= len(names):
            out.append(int(s) - 1)
        else:
            raise ConfigError(f"unknown view {v!r}; views: {', '.join(names)} (or positions 1..{len(names)})")
    if not out:
        raise ConfigError("views names no view; give at least one")
    if len(set(out)) != len(out):
        raise ConfigError(f"views names a view twice: {list(views)}")
    return out


def multiview_dataset(name: str, path: Path, views: Sequence[Any] | None, view_names: Sequence[str] | None,
                      x_key: str, y_key: str, standardize: bool, split_seed: int, default_names=None) -> DataSplits:
    arrays, y = read_multiview(path, x_key, y_key)
    if view_names is not None:
        if len(view_names) != len(arrays):
            raise ConfigError(f"view_names has {len(view_names)} names but {path} has {len(arrays)} views")
        names = [str(n) for n in view_names]
    elif default_names is not None and [a.shape[1] for a in arrays] == list(default_names.values()):
        names = list(default_names)
    else:
        names = [f"v{k + 1}" for k in range(len(arrays))]
    bad = [n for n in names if not n.isidentifier() or n in ("labels", "split", "modality_names")
           or n.startswith("present_")]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"view_names must be distinct identifiers other than labels/split/modality_names/present_*, "
                          f"got {names}")
    picked = select_views(names, views)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise ConfigError(f"{path}: '{y_key}' has NaN or inf labels")
    classes, labels = np.unique(y, return_inverse=True)
    data = {names[k]: arrays[k] for k in picked}
    data["labels"] = labels.astype(np.int64)
    splits = features_from_arrays(data, str(path), [names[k] for k in picked], standardize, split_seed, 0.2, name)
    splits.class_names = [str(int(c)) if float(c).is_integer() else str(c) for c in classes]
    splits.info.update({"file": str(path), "views": {names[k]: int(arrays[k].shape[1]) for k in picked},
                        "all_views": names})
    return splits


def _pick(views: list[str] | None, modalities: list[str] | None) -> list[str] | None:
    if views is not None and modalities is not None and list(views) != list(modalities):
        raise ConfigError(f"views {list(views)} and modalities {list(modalities)} disagree; give one of them")
    return views if views is not None else modalities


def _file(dataset: str, root: str | None, default: str) -> Path:
    if not root:
        raise ConfigError(f"{dataset} needs the option root: a .mat file holding {LAYOUT} (or a folder with "
                          f"{default}); pass --dataset.root PATH")
    r = Path(root).expanduser()
    if r.is_dir():
        if (r / default).is_file():
            return r / default
        mats = sorted(p.name for p in r.glob("*.mat"))
        raise ConfigError(f"{dataset}: {root} has no {default}" + (f" (it has {', '.join(mats[:5])}: pass the file "
                          "as --dataset.root)" if mats else "") + f"; expected {LAYOUT}")
    if not r.is_file():
        raise ConfigError(f"{dataset} root {root} is neither a .mat file nor a folder")
    return r


@register_dataset("caltech101_20", summary="Caltech101-20 multi-view features (20 classes, up to 6 views) from a .mat file (v5 or v7.3)")
def caltech101_20(root: str | None = None, views: list[str] | None = None, modalities: list[str] | None = None,
                  standardize: bool = True, split_seed: int = 0, x_key: str = "X", y_key: str = "Y") -> DataSplits:
    """Caltech101-20 (2,386 images, 20 classes) in the multi-view layout (X cell of views, Y labels).

    Options:
        root: the .mat file, or a folder holding Caltech101-20.mat.
        views: the views to use, by name (gabor, wm, centrist, hog, gist, lbp) or 1-based position; default all.
        modalities: the same as views (what --modalities sets).
        standardize: standardise each feature with training statistics.
        split_seed: seed of the stratified 60/20/20 train/validation/test split.
        x_key: the variable holding the cell array of views.
        y_key: the variable holding the labels.
    """
    path = _file("caltech101_20", root, "Caltech101-20.mat")
    return multiview_dataset("caltech101_20", path, _pick(views, modalities), None, x_key, y_key, standardize,
                             split_seed, CALTECH101_20_VIEWS)


@register_dataset("multiview_mat", summary="any multi-view .mat file (X cell of views + Y labels), v5 or v7.3; views picked by name or position")
def multiview_mat(root: str | None = None, views: list[str] | None = None, modalities: list[str] | None = None,
                  view_names: list[str] | None = None, standardize: bool = True, split_seed: int = 0,
                  x_key: str = "X", y_key: str = "Y") -> DataSplits:
    """A multi-view .mat file: X (cell of N x d views) and Y (N labels).

    Options:
        root: the .mat file.
        views: the views to use, by name (v1, v2, ... or view_names) or 1-based position; default all.
        modalities: the same as views (what --modalities sets).
        view_names: a name per view, in the file's order (default v1 .. vV).
        standardize: standardise each feature with training statistics.
        split_seed: seed of the stratified 60/20/20 train/validation/test split.
        x_key: the variable holding the cell array of views.
        y_key: the variable holding the labels.
    """
    path = _file("multiview_mat", root, "data.mat")
    name = path.stem if path.stem.isidentifier() else "multiview_mat"
    return multiview_dataset(name, path, _pick(views, modalities), view_names, x_key, y_key, standardize, split_seed)
