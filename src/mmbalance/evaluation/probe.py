"""Linear probe: how well a frozen encoder's features separate the classes.

A multinomial logistic regression is fitted on the encoder's *training* features (standardised
with training statistics) by full-batch L-BFGS from a zero initialisation — deterministic for
given features — and evaluated on another split's features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, l2: float = 1e-3,
                     max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (weight, bias, mean, std) of a softmax regression fitted on standardised features."""
    x = train_x.double().cpu()
    y = train_y.long().cpu()
    mean = x.mean(0, keepdim=True)
    std = x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                   num_classes: int, l2: float = 1e-3) -> float:
    """Accuracy on (eval_x, eval_y) of a linear probe fitted on (train_x, train_y)."""
    w, b, mean, std = fit_linear_probe(train_x, train_y, num_classes, l2)
    logits = ((eval_x.double().cpu() - mean) / std) @ w + b
    return float((logits.argmax(1) == eval_y.long().cpu()).double().mean())
