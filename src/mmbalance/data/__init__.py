"""Datasets: the registry, the batch contract, and one module per dataset family.

``build_dataset(name_or_path, **options)`` returns :class:`DataSplits`. A name ending in
``.npz`` (or an existing file) is read with the generic features format.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from ..registry import ConfigError, Registry, check_options
from .base import (ArrayDataset, Batch, DataSplits, check_modality_name, make_sample, stratified_split,
                   validate_splits)

DATASETS: Registry[Callable[..., DataSplits]] = Registry("dataset")
register_dataset = DATASETS.register

# Every module of this package may register datasets: they are discovered on first use (a new
# dataset family is one new file). Heavy optional dependencies are imported inside the builders.
_IMPORTED = False


def _import_all() -> None:
    global _IMPORTED
    if _IMPORTED:
        return
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _IMPORTED = True


def list_datasets() -> list[str]:
    _import_all()
    return DATASETS.names()


def build_dataset(name: str, **options: Any) -> DataSplits:
    """Build a dataset by registry name or from a ``.npz`` features file.

    Options are checked against the builder's signature (an unknown option fails with the list
    of valid ones, for ``.npz`` files too). A ``.npz`` file is fully validated on load; the
    splits of a registered dataset are checked by :func:`validate_splits`, which the trainer
    runs on every dataset before building anything.
    """
    _import_all()
    if name.endswith(".npz") or (os.path.sep in name and os.path.exists(name)):
        from .features import load_features

        # ``name`` is not an option here: dataset.name is the file itself
        options = _checked_options(name, load_features, options, skip=("path", "name"))
        return load_features(name, **options)
    if name.endswith(".mat") and os.path.exists(name):
        from .multiview import multiview_mat

        options = _checked_options(name, multiview_mat, options, skip=("root",))
        return multiview_mat(root=name, **options)
    factory = DATASETS.get(name)
    options = _checked_options(name, factory, options)
    return factory(**options)


def _checked_options(name: str, factory: Callable[..., Any], options: dict[str, Any],
                     skip: tuple[str, ...] = ()) -> dict[str, Any]:
    coerced = check_options("dataset", name, factory, options, skip=skip)
    return dict(coerced) if isinstance(coerced, dict) else dict(options)


__all__ = ["ArrayDataset", "Batch", "DataSplits", "DATASETS", "build_dataset", "check_modality_name",
           "list_datasets", "make_sample", "register_dataset", "stratified_split", "validate_splits",
           "ConfigError"]
