"""mmbalance: imbalanced multimodal learning on one honest engine.

The Python API (loaded on first use, so ``mmbalance --version`` stays fast)::

    import mmbalance
    mmbalance.list_methods()                      # also list_datasets/fusions/encoders
    run = mmbalance.train(method="arl", epochs=5)
    run = mmbalance.load_run("runs/<folder>")     # predict/evaluate without training data
    method = mmbalance.create_method("arl", T=4)
    data = mmbalance.load_dataset("uci_mfeat", modalities=["pix", "fou"])
"""
from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

_API = {"train", "load_run", "load_dataset", "Run", "Prediction", "create_method", "list_methods",
        "list_datasets", "list_fusions", "list_encoders"}
__all__ = sorted(_API | {"__version__"})


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmbalance' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
