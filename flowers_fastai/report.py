"""Run reports: classification metrics and baselines (numpy), their plots (matplotlib on an Agg canvas),
and the checks that probe a fastai Learner before training: lr_find, the initial loss and gradient
sanity check, and overfitting one batch.

fastai is imported only inside the Learner functions, so `evaluate` (which measures the exported model
through flowers_classifier) uses the metrics and plots without it. Plots are built on
`matplotlib.figure.Figure` with an explicit Agg canvas: no pyplot, no global backend, no display needed.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .files import atomic_write, write_json

LR_FIND_METHODS = ("valley", "slide", "minimum", "steep")  # fastai's SuggestionMethod, in plot order


class SanityCheckError(RuntimeError):
    """The model cannot train as set up (non-finite loss, no gradient, cannot overfit one batch)."""


# --------------------------------------------------------------------------- metrics

def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = actual class, column = predicted class."""
    idx = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
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
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    loss = -np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)).mean()
    per_class = {c: dict(precision=float(precision[i]), recall=float(recall[i]), f1=float(f1[i]),
                         support=int(support[i])) for i, c in enumerate(classes)}
    return dict(n_images=int(len(y_true)), accuracy=float(tp.sum() / len(y_true)), loss=float(loss),
                macro_f1=float(f1[support > 0].mean()), per_class=per_class, confusion_matrix=cm.tolist(),
                baselines=baselines(support, classes))


# --------------------------------------------------------------------------- plots

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
    share = _ratio(cm, cm.sum(1, keepdims=True))
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


# --------------------------------------------------------------------------- learner checks (fastai)

def set_stage(learn, stage: str, unfreeze_last: int | None = None) -> None:
    """Freeze `learn` the way `learner.fine_tune` trains `stage` ("frozen": head only; "unfrozen")."""
    from .models import unfreeze_index
    if stage == "frozen":
        learn.freeze()
    elif stage == "unfrozen" and unfreeze_last is not None:
        learn.freeze_to(unfreeze_index(learn.model, unfreeze_last))
    elif stage == "unfrozen":
        learn.unfreeze()
    else:
        raise ValueError(f"--lr-find-stage must be 'frozen' or 'unfrozen', not {stage!r}")


def _finite_or_none(values: Sequence[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]  # JSON has no NaN


def find_lr(learn, stage: str, out_dir: str | Path, num_it: int = 100, unfreeze_last: int | None = None) -> dict:
    """fastai's lr_find on `learn` set up for `stage`, with the valley/slide/minimum/steep suggestions.
    Writes lr_find.png and lr_find.json into `out_dir`; weights and optimizer state are restored after."""
    from fastai.callback.schedule import SuggestionMethod
    from fastai.callback.tracker import TrackerCallback

    from .learner import EmaCallback, OnTrainedEpochs
    set_stage(learn, stage, unfreeze_last)
    # The per-epoch callbacks (best/last checkpoints, early stopping, history) would take the mock fit's
    # epochs for training epochs and the EMA would keep its weights; MixUp/CutMix and gradient clipping
    # stay: they shape the loss being probed.
    aside = [cb for cb in learn.cbs if isinstance(cb, TrackerCallback | OnTrainedEpochs | EmaCallback)]
    methods = tuple(getattr(SuggestionMethod, name.capitalize()) for name in LR_FIND_METHODS)
    with learn.removed_cbs(aside):
        try:
            found = learn.lr_find(num_it=num_it, show_plot=False, suggest_funcs=methods)
        except (IndexError, ValueError) as e:  # too few steps recorded (few iterations, or an early divergence)
            raise ValueError(f"lr_find could not suggest a learning rate from {len(learn.recorder.lrs)} recorded "
                             f"steps ({type(e).__name__}: {e}); raise --lr-find-iters (default 100), or check the "
                             f"data if the loss diverged early.") from e
    lrs = [float(v) for v in learn.recorder.lrs]
    losses = [float(v) for v in learn.recorder.losses]
    suggestions = {name: float(getattr(found, name)) for name in LR_FIND_METHODS}
    if not all(math.isfinite(v) and v > 0 for v in suggestions.values()):
        raise ValueError(f"lr_find gave unusable suggestions {suggestions}; check the data and the model.")
    result = dict(stage=stage, num_it=num_it, recorded_steps=len(lrs), suggestions=suggestions,
                  lrs=lrs, losses=_finite_or_none(losses))
    out_dir = Path(out_dir)
    write_json(out_dir / "lr_find.json", result)
    plot_lr_find(lrs, losses, suggestions, out_dir / "lr_find.png",
                 title=f"lr_find, {stage} stage ({len(lrs)} steps)")
    return result


def _one_batch(learn, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented training batch as plain tensors, the model moved to its device (as fit would)."""
    xb, yb = learn.dls.train.one_batch()
    xb, yb = xb[:max_images].as_subclass(torch.Tensor), yb[:max_images].as_subclass(torch.Tensor).long()
    learn.model.to(xb.device)
    return xb, yb


def sanity_check(learn, expect_chance: bool = True, max_images: int = 16, tolerance: float = 0.3) -> dict:
    """One forward/backward on a training batch before any step: the loss should be near ln(K) for an
    untrained head (or below it, for a zero-shot head), and the gradient must be finite and non-zero.
    Runs in eval mode and clears the gradients after, so it changes no weight and no running statistic.
    Warns when the loss is off by more than `tolerance` * ln(K); raises SanityCheckError when the loss or
    the gradient cannot train anything."""
    xb, yb = _one_batch(learn, max_images)
    model, was_training = learn.model, learn.model.training
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SanityCheckError("sanity check: no parameter of the model requires grad, so nothing would train; "
                               "check --weights loading and any freezing done before fastai's freeze().")
    model.eval()
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(xb)
        loss = learn.loss_func(out, yb)
        loss.backward()
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    without = sum(1 for p in params if p.grad is None or not bool(p.grad.any()))
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    expected, initial = math.log(out.shape[-1]), float(loss.detach())
    if not math.isfinite(initial):
        raise SanityCheckError(f"sanity check: the initial loss is {initial} on one training batch; the model "
                               f"outputs non-finite values. Check --weights and the input normalisation.")
    if not math.isfinite(grad_norm) or grad_norm == 0:
        raise SanityCheckError(f"sanity check: the gradient norm is {grad_norm} after one backward pass, so "
                               f"nothing would train. Check that the model's parameters require grad.")
    too_high = initial > expected * (1 + tolerance)
    loss_ok = not too_high if not expect_chance else abs(initial - expected) <= tolerance * expected
    if not loss_ok:
        what = "a zero-shot head should start below" if not expect_chance else "an untrained head should start near"
        warnings.warn(f"sanity check: initial loss {initial:.3f} but {what} ln({out.shape[-1]}) = {expected:.3f}; "
                      f"check the labels, the input normalisation and the head initialisation.", stacklevel=2)
    return dict(initial_loss=initial, expected_loss=expected, loss_ok=loss_ok, grad_norm=grad_norm,
                params_with_grad=len(params) - without, params_without_grad=without, batch_size=len(yb))


def overfit_one_batch(learn, lr: float, max_steps: int = 200, target: float = 0.1) -> dict:
    """Train the whole model on one fixed training batch with plain cross-entropy (no label smoothing, no
    MixUp) until its loss is below `target` or `max_steps` steps are done. A pipeline that cannot memorise
    one batch has a bug (labels, preprocessing, frozen weights). Changes the weights: run it, then exit."""
    xb, yb = _one_batch(learn)
    model = learn.model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    for step in range(max_steps + 1):
        loss = F.cross_entropy(model(xb), yb)
        losses.append(float(loss.detach()))
        if losses[-1] < target or step == max_steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model.eval()(xb).argmax(-1) == yb).float().mean())
    return dict(success=losses[-1] < target, steps=step, final_loss=losses[-1], target=target, lr=lr,
                batch_size=len(yb), batch_accuracy=accuracy, losses=_finite_or_none(losses))
