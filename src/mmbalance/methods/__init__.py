"""Methods: the registry and one module per method.

``create_method(name, **hyperparameters)``; ``list_methods()``. Each module in this package
registers its method(s) with :func:`register_method`; modules are discovered automatically.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from ..registry import Registry, check_options
from .base import Method, ModelSpec, build_standard_model

METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str, summary: str | None = None):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name, summary)(cls)

    return deco


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


__all__ = ["METHODS", "Method", "ModelSpec", "build_standard_model", "create_method",
           "get_method_class", "list_methods", "register_method"]
