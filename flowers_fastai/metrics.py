"""Classification metrics and the baselines they are read against, in numpy (no fastai, no torch): what
`evaluate` reports for the exported model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = actual class, column = predicted class."""
    idx = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (precision of a never-predicted class counts as 0, as sklearn's default)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def baselines(counts: Sequence[int], classes: Sequence[str]) -> dict:
    """What a model that ignores the image scores on a set with these class counts.

    majority_class: always the class frequencies as probabilities (the best constant predictor); its
    argmax is the majority class, its loss the entropy of the class distribution. uniform_random: a
    class drawn uniformly at random, or uniform probabilities (loss ln K); its macro-F1 is computed from
    the expected confusion counts (precision = class frequency, recall = 1/K)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("baselines need at least one image")
    prior, k, present = counts / counts.sum(), len(counts), counts > 0
    m = int(counts.argmax())
    uniform_f1 = 2 * prior / (k * prior + 1)  # F1 of precision p and recall 1/K
    return dict(
        majority_class=dict(predicts=classes[m], accuracy=float(prior[m]),
                            macro_f1=float(2 * prior[m] / (1 + prior[m]) / present.sum()),
                            loss=float(-(prior[present] * np.log(prior[present])).sum())),
        uniform_random=dict(accuracy=1.0 / k, macro_f1=float(uniform_f1[present].mean()), loss=math.log(k)))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, cross-entropy (no label smoothing), per-class precision/recall/F1, macro-F1 (over the
    classes present in `y_true`), the confusion matrix and the baselines for the same class counts."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        raise ValueError("no images to evaluate")
    cm = confusion_matrix(y_true, probs.argmax(1), len(classes))
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision, recall = safe_ratio(tp, predicted), safe_ratio(tp, support)
    f1 = safe_ratio(2 * precision * recall, precision + recall)
    loss = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)).mean()
    per_class = {c: dict(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                         support=int(support[i])) for i, c in enumerate(classes)}
    return dict(n_images=int(len(y_true)), accuracy=float(tp.sum() / len(y_true)), loss=float(loss),
                macro_f1=float(f1[support > 0].mean()), per_class=per_class, confusion_matrix=cm.tolist(),
                baselines=baselines(support, classes))
