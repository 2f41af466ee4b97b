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


# --------------------------------------------------------------------------- calibration

ECE_BINS = 15  # equal-width confidence bins, the usual choice (Guo et al. 2017)


def reliability_bins(y_true: Sequence[int], probs: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per equal-width bin of the top-class confidence: its lower edge, image count, mean confidence and
    accuracy (NaN for an empty bin). What ECE sums and the reliability diagram draws."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    conf, correct = probs.max(1), (probs.argmax(1) == y_true).astype(np.float64)
    # Bins are (lo, hi]; a confidence of exactly 0 cannot occur (the top class of K gets at least 1/K).
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return dict(lower=np.arange(n_bins) / n_bins, count=count, confidence=mean_conf, accuracy=accuracy)


def calibration_metrics(y_true: Sequence[int], probs: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """ECE (`n_bins` equal-width bins of the top-class confidence: sum over bins of |accuracy - confidence|
    weighted by the bin's share of images), NLL (mean -log p of the true class) and the multi-class Brier
    score (mean over images of the sum over classes of (p - one_hot)^2, in [0, 2])."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    bins = reliability_bins(y_true, probs, n_bins)
    full = bins["count"] > 0
    ece = (bins["count"][full] / len(y_true) * np.abs(bins["accuracy"][full] - bins["confidence"][full])).sum()
    rows = np.arange(len(y_true))
    nll = -np.log(np.clip(probs[rows, y_true], 1e-12, None)).mean()
    one_hot = np.zeros_like(probs)
    one_hot[rows, y_true] = 1.0
    brier = ((probs - one_hot) ** 2).sum(1).mean()
    return dict(ece=float(ece), nll=float(nll), brier=float(brier), ece_bins=n_bins)
