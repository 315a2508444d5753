"""Methods: the registry and one module per method.

``create_method(name, **hyperparameters)``; ``list_methods()``. Each module in this package
registers its method(s) with :func:`register_method`; modules are discovered automatically.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from ..registry import Registry, check_options
from .base import Method, ModelSpec, build_standard_model

METHODS: Registry[type[Method]] = Registry("method")


CATEGORIES = ("baseline", "data", "feed-forward", "objective", "optimisation")


def register_method(name: str, summary: str | None = None, *, paper: str | None = None, venue: str | None = None,
                    year: int | None = None, category: str | None = None):
    """Class decorator: register a :class:`Method` subclass under ``name``, with the metadata
    ``mmbalance list methods`` shows: the paper (authors and title), venue and year, and the
    category in the field's usual taxonomy (``data`` / ``feed-forward`` / ``objective`` /
    ``optimisation``; ``baseline`` for the references)."""
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"method {name}: category must be one of {CATEGORIES}, got {category!r}")

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        cls.paper, cls.venue, cls.year, cls.category = paper, venue, year, category
        return METHODS.register(name, summary)(cls)

    return deco


def method_metadata(name: str) -> dict[str, object]:
    """Paper, venue, year, category and the measured step cost relative to ``joint``
    (``benchmarks/results/step_cost_cpu.csv``, written by ``benchmarks/step_cost.py``; None
    when not measured)."""
    cls = get_method_class(name)
    return {"paper": cls.paper, "venue": cls.venue, "year": cls.year, "category": cls.category,
            "step_cost": _step_costs().get(name)}


@functools.lru_cache(maxsize=1)
def _step_costs() -> dict[str, float]:
    import csv
    from importlib import resources

    try:
        text = (resources.files(__name__) / "step_cost.csv").read_text()
    except (FileNotFoundError, OSError):
        return {}
    return {r["method"]: float(r["relative_step_time"]) for r in csv.DictReader(text.splitlines())
            if r.get("relative_step_time")}


_IMPORTED = False


def _import_all() -> None:
    global _IMPORTED
    if _IMPORTED:
        return
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _IMPORTED = True


def list_methods() -> list[str]:
    _import_all()
    return METHODS.names()


def get_method_class(name: str) -> type[Method]:
    _import_all()
    return METHODS.get(name)


def create_method(name: str, **hyperparameters: Any) -> Method:
    cls = get_method_class(name)
    return cls(**check_options("method", name, cls, hyperparameters))


__all__ = ["CATEGORIES", "METHODS", "Method", "ModelSpec", "build_standard_model", "create_method",
           "get_method_class", "list_methods", "method_metadata", "register_method"]
