"""Report plots: lr_find curve, confusion matrix, image grids (top losses), training curves and an
experiment's summary (accuracy per configuration over seeds).

Built on `matplotlib.figure.Figure` with an explicit Agg canvas: no pyplot, no global backend, no display
needed; every PNG is written atomically.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flowers_classifier.files import atomic_write

from .metrics import safe_ratio


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestions: dict[str, float],
                 path: str | Path, title: str = "lr_find", skip_end: int = 5) -> Path:
    """Smoothed loss vs learning rate (log x) with each suggestion marked on the curve and labelled."""
    lrs, losses = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if skip_end and len(lrs) > skip_end:  # the last steps blow up and would squash the curve (as fastai)
        lrs, losses = lrs[:-skip_end], losses[:-skip_end]
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    ax.plot(lrs, losses, color="tab:blue", lw=1.5, label="smoothed train loss")
    finite = np.isfinite(losses)
    colors = ("tab:orange", "tab:green", "tab:red", "tab:purple")
    for i, ((name, lr), marker, color) in enumerate(zip(suggestions.items(), "osD^", colors, strict=False)):
        loss = np.interp(np.log10(lr), np.log10(lrs[finite]), losses[finite])
        ax.plot([lr], [loss], marker, ms=9, color=color, label=f"{name}: {lr:.2e}")
        ax.axvline(lr, color=color, ls=":", lw=1)
        # Names on staggered rows at the top: suggestions often sit close together on the curve.
        ax.text(lr, 0.97 - 0.06 * i, f" {name}", color=color, fontsize=9, va="top",
                transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Counts in every cell, colour = share of the actual class (row), so small classes read as well."""
    cm = np.asarray(cm)
    share = safe_ratio(cm, cm.sum(1, keepdims=True))
    fig = _figure(5.6, 5)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=11,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} images)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the actual class")
    return _save(fig, path)


def plot_image_grid(images: Sequence, titles: Sequence[str], path: str | Path, suptitle: str = "",
                    cols: int = 3) -> Path:
    """PIL images in a grid, one small title each (used for the top losses)."""
    rows = max(1, math.ceil(len(images) / cols))
    fig = _figure(3.2 * cols, 3.4 * rows)
    for i, (img, text) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(img))
        ax.set_title(text, fontsize=8)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)


def read_history(path: str | Path) -> list[dict]:
    """history.csv rows (HistoryCallback's columns) with numbers as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    numeric = ("epoch", "train_loss", "valid_loss", "accuracy", "lr")
    return [{k: (float(v) if k in numeric else v) for k, v in row.items()} for row in rows]


def plot_curves(history_path: str | Path, path: str | Path) -> Path | None:
    """Train/valid loss and valid accuracy per epoch from history.csv; None when it holds no epoch."""
    rows = read_history(history_path)
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
    ax_loss.plot(epochs, [r["valid_loss"] for r in rows], "o-", label="valid loss")
    ax_acc.plot(epochs, [r["accuracy"] for r in rows], "o-", color="tab:green", label="valid accuracy")
    for prev, row in zip(rows, rows[1:], strict=False):
        if row["stage"] != prev["stage"]:  # where the frozen (head only) stage hands over to the full model
            for ax in (ax_loss, ax_acc):
                ax.axvline(row["epoch"] - 0.5, ls="--", color="gray", label=f"start of {row['stage']} stage")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9)
    return _save(fig, path)


def plot_reliability(panels: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Reliability diagram, one panel per probability set (e.g. raw and calibrated): per confidence bin
    (metrics.reliability_bins) the accuracy as a bar, the bin's mean confidence as a red tick (a calibrated
    model has them meet on the diagonal), its image count above the bar, ECE and NLL in the panel title."""
    fig = _figure(5 * len(panels), 4.6)
    for i, (name, p) in enumerate(panels.items()):
        bins, ax = p["bins"], fig.add_subplot(1, len(panels), i + 1)
        width, full = 1 / len(bins["count"]), np.asarray(bins["count"]) > 0
        lower, count = np.asarray(bins["lower"])[full], np.asarray(bins["count"])[full]
        accuracy, confidence = np.asarray(bins["accuracy"])[full], np.asarray(bins["confidence"])[full]
        ax.bar(lower, accuracy, width=width, align="edge", color="tab:blue", alpha=0.8, edgecolor="black", lw=0.5,
               label="accuracy in the bin")
        ax.hlines(confidence, lower, lower + width, color="tab:red", lw=2.5, label="mean confidence in the bin")
        for x, acc, n in zip(lower, accuracy, count, strict=True):
            ax.text(x + width / 2, min(acc, 0.93) + 0.02, f"{int(n)}", ha="center", fontsize=7)
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("confidence (top-class probability); numbers: images per bin")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {p['ece']:.3f}, NLL {p['nll']:.3f}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_wise_ft(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Valid accuracy, NLL and ECE against the WiSE-FT alpha (0 = zero-shot, 1 = fine-tuned)."""
    alphas = [r["alpha"] for r in rows]
    fig = _figure(12, 3.8)
    for i, (key, label) in enumerate((("accuracy", "valid accuracy"), ("nll", "valid NLL"), ("ece", "valid ECE"))):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(alphas, [r[key] for r in rows], "o-")
        ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_experiment_summary(configs: Sequence[str], means: Sequence[float], stds: Sequence[float],
                            seeds: dict[str, Sequence[float]], path: str | Path,
                            title: str = "best valid accuracy per configuration") -> Path:
    """One row per configuration (in the order given, first on top): mean ± std as a diamond with error bar,
    and each seed's value as a dot, so the spread between seeds shows next to the differences."""
    fig = _figure(7, 1.4 + 0.45 * len(configs))
    ax = fig.add_subplot()
    rows = np.arange(len(configs))[::-1]
    for row, config in zip(rows, configs, strict=True):
        values = np.asarray(seeds[config], dtype=np.float64) * 100
        ax.plot(values, np.full(len(values), row), "o", color="tab:gray", ms=5, alpha=0.7,
                label="one seed" if row == rows[0] else None)
    ax.errorbar(np.asarray(means) * 100, rows, xerr=np.asarray(stds) * 100, fmt="D", color="tab:blue",
                capsize=4, label="mean ± std over seeds")
    ax.set_yticks(rows, configs)
    ax.set_ylim(rows.min() - 0.6, rows.max() + 0.6)
    ax.margins(x=0.08)
    ax.set_xlabel("valid accuracy %")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2)
    return _save(fig, path)
