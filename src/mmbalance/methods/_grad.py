"""Gradient helpers shared by methods: scale a gradient in backward only."""
from __future__ import annotations

import torch
from torch import Tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_grad(x: Tensor, scale: float | Tensor) -> Tensor:
    """Identity in forward; multiplies the gradient flowing back through ``x`` by ``scale``.

    ``scale`` is a scalar (or a tensor broadcastable to ``x``), treated as a constant.

    >>> x = torch.ones(3, requires_grad=True)
    >>> scale_grad(x, 2.5).sum().backward()
    >>> x.grad.tolist()
    [2.5, 2.5, 2.5]
    """
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device).detach()
    return _ScaleGrad.apply(x, s)
