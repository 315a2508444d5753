"""Classification metrics (torchmetrics): accuracy, macro-F1, mAP (macro average precision)."""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import (multiclass_accuracy, multiclass_average_precision,
                                                    multiclass_f1_score)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``accuracy`` (micro, a fraction), ``macro_f1`` and ``map`` (macro average precision of the
    softmax scores; classes absent from ``labels`` are ignored by torchmetrics' macro average)."""
    logits = logits.float().cpu()
    labels = labels.long().cpu()
    preds = logits.argmax(dim=1)
    acc = multiclass_accuracy(preds, labels, num_classes=num_classes, average="micro")
    f1 = multiclass_f1_score(preds, labels, num_classes=num_classes, average="macro")
    probs = logits.softmax(dim=1)
    ap = multiclass_average_precision(probs, labels, num_classes=num_classes, average="macro")
    return {"accuracy": float(acc), "macro_f1": float(f1), "map": float(ap)}
