"""Probes of a fastai Learner before (or instead of) training: lr_find with its suggestions, the initial
loss and gradient sanity check, and overfitting one batch. Each leaves a report in the run folder."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from fastai.callback.schedule import SuggestionMethod

from flowers_classifier.errors import FlowersError
from flowers_classifier.files import write_json

from .learner import fit_only_callbacks
from .plots import plot_lr_find
from .splitters import stage_start

LR_FIND_METHODS = ("valley", "slide", "minimum", "steep")  # fastai's SuggestionMethod, in plot order


class SanityCheckError(FlowersError, RuntimeError):
    """The model cannot train as set up (non-finite loss, no gradient, cannot overfit one batch)."""


def _finite_or_none(values: Sequence[float]) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in values]  # JSON has no NaN


def find_lr(learn, stage: str, out_dir: str | Path, num_it: int = 100, unfreeze_last: int | None = None) -> dict:
    """fastai's lr_find on `learn` set up for `stage`, with the valley/slide/minimum/steep suggestions.
    Writes lr_find.png and lr_find.json into `out_dir`; weights and optimizer state are restored after."""
    learn.freeze_to(stage_start(learn.model, stage, unfreeze_last))
    # The per-epoch callbacks (best/last checkpoints, early stopping, history) would take the mock fit's
    # epochs for training epochs and the EMA would keep its weights; MixUp/CutMix and gradient clipping
    # stay: they shape the loss being probed.
    methods = tuple(getattr(SuggestionMethod, name.capitalize()) for name in LR_FIND_METHODS)
    with learn.removed_cbs(fit_only_callbacks(learn)):
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
