"""Exact Shapley values over modality subsets, for any number of modalities.

Subsets of M modalities are encoded as bit masks 0 .. 2^M - 1 (bit i set = modality i present).
Given the value v(S) of every subset (any trailing shape: per sample, per class logit, ...),

    phi_i = sum_{S not containing i} |S|! (M - |S| - 1)! / M! * (v(S + i) - v(S)).

For integer-valued games (e.g. the correctness game of sample valuation) :func:`shapley_numerators`
gives ``M! * phi`` exactly in integer arithmetic, so the result does not depend on the order of
any floating-point sum (batching, number of processes).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def subset_members(mask: int, M: int) -> list[int]:
    return [i for i in range(M) if mask >> i & 1]


@lru_cache(maxsize=None)
def shapley_matrix(M: int) -> Tensor:
    """(M, 2^M) matrix A with phi = A @ v for values v stacked over subsets (float64)."""
    A = torch.zeros(M, 2**M, dtype=torch.float64)
    fm = math.factorial(M)
    for i in range(M):
        for S in range(2**M):
            if S >> i & 1:
                continue
            s = bin(S).count("1")
            w = math.factorial(s) * math.factorial(M - s - 1) / fm
            A[i, S | (1 << i)] += w
            A[i, S] -= w
    return A


@lru_cache(maxsize=None)
def shapley_integer_matrix(M: int) -> Tensor:
    """(M, 2^M) int64 matrix ``M! * A`` (see :func:`shapley_matrix`): every weight
    ``|S|! (M - |S| - 1)!`` is an integer."""
    A = torch.zeros(M, 2**M, dtype=torch.int64)
    for i in range(M):
        for S in range(2**M):
            if S >> i & 1:
                continue
            s = bin(S).count("1")
            w = math.factorial(s) * math.factorial(M - s - 1)
            A[i, S | (1 << i)] += w
            A[i, S] -= w
    return A


def shapley_numerators(values: Tensor) -> Tensor:
    """``M! * phi`` (int64, shape (M, ...)) for an *integer-valued* game ``values`` (2^M, ...).

    Exact: ``phi = shapley_numerators(v) / M!`` is the correctly rounded Shapley value whatever
    the batch or device, and sums of numerators (e.g. over processes) are exact.

    >>> shapley_numerators(torch.tensor([0, 1, 0, 2])).tolist()   # phi = [1.5, 0.5] times 2!
    [3, 1]
    """
    n = values.shape[0]
    M = n.bit_length() - 1
    if 2**M != n:
        raise ValueError(f"expected 2^M subset values, got {n}")
    v = values.round().to(torch.int64) if values.is_floating_point() else values.to(torch.int64)
    if values.is_floating_point() and not bool((v.to(values.dtype) == values).all()):
        raise ValueError("shapley_numerators needs an integer-valued game")
    return _exact_integer_product(shapley_integer_matrix(M), v.reshape(n, -1)).reshape(M, *values.shape[1:])


def _exact_integer_product(A: Tensor, v: Tensor, float64: bool | None = None) -> Tensor:
    """``A @ v`` for int64 matrices, exactly, on v's device.

    CPU: int64 matmul. Elsewhere (CUDA has no integer matmul): float64 matmul, exact because
    every partial sum is an integer below 2^53 in magnitude (checked: ``sum |A_i| * max |v|``);
    past that bound the product is formed on the CPU. ``float64`` forces the choice (tests).
    """
    use_float = v.device.type != "cpu" if float64 is None else float64
    if use_float:
        bound = int(A.abs().sum(1).max()) * int(v.abs().max()) if v.numel() else 0
        if bound < 2**53:
            return (A.to(device=v.device, dtype=torch.float64) @ v.to(torch.float64)).round().to(torch.int64)
        return (A @ v.cpu()).to(v.device)
    return A.to(v.device) @ v


def shapley_values(values: Tensor) -> Tensor:
    """Shapley values from subset values.

    ``values``: shape (2^M, ...) — v(S) for every subset mask S (values[0] is v(empty)).
    Returns shape (M, ...).
    """
    n = values.shape[0]
    M = n.bit_length() - 1
    if 2**M != n:
        raise ValueError(f"expected 2^M subset values, got {n}")
    A = shapley_matrix(M).to(device=values.device, dtype=values.dtype if values.is_floating_point() else torch.float64)
    return torch.tensordot(A, values.to(A.dtype), dims=([1], [0]))
