"""Opt-in speed options for the encoders and the data loaders (``train.channels_last``,
``train.compile``, ``train.persistent_workers``, ``train.prefetch_factor``).

* :func:`to_channels_last`: the 4-D parameters and buffers of a convolutional encoder (Conv2d
  weights) go to ``torch.channels_last``, 5-D ones (Conv3d weights) to ``torch.channels_last_3d``,
  in place (the ``Parameter`` objects stay the same, so an optimizer built before still holds
  them), and a forward pre-hook gives the encoder its input in the same format: a 4-D image
  batch ``(B, C, H, W)`` as channels_last, a 5-D clip batch ``(B, C, T, H, W)`` as
  channels_last_3d (whose frames ``(B*T, C, H, W)``, after the visual ResNet's
  permute-and-reshape, are then a channels_last view without another copy). The values are the
  same; only the strides change, so state dicts, checkpoints and results are those of the
  default format to float tolerance (convolution kernels sum in another order).
* :func:`compile_encoders`: each encoder compiled in place with :meth:`torch.nn.Module.compile`
  (``torch.compile`` of the module's call, default mode ``"default"`` with the inductor
  backend; not ``"reduce-overhead"``, whose CUDA graphs do not survive the methods that change
  parameters or gradients between steps, nor ``"max-autotune"``, whose compilation takes
  minutes). The module tree is unchanged, so ``state_dict`` keys carry no ``_orig_mod.`` prefix
  and a checkpoint saved from a compiled model loads into an uncompiled one and back. Hooks a
  method registers on encoder *outputs* (ARL, MMPareto) still act; the first call in each mode
  (train / eval) and each new batch shape pays the compilation.
* :func:`prepare_model`: both, as a run's ``train`` section asks (idempotent).
* :func:`loader_options`: ``pin_memory`` (CUDA), ``persistent_workers`` and ``prefetch_factor``
  for ``torch.utils.data.DataLoader``, each only where PyTorch accepts it (with workers).
* :class:`LoaderPool`: persistent workers outlive a pass only if the *same* ``DataLoader`` is
  iterated again, while the trainer builds a new loader for every epoch and evaluation (each
  seeded from ``(seed, epoch)``). The pool keeps such loaders and reseeds them per pass so that a
  pass visits the samples in exactly the order a new loader with that seed would.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch
from torch import nn

__all__ = ["is_conv_encoder", "to_channels_last", "channels_last_tensor", "compile_encoders", "is_compiled",
           "prepare_model", "loader_options", "LoaderPool", "COMPILE_MODE"]

#: the torch.compile mode used for ``train.compile``
COMPILE_MODE = "default"

_CONVS = (nn.Conv2d, nn.Conv3d)


def is_conv_encoder(module: nn.Module) -> bool:
    """True when ``module`` holds a 2-D or 3-D convolution (also inside a frozen pretrained
    network kept outside the module tree as ``module.net``)."""
    mods = list(module.modules())
    net = getattr(module, "net", None)
    if isinstance(net, nn.Module):
        mods += list(net.modules())
    return any(isinstance(m, _CONVS) for m in mods)


def channels_last_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels_last (4-D) or channels_last_3d (5-D) memory format; other tensors as they are."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t


@torch.compiler.disable  # eager: one hook shared by every encoder would make torch.compile recompile it per input rank
def _inputs_channels_last(_module: nn.Module, args: tuple) -> tuple | None:
    if args and torch.is_tensor(args[0]) and args[0].dim() in (4, 5):
        return (channels_last_tensor(args[0]), *args[1:])
    return None


def to_channels_last(module: nn.Module) -> nn.Module:
    """Weights and inputs of ``module`` in the channels_last formats (see the module docstring);
    in place, idempotent; returns ``module``."""
    if getattr(module, "_mmbalance_channels_last", False):
        return module
    module._apply(channels_last_tensor)
    module.register_forward_pre_hook(_inputs_channels_last)
    module._mmbalance_channels_last = True
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_encoders(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile every encoder of a :class:`~mmbalance.models.MultimodalModel` in place
    (:meth:`torch.nn.Module.compile`; ``compile_kwargs`` go to ``torch.compile``, default
    ``mode=COMPILE_MODE``); encoders already compiled are left as they are. Returns ``model``."""
    compile_kwargs.setdefault("mode", COMPILE_MODE)
    for enc in model.encoders.values():
        if not is_compiled(enc):
            enc.compile(**compile_kwargs)
    return model


def prepare_model(model: nn.Module, train_cfg: Any) -> nn.Module:
    """Apply ``train.channels_last`` (convolutional encoders only) and ``train.compile`` to
    ``model`` in place; call it after the model is on its device (before or after the optimizer
    is built: parameters keep their identity). Idempotent. Returns ``model``."""
    if getattr(train_cfg, "channels_last", False):
        for enc in model.encoders.values():
            if is_conv_encoder(enc):
                to_channels_last(enc)
    if getattr(train_cfg, "compile", False):
        compile_encoders(model)
    return model


def loader_options(train_cfg: Any, device: torch.device | str) -> dict[str, Any]:
    """Keyword arguments for ``DataLoader``: ``pin_memory`` on CUDA, ``persistent_workers`` and
    ``prefetch_factor`` as configured when ``num_workers > 0`` (PyTorch refuses them without
    workers), PyTorch's defaults otherwise."""
    workers = int(getattr(train_cfg, "num_workers", 0))
    opts: dict[str, Any] = {"pin_memory": torch.device(device).type == "cuda",
                            "persistent_workers": bool(workers > 0 and getattr(train_cfg, "persistent_workers", False))}
    prefetch = getattr(train_cfg, "prefetch_factor", None)
    if workers > 0 and prefetch is not None:
        opts["prefetch_factor"] = int(prefetch)
    return opts


class LoaderPool:
    """DataLoaders with persistent workers kept for the next pass over the same dataset with the
    same settings (at most ``size``, least recently used shut down first).

    :meth:`get` returns the kept loader reseeded for this pass: its generator is seeded with
    ``seed`` and, when its iterator already exists (a reused iterator does not draw the workers'
    base seed again), one int64 is drawn to stand for that draw, so the shuffle is the
    permutation a new loader seeded with ``seed`` draws; a sampler with a ``seed`` attribute
    (the trainer's sharded sampler) gets ``seed`` too. The workers keep running, so random
    augmentation inside them continues its stream across passes instead of restarting from each
    pass's seed: the samples and their order are those of new loaders, but a run resumed at
    epoch e augments differently from an uninterrupted one.
    """

    def __init__(self, size: int = 4):
        self.size = int(size)
        self._loaders: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, seed: int, build: Callable[[], Any]) -> Any:
        """The loader kept under ``key``, reseeded with ``seed``; else ``build()`` (a loader whose
        generator is already seeded with ``seed``), kept. Put the dataset's ``id`` in ``key``:
        the kept loader holds the dataset, so the id cannot be reused while it is kept."""
        dl = self._loaders.get(key)
        if dl is None:
            dl = self._loaders[key] = build()
            while len(self._loaders) > self.size:
                _, old = self._loaders.popitem(last=False)
                self._shutdown(old)
            return dl
        self._loaders.move_to_end(key)
        dl.generator.manual_seed(int(seed))
        if getattr(dl, "_iterator", None) is not None:
            torch.empty((), dtype=torch.int64).random_(generator=dl.generator)
        if hasattr(dl.sampler, "seed"):
            dl.sampler.seed = int(seed)
        return dl

    @staticmethod
    def _shutdown(dl: Any) -> None:
        it = getattr(dl, "_iterator", None)
        dl._iterator = None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def close(self) -> None:
        """Shut every kept loader's workers down."""
        while self._loaders:
            self._shutdown(self._loaders.popitem()[1])

    def __len__(self) -> int:
        return len(self._loaders)
