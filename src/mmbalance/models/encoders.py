"""Encoder registry and the MLP encoder.

An encoder is an ``nn.Module`` that maps one modality's input batch ``(B, *input_shape)`` to
features ``(B, out_dim)`` and exposes ``out_dim``. A factory is registered by name and called as
``factory(input_shape=..., **options)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..options import Annotated, Interval
from ..registry import ConfigError, Registry, check_options

ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")
register_encoder = ENCODERS.register

_IMPORTED = False


def _import_all() -> None:
    """Every module of ``mmbalance.models`` may register encoders: discovered on first use (a new
    encoder family is one new file; heavy optional dependencies are imported inside factories)."""
    global _IMPORTED
    if _IMPORTED:
        return
    import importlib
    import pkgutil

    from .. import models

    for info in pkgutil.iter_modules(models.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"mmbalance.models.{info.name}")
    _IMPORTED = True


def list_encoders() -> list[str]:
    _import_all()
    return ENCODERS.names()


def create_encoder(name: str, input_shape: Sequence[int], **options: Any) -> nn.Module:
    """Build a registered encoder for inputs of shape ``input_shape`` (no batch axis)."""
    _import_all()
    factory = ENCODERS.get(name)
    options = check_options("encoder", name, factory, options, skip=("input_shape",))
    enc = factory(input_shape=tuple(input_shape), **options)
    if not isinstance(getattr(enc, "out_dim", None), int):
        raise TypeError(f"encoder '{name}' must expose an integer out_dim")
    return enc


class MLPEncoder(nn.Module):
    """Flatten, then Linear -> (BatchNorm) -> ReLU -> Dropout per hidden layer.

    The output is the last hidden layer's activation, so ``out_dim = hidden[-1]``.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.1,
                 batchnorm: bool = False):
        super().__init__()
        if not hidden:
            raise ValueError("mlp encoder needs at least one hidden width")
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, int(h)))
            if batchnorm:
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = int(h)
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_encoder("mlp", summary="multilayer perceptron for feature vectors (hidden widths, dropout, batchnorm)")
def mlp(input_shape: tuple[int, ...], hidden: Sequence[Annotated[int, Interval(1, None)]] = (256, 128),
        dropout: Annotated[float, Interval(0, 1, closed="left")] = 0.1, batchnorm: bool = False) -> nn.Module:
    """An :class:`MLPEncoder` over the flattened input; ``out_dim = hidden[-1]``.

    Options:
        hidden: widths of the hidden layers, at least one (default 256, 128); the last is the feature width.
        dropout: dropout probability after each hidden layer (default 0.1; 0 = none).
        batchnorm: BatchNorm1d after each hidden Linear layer (default False).
    """
    if not hidden:  # a non-empty list: not expressible as a type
        raise ConfigError("encoder 'mlp' option 'hidden' takes at least one width, got []")
    return MLPEncoder(int(math.prod(input_shape)), hidden, dropout, batchnorm)
