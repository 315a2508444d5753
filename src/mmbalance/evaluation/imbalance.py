"""Imbalance measures: pure functions of predictions, Shapley values, features and weights.

What each measure is (``mmbalance analyze`` and ``mmbalance diagnose`` report them):

* **error matrix** of two modalities a, b (:func:`error_matrix`): over the samples where both
  are present, the fractions that both classify correctly, only a, only b, neither. ``only a``
  is the share of samples a gets right that b gets wrong: what a knows that b does not.
* **probe gap** (:func:`probe_gap`): a modality's linear-probe accuracy inside a multimodal
  model minus its accuracy in a unimodal reference run; negative = under-learned.
* **contribution** (:func:`contribution_summary`): the mean per-sample Shapley value of each
  modality (:mod:`mmbalance.evaluation.contribution`), its *share* of the total, and the same
  per class.
* **ratio to the largest** (:func:`ratios_to_max`): a per-modality quantity (contribution,
  encoder gradient norm) divided by the largest modality's; 1 for the dominant modality, and
  ``imbalance = min / max`` (:func:`imbalance_ratio`) summarises it in one number.
* **modality gap** (:func:`modality_gap`; the measure of Liang et al., NeurIPS 2022, used by
  MLA, Zhang et al., CVPR 2024, Sec. 3.3.3): the Euclidean distance between the centroids of the
  L2-normalised embeddings of two modalities,
  ``|| mean_i a_i / ||a_i|| - mean_i b_i / ||b_i|| ||_2`` — in [0, 2]; 0 when the two
  modalities' embeddings point, on average, the same way.
* **singular values** of head weight matrices (:func:`singular_values`; MIE, Jiang et al. 2024,
  Table 5): the spectrum of each classifier layer; a modality whose head block has small
  singular values reaches the logits weakly.

>>> import torch
>>> error_matrix(torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([1, 0, 1, 0]).bool(), "a", "b")["only"]
{'a': 0.25, 'b': 0.25}
>>> ratios_to_max({"a": 2.0, "b": 0.5})
{'a': 1.0, 'b': 0.25}
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["error_matrix", "error_matrices", "probe_gap", "contribution_summary", "ratios_to_max",
           "imbalance_ratio", "modality_gap", "modality_gaps", "singular_values", "head_singular_values",
           "pair_key"]


def pair_key(a: str, b: str) -> str:
    """The key of a modality pair in result dicts: ``"a|b"``."""
    return f"{a}|{b}"


def error_matrix(correct_a: Tensor, correct_b: Tensor, a: str, b: str,
                 valid: Tensor | None = None) -> dict[str, Any]:
    """The 2x2 agreement of two modalities' correctness over the ``valid`` samples (default all).

    Returns ``n`` (samples counted), ``both``, ``only`` (``{a: right only by a, b: right only
    by b}``), ``neither`` (fractions of ``n`` summing to 1; None when ``n`` is 0) and ``matrix``
    ``[[both, only a], [only b, neither]]`` (rows: a right / wrong; columns: b right / wrong).
    """
    ca, cb = correct_a.bool().reshape(-1), correct_b.bool().reshape(-1)
    if ca.shape != cb.shape:
        raise ValueError(f"correctness vectors of {a} and {b} differ in length: {ca.numel()} vs {cb.numel()}")
    if valid is not None:
        keep = valid.bool().reshape(-1)
        ca, cb = ca[keep], cb[keep]
    n = int(ca.numel())
    counts = [[int((ca & cb).sum()), int((ca & ~cb).sum())], [int((~ca & cb).sum()), int((~ca & ~cb).sum())]]
    frac = [[c / n if n else None for c in row] for row in counts]
    return {"n": n, "both": frac[0][0], "only": {a: frac[0][1], b: frac[1][0]}, "neither": frac[1][1],
            "matrix": frac, "counts": counts}


def error_matrices(correct: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """:func:`error_matrix` for every pair of modalities (in ``correct``'s order), keyed
    ``"a|b"``; a pair counts only the samples where both modalities are present."""
    out = {}
    for a, b in itertools.combinations(list(correct), 2):
        valid = None
        if present is not None and (a in present or b in present):
            n = correct[a].numel()
            valid = present.get(a, torch.ones(n, dtype=torch.bool)).bool() & \
                present.get(b, torch.ones(n, dtype=torch.bool)).bool()
        out[pair_key(a, b)] = error_matrix(correct[a], correct[b], a, b, valid)
    return out


def probe_gap(model_value: Mapping[str, float | None], reference: Mapping[str, float | None]) -> dict[str, float | None]:
    """``model_value[m] - reference[m]`` per modality of ``model_value`` (None where either is
    missing). With probe accuracies: how far each encoder stays below what its modality reaches
    alone (negative = under-learned)."""
    out: dict[str, float | None] = {}
    for m, v in model_value.items():
        r = reference.get(m)
        out[m] = None if v is None or r is None else float(v) - float(r)
    return out


def ratios_to_max(values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Each value divided by the largest one (None for missing values, or all when the largest
    is not positive)."""
    finite = [float(v) for v in values.values() if v is not None and math.isfinite(v)]
    top = max(finite, default=0.0)
    return {m: (float(v) / top if v is not None and math.isfinite(v) and top > 0 else None) for m, v in values.items()}


def imbalance_ratio(values: Mapping[str, float | None]) -> float | None:
    """``min / max`` of the values (1 = balanced, toward 0 = one modality dominates); None with
    fewer than two values or a non-positive maximum."""
    finite = [float(v) for v in values.values() if v is not None and math.isfinite(v)]
    if len(finite) < 2 or max(finite) <= 0:
        return None
    return min(finite) / max(finite)


def contribution_summary(phi: Tensor, labels: Tensor, modalities: Sequence[str], num_classes: int) -> dict[str, Any]:
    """Summaries of per-sample Shapley contributions ``phi`` (N, M), columns in ``modalities``'
    order: ``mean`` per modality, ``share`` (mean / sum of means; None when the sum is 0),
    ``ratio`` (:func:`ratios_to_max` of the means), ``imbalance`` (:func:`imbalance_ratio`),
    ``per_class`` ``{m: [mean over the samples of class c]}`` (None for a class without samples)
    and ``class_counts``."""
    phi = phi.double().reshape(-1, len(modalities))
    labels = labels.long().reshape(-1)
    if phi.shape[0] != labels.shape[0]:
        raise ValueError(f"phi has {phi.shape[0]} rows, labels {labels.shape[0]}")
    n = phi.shape[0]
    mean = {m: (float(phi[:, i].mean()) if n else None) for i, m in enumerate(modalities)}
    total = sum(v for v in mean.values() if v is not None)
    share = {m: (v / total if v is not None and total != 0 else None) for m, v in mean.items()}
    counts = torch.bincount(labels, minlength=num_classes)[:num_classes]
    per_class: dict[str, list[float | None]] = {}
    for i, m in enumerate(modalities):
        sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, phi[:, i]) if n else \
            torch.zeros(num_classes, dtype=torch.float64)
        per_class[m] = [float(sums[c] / counts[c]) if counts[c] else None for c in range(num_classes)]
    return {"mean": mean, "share": share, "ratio": ratios_to_max(mean), "imbalance": imbalance_ratio(mean),
            "per_class": per_class, "class_counts": [int(c) for c in counts], "n": n}


def modality_gap(a: Tensor, b: Tensor, eps: float = 1e-12) -> float:
    """``|| mean_i a_i/||a_i|| - mean_j b_j/||b_j|| ||_2`` for embeddings ``a`` (N, d) and
    ``b`` (K, d) of two modalities in one space (Liang et al. 2022; MLA Sec. 3.3.3).

    >>> modality_gap(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 3.0]]))  # doctest: +ELLIPSIS
    1.414...
    """
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings of different widths ({a.shape[1]} vs {b.shape[1]}) are not in one space")
    if not a.shape[0] or not b.shape[0]:
        raise ValueError("modality_gap needs at least one embedding of each modality")
    ca = (a / a.norm(dim=1, keepdim=True).clamp_min(eps)).mean(0)
    cb = (b / b.norm(dim=1, keepdim=True).clamp_min(eps)).mean(0)
    return float((ca - cb).norm())


def modality_gaps(embeddings: Mapping[str, Tensor]) -> dict[str, float | None]:
    """:func:`modality_gap` for every pair, keyed ``"a|b"``; None for a pair of different widths
    or without samples."""
    out: dict[str, float | None] = {}
    for a, b in itertools.combinations(list(embeddings), 2):
        try:
            out[pair_key(a, b)] = modality_gap(embeddings[a], embeddings[b])
        except ValueError:
            out[pair_key(a, b)] = None
    return out


def singular_values(weight: Tensor) -> list[float]:
    """Singular values (descending, float64) of a weight matrix (trailing dims flattened)."""
    w = weight.detach().double().cpu()
    w = w.reshape(w.shape[0], -1) if w.dim() != 2 else w
    return [float(s) for s in torch.linalg.svdvals(w)]


def _spectrum(weight: Tensor) -> dict[str, Any]:
    s = singular_values(weight)
    smax, smin = (s[0], s[-1]) if s else (0.0, 0.0)
    return {"shape": list(weight.shape), "singular_values": s,
            "condition": (smax / smin if smin > 0 else None), "frobenius": math.sqrt(sum(x * x for x in s))}


def head_singular_values(head: nn.Module, blocks: Mapping[str, tuple[int, int]] | None = None,
                         block_layer: str | None = None) -> dict[str, dict[str, Any]]:
    """The spectrum (``singular_values``, ``condition`` = largest / smallest, ``frobenius``) of
    every linear layer's weight in ``head`` (keyed by its name in the module, ``"head"`` when
    ``head`` is itself a linear layer). ``blocks`` ``{modality: (start, stop)}`` with
    ``block_layer`` (a layer name) also splits that layer's input columns per modality
    (``"fc[pix]"``): for a concatenation head, the block of the weight that reads each modality."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in head.named_modules():
        if isinstance(mod, nn.Linear):
            out[name or "head"] = _spectrum(mod.weight)
            if blocks and name == block_layer:
                for m, (a, b) in blocks.items():
                    out[f"{name}[{m}]"] = _spectrum(mod.weight[:, a:b])
    return out
