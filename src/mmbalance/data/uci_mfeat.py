"""The embedded UCI Multiple Features dataset (handwritten digits, six views).

2,000 digits, 10 classes, 6 views of each digit: fou (76-d Fourier coefficients), fac (216-d
profile correlations), kar (64-d Karhunen-Loeve), pix (240-d pixel averages), zer (47-d
Zernike moments), mor (6-d morphological). Shipped inside the package (built by
``scripts/build_uci_mfeat.py``) with a fixed stratified 60/20/20 split (seed 0).

Source: UCI Machine Learning Repository, "Multiple Features", R.P.W. Duin; licence CC BY 4.0.
See ``ATTRIBUTION.md`` next to the data file.

The views are strongly imbalanced (unimodal accuracy: fac/pix/kar ~0.96, fou/zer ~0.81,
mor ~0.75), so the default pair — the strong ``pix`` and the weak ``fou`` — shows modality
imbalance: joint training leaves the fou encoder under-learned.
"""
from __future__ import annotations

from importlib import resources
from typing import get_args

import numpy as np

from ..options import Literal
from . import register_dataset
from .base import DataSplits
from .features import features_from_arrays

View = Literal["fou", "fac", "kar", "pix", "zer", "mor"]
VIEWS: tuple[str, ...] = get_args(View)
DEFAULT_VIEWS = ("pix", "fou")


def embedded_path() -> str:
    return str(resources.files("mmbalance.data") / "_embedded" / "uci_mfeat.npz")


@register_dataset("uci_mfeat", summary="embedded UCI Multiple Features digits, 6 views (default: pix strong + fou weak)")
def uci_mfeat(modalities: list[View] | None = None, standardize: bool = True) -> DataSplits:
    """Build the embedded dataset; ``modalities`` picks any views (default ``pix, fou``).

    Options:
        modalities: the views to use, in order, any of fou, fac, kar, pix, zer, mor (default ``pix, fou``).
        standardize: standardise each feature with training-split statistics (default True).
    """
    with np.load(embedded_path(), allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    return features_from_arrays(data, "uci_mfeat", list(modalities or DEFAULT_VIEWS), standardize,
                                name="uci_mfeat")
