"""Learner construction, the callbacks our recipe adds to fastai's, and the two-stage fine-tune.

The recipe is fastai's own machinery: AdamW (decoupled weight decay) + label smoothing, MixUp/CutMix,
GradientClip, EarlyStopping, best-checkpoint saving on valid accuracy, one-cycle (cosine with warmup)
schedules, MixedPrecision (fp16/bf16 on CUDA, bf16 on the CPU), and discriminative learning rates
through the splitter from `splitters.param_groups`. The only loop here is fastai's.
"""

from __future__ import annotations

import csv
import functools
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from fastai.callback import schedule  # noqa: F401 - adds lr_find and fit_one_cycle to Learner
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastai.callback.mixup import CutMix, MixHandler, MixUp
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback, TrackerCallback
from fastai.learner import Learner, Recorder
from fastai.losses import LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy
from fastai.optimizer import Adam, Optimizer
from fastai.torch_core import get_model, set_seed
from fastcore.foundation import L
from fastcore.xtras import join_path_file
from torch.distributions.beta import Beta

from flowers_classifier.files import atomic_write
from flowers_classifier.model import ClipClassifier

from . import splitters
from .distributed import is_main, on_main, read_on_main, world_size
from .export import BEST_NAME
from .recipes import PRESETS, SHARED

LAST_NAME = "last"  # run_dir/last.pth: weights + optimizer after the last finished epoch (--resume)
TENSORBOARD_DIR = "tensorboard"  # run_dir/tensorboard: event files with --tensorboard


_CNN = PRESETS["cnn"]


@dataclass
class Recipe:
    """Everything that shapes optimisation. Field defaults are the CNN preset (recipes.py, the one source of
    defaults); `train.py` fills a Recipe from the preset of its --arch, and from scratch with --no-pretrained."""

    epochs: int = _CNN["epochs"]
    freeze_epochs: int = _CNN["freeze_epochs"]  # linear probe epochs (head only) before unfreezing
    head_lr: float = _CNN["head_lr"]            # stage 1 LR of the head
    lr: float = _CNN["lr"]                      # stage 2 LR of the head group; the body gets less (lr_mult)
    lr_mult: float = _CNN["lr_mult"]            # stage 2: lr(first group) = lr / lr_mult, geometric in between
    unfreeze_last: int | None = None            # stage 2 trains only the last K blocks/stages (+ all above them)
    pct_start: float = _CNN["pct_start"]        # one-cycle warmup fraction
    wd: float = _CNN["wd"]
    label_smoothing: float = _CNN["label_smoothing"]
    mixup: float = _CNN["mixup"]                # Beta alpha, 0 disables
    cutmix: float = _CNN["cutmix"]              # Beta alpha, 0 disables
    mix_prob: float = _CNN["mix_prob"]          # probability a batch is mixed at all
    switch_prob: float = _CNN["switch_prob"]    # with both on: probability of CutMix rather than MixUp
    grad_clip: float | None = _CNN["grad_clip"]
    patience: int | None = _CNN["patience"]     # early stopping on valid accuracy, per stage
    ema_decay: float | None = _CNN["ema"] or None  # timm ModelEmaV3 decay, None disables
    precision: str = _CNN["precision"]          # auto (fp16 on CUDA, fp32 on CPU), fp16 (CUDA), bf16, fp32
    channels_last: bool | None = None           # None: on CUDA for the ConvNeXt (tensor cores want NHWC), off on CPU
    seed: int = _CNN["seed"]


def seed_everything(seed: int, deterministic: bool = SHARED["deterministic"]) -> None:
    """Seed Python, NumPy and torch (fastai's set_seed): the split, init, augmentation and batch order repeat.
    By default cuDNN benchmarks its kernels and keeps the fastest (fastai's and timm's default), so two GPU
    runs agree only up to rounding. `deterministic`: bit-reproducible on one machine instead, slower on a
    GPU: cuDNN's deterministic kernels, benchmark off, and torch's deterministic algorithms (an op that has
    none warns). Both ways set every flag, so runs in one process (experiments.py) do not inherit them."""
    set_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:  # cuBLAS is deterministic only with a fixed workspace; read before the first matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def resolve_precision(precision: str) -> str:
    """auto: fp16 on CUDA, fp32 on the CPU. bf16 runs on either (CPU autocast is bf16 autocast). fp16 needs
    CUDA: CPUs without AVX512-FP16 have no fast fp16 kernels, and its GradScaler would only add work there."""
    if precision not in ("auto", "fp16", "bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}")
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 (mixed precision) needs a CUDA GPU; on the CPU use --precision bf16 "
                         "(--bf16, bf16 autocast) or --precision fp32.")
    if precision == "bf16" and torch.cuda.is_available():
        check_cuda_bf16()
    return precision


def check_cuda_bf16() -> None:
    """Refuse bf16 on a GPU without bfloat16 hardware (compute capability < 8.0: T4, V100). There torch's
    is_bf16_supported() still says True, as it can emulate bf16, but training would crawl."""
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError("--precision bf16 (--bf16): this GPU has no bfloat16 hardware (it needs compute "
                         "capability 8.0+, e.g. A100, L4, H100), so torch would only emulate it, far slower than "
                         "fp16; use --precision fp16 (or auto).")


# --------------------------------------------------------------------------- callbacks

class DeviceMixedPrecision(MixedPrecision):
    """fastai's MixedPrecision (autocast around forward and loss, fp32 weights, GradScaler for fp16) on the
    device the model sits on. fastai 2.8 hard-codes autocast('cuda') and GradScaler('cuda'): on the CPU they
    only warn and disable themselves, so a CPU run would train in fp32 while claiming bf16. Only before_fit
    differs; on CUDA it builds what fastai's does."""

    def before_fit(self):
        dtype = torch.bfloat16 if self.amp_mode == AMPMode.BF16 else torch.float16
        device = next(self.model.parameters()).device.type  # TrainEvalCallback (order -10) has moved it
        if device == "cuda" and dtype == torch.bfloat16:
            check_cuda_bf16()
        self.kwargs["enabled"] = dtype == torch.float16  # bf16 has fp32's range: no loss scaling
        self.autocast, self.learn.scaler, self.scales = (torch.autocast(device, dtype=dtype),
                                                         torch.amp.GradScaler(device, **self.kwargs), L())


class MixUpOrCutMix(MixHandler):
    """MixUp and CutMix in one run, timm-style: a batch is mixed with probability `prob`, by CutMix
    with probability `switch_prob` (when both are on). Delegates to fastai's own MixUp/CutMix."""

    rand_bbox = CutMix.rand_bbox

    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5):
        super().__init__()
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixUpOrCutMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        beta = lambda a: Beta(torch.tensor(float(a)), torch.tensor(float(a))) if a > 0 else None  # noqa: E731
        self.mixup_distrib, self.cutmix_distrib = beta(mixup_alpha), beta(cutmix_alpha)
        self.prob, self.switch_prob = prob, switch_prob

    def before_batch(self):
        if random.random() >= self.prob:
            self.lam, self.yb1 = 1.0, self.yb  # lerp(.., .., 1.0) = the plain loss
            return
        use_cutmix = self.cutmix_distrib is not None and (
            self.mixup_distrib is None or random.random() < self.switch_prob)
        self.distrib = self.cutmix_distrib if use_cutmix else self.mixup_distrib
        (CutMix if use_cutmix else MixUp).before_batch(self)


class EmaCallback(Callback):
    """Weight EMA with timm's ModelEmaV3: updated after every step and swapped in for validation, so
    the best checkpoint (which SaveModelCallback loads back at the end) holds EMA weights.

    timm's decay warmup (1 - (1 + step) ** -2/3, capped at `decay`): a fixed 0.999 over a few hundred
    steps would leave the EMA mostly the initial weights (random head included). The step count runs on
    across both fine-tune stages (one instance, two fits) and is saved in last.pth for --resume."""

    order = SaveModelCallback.order + 1  # restore the raw weights only after the checkpoint was taken

    def __init__(self, decay: float = 0.999):
        self.decay, self.model_ema, self._raw, self._trained = decay, None, None, False
        self.steps, self._restore = 0, None

    def before_fit(self):
        from timm.utils import ModelEmaV3
        if self.model_ema is None:  # built here, once the model sits on the training device
            self.model_ema = ModelEmaV3(get_model(self.learn.model), decay=self.decay, use_warmup=True)
        if self._restore is not None:  # --resume: the EMA as last.pth saved it, not a copy of the weights
            self.model_ema.module.load_state_dict(self._restore["module"])
            self.steps, self._restore = int(self._restore["steps"]), None

    def after_step(self):
        self.steps += 1
        self.model_ema.update(get_model(self.learn.model), step=self.steps)

    def checkpoint_state(self) -> dict:
        """The EMA weights and step count, plain tensors and ints (torch.load(weights_only=True))."""
        return dict(module=self.model_ema.module.state_dict(), steps=self.steps)

    def restore(self, state: dict) -> None:
        """Resume from checkpoint_state(); applied in before_fit, on the model's device."""
        self._restore = state

    def after_train(self):
        self._trained = True  # learn.validate()/get_preds run no train phase: leave their weights alone

    def before_validate(self):
        if self._trained:
            model = get_model(self.learn.model)  # under DDP (distributed.py) the wrapped model
            self._raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.model_ema.module.state_dict())

    def after_epoch(self):
        if self._raw is not None:
            get_model(self.learn.model).load_state_dict(self._raw)
        self._raw, self._trained = None, False


def atomic_learn_save(learn: Learner, name: str, with_opt: bool) -> Path:
    """learn.save, but the file appears at run_dir/<name>.pth only once fully written; rank 0 only."""
    if not is_main():  # fastai's learn.save does nothing there either
        return Path(learn.path) / learn.model_dir / f"{name}.pth"
    tmp = learn.save(f"{name}.tmp", with_opt=with_opt)
    final = tmp.with_name(f"{name}.pth")
    os.replace(tmp, final)
    return final


class OnTrainedEpochs(Callback):
    """Acts once per *trained* epoch. fastai also fires epoch events around learn.validate()/get_preds
    and for the epochs that fit(start_epoch=...) skips on --resume; those must not count as epochs."""

    _trained = False

    def after_train(self):
        self._trained = True

    def after_epoch(self):
        if self._trained:
            self.after_trained_epoch()
        self._trained = False

    def after_trained_epoch(self):
        raise NotImplementedError


class AtomicSaveModelCallback(OnTrainedEpochs, SaveModelCallback):
    """fastai's SaveModelCallback (best weights on the monitored metric), written atomically. It loads the best
    weights back only after a fit that trained an epoch: an empty fit (fastai's `fine_tune(freeze_epochs=0)`)
    has no best.pth to load yet, or one that is not better than the weights it would replace."""

    after_trained_epoch = SaveModelCallback.after_epoch
    trained_in_fit = False

    def before_fit(self):
        self.trained_in_fit = False
        super().before_fit()

    def after_train(self):
        super().after_train()
        self.trained_in_fit = True

    def after_fit(self):
        if self.trained_in_fit:
            super().after_fit()

    def _save(self, name):
        self.last_saved_path = atomic_learn_save(self.learn, name, self.with_opt)


class LastCheckpointCallback(OnTrainedEpochs):
    """After every finished epoch: weights + optimizer state (+ the EMA's) as last.pth (atomically), for
    --resume."""

    order = EmaCallback.order + 1  # the raw weights, after EMA swapped them back

    def after_trained_epoch(self):
        save_last(self.learn)


def _plain(obj):
    """fastai's optimizer state as plain containers (its L lists and NumPy scalars are not weights_only)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, L)):
        return [_plain(v) for v in obj]
    return obj.item() if isinstance(obj, np.generic) else obj


def _ema_callback(learn: Learner) -> EmaCallback | None:
    return next((cb for cb in learn.cbs if isinstance(cb, EmaCallback)), None)


def save_last(learn: Learner) -> Path:
    """run_dir/last.pth: model, optimizer and (with --ema) EMA state, loadable with weights_only=True (rank 0)."""
    path = learn.path / learn.model_dir / f"{LAST_NAME}.pth"
    if not is_main():
        return path
    state = dict(model=get_model(learn.model).state_dict(), opt=_plain(learn.opt.state_dict()))
    ema = _ema_callback(learn)
    if ema is not None and ema.model_ema is not None:
        state["ema"] = ema.checkpoint_state()
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_last(learn: Learner) -> None:
    """Put save_last's state back: weights and optimizer now, the EMA when its callback's fit starts."""
    device = getattr(learn.dls, "device", None) or "cpu"
    state = torch.load(read_on_main(learn.path / learn.model_dir / f"{LAST_NAME}.pth"), map_location=device,
                       weights_only=True)  # rank 0's file, sent to the other ranks
    get_model(learn.model).load_state_dict(state["model"])
    learn.opt.load_state_dict(dict(state["opt"], hypers=L(state["opt"]["hypers"])))
    ema = _ema_callback(learn)
    if ema is not None and "ema" in state:
        ema.restore(state["ema"])


class HistoryCallback(OnTrainedEpochs):
    """Appends one row per training epoch to history.csv (flushed at once, so an interrupted run keeps
    every finished epoch) and prints one plain line per epoch when stdout is not a terminal."""

    order = 70  # after the Recorder has logged the epoch
    columns = ("epoch", "stage", "train_loss", "valid_loss", "accuracy", "lr", "time")

    def __init__(self, path: Path, quiet: bool = False):
        self.path, self.quiet, self.stage, self.epochs_done = Path(path), quiet, "", 0
        if is_main() and not self.path.exists():  # several processes: rank 0 writes
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def before_epoch(self):
        self._start = time.time()

    def after_trained_epoch(self):
        train_loss, valid_loss, acc = (self.recorder.log[i] for i in (1, 2, 3))
        lr = self.opt.hypers[-1]["lr"]
        row = (self.epochs_done, self.stage, f"{train_loss:.6f}", f"{valid_loss:.6f}", repr(float(acc)),
               f"{lr:.3e}", f"{time.time() - self._start:.1f}")
        self.epochs_done += 1
        if not is_main():
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)
        if not self.quiet:
            print(f"epoch {row[0]:>3} [{self.stage}] train_loss {row[2]} valid_loss {row[3]} "
                  f"accuracy {acc:.6f} lr {row[5]} ({row[6]}s)", flush=True)


class TensorBoardLogging(OnTrainedEpochs):
    """What our TensorBoard callback adds to fastai's TensorBoardCallback (a SummaryWriter per fit, into
    `log_dir`): steps counted by the run's own count of training batches (fastai's train_iter restarts at 0 with
    each fit: two stages, --resume; and its after_batch would log validation batches too). Per step: smoothed
    train_loss and the head group's lr; per trained epoch: train_loss_epoch, valid_loss and accuracy. No graph
    trace and no prediction images (fp16, speed). Combined with fastai's class by `tensorboard_callback`."""

    order = Recorder.order + 1  # after the Recorder has logged the epoch; before HistoryCallback counts it

    def __init__(self, log_dir: Path):
        super().__init__(log_dir=str(log_dir), trace_model=False, log_preds=False)

    def _steps_before_epoch(self) -> int:
        """Training batches before this epoch, across stages and resumes (HistoryCallback counts the epochs)."""
        return self.learn.history.epochs_done * len(self.dls.train)

    def after_batch(self):
        if self.training:
            step = self._steps_before_epoch() + self.iter
            self.writer.add_scalar("train_loss", self.smooth_loss, step)
            self.writer.add_scalar("lr", self.opt.hypers[-1]["lr"], step)

    def after_trained_epoch(self):
        step = self._steps_before_epoch() + len(self.dls.train)  # the epoch's values at its last step
        train_loss, valid_loss, acc = (float(self.recorder.log[i]) for i in (1, 2, 3))
        for name, value in (("train_loss_epoch", train_loss), ("valid_loss", valid_loss), ("accuracy", acc)):
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # an interrupted run keeps its curves


@functools.cache
def tensorboard_callback() -> type[Callback]:
    """The TensorBoard callback class: TensorBoardLogging over fastai's TensorBoardCallback. Built on first use,
    not at import: fastai's module imports the `tensorboard` package (the [tensorboard] extra, about 20 MB of
    wheels with grpcio and protobuf), which training without `--tensorboard` never needs (an offline wheelhouse
    leaves it out, flowers_fastai/wheelhouse.py)."""
    try:
        from fastai.callback.tensorboard import TensorBoardCallback
    except ModuleNotFoundError as e:
        raise ValueError(f"--tensorboard (tensorboard=True) needs the tensorboard package, which is not installed "
                         f"({e}): pip install 'flowers-fastai[tensorboard]', or train without it") from e

    class TensorBoard(TensorBoardLogging, TensorBoardCallback):
        pass

    return TensorBoard


class EarlyStopping(OnTrainedEpochs, EarlyStoppingCallback):
    """fastai's EarlyStoppingCallback, counting trained epochs only. Its CancelFitException ends the
    after_epoch event, so it runs last: the best and last checkpoints and the history row (orders 61-70)
    are written for the epoch that stops the fit too."""

    order = HistoryCallback.order + 1
    after_trained_epoch = EarlyStoppingCallback.after_epoch
    _resume = None

    def resume(self, best: float, wait: int) -> None:
        """Continue a stage --resume re-enters (its best accuracy and epochs since): applied in before_fit,
        which fastai's callback starts from scratch."""
        self._resume = (best, wait)

    def before_fit(self):
        super().before_fit()
        if self._resume is not None:
            (self.best, self.wait), self._resume = self._resume, None


# --------------------------------------------------------------------------- learner + recipe

def _silent(*args, **kwargs) -> None:
    pass


class FlowersLearner(Learner):
    """fastai's Learner, whose `lr_find`, `validate` and `tta` run without the fit-only callbacks, and whose
    `load` reads rank 0's file with several processes. lr_find's mock fit skips validation and puts the weights
    back, so it must not be checkpointed, logged to history.csv, early-stopped or averaged into the EMA; validate
    and tta fire before_fit/after_fit around an evaluation, which must neither load best.pth over the model nor
    start a TensorBoard log."""

    def lr_find(self, *args, **kwargs):
        with self.removed_cbs(fit_only_callbacks(self)):
            return super().lr_find(*args, **kwargs)

    def validate(self, *args, **kwargs):
        with self.removed_cbs(fit_only_callbacks(self)):
            return super().validate(*args, **kwargs)

    def tta(self, *args, **kwargs):
        with self.removed_cbs(fit_only_callbacks(self)):
            return super().tta(*args, **kwargs)

    def load(self, file, device=None, **kwargs):
        """fastai's load; with several processes from rank 0's file, its bytes sent to the other ranks (best.pth
        at a fit's end, SaveModelCallback; on --resume): machines need not share the run folder."""
        if isinstance(file, (str, Path)) and world_size() > 1:
            file = read_on_main(join_path_file(file, self.path / self.model_dir, ext=".pth"))
        return super().load(file, device=device, **kwargs)


def adamw(params, model: torch.nn.Module, **kwargs) -> Optimizer:
    """fastai's AdamW (Adam, decoupled weight decay) with weight decay off, through fastai's per-parameter
    `do_wd` state, for splitters.no_weight_decay(model) (timm's rule: 1-D parameters and no_weight_decay()
    names); fastai's own `wd_bn_bias=False` covers only norms and `.bias`. The Learner calls it in create_opt,
    once for both stages (fastai keeps `do_wd` through clear_state and saves it with the optimizer state)."""
    opt = Adam(params, decouple_wd=True, **kwargs)
    for p in splitters.no_weight_decay(model):
        opt.state[p]["do_wd"] = False
    return opt


def build_learner(dls, model: torch.nn.Module, recipe: Recipe, run_dir: str | Path,
                  tensorboard: bool = False) -> Learner:
    """A fastai Learner around `model` with the recipe's loss, optimiser, splitter and callbacks;
    `tensorboard`: TensorBoard event files in run_dir/tensorboard."""
    run_dir = Path(run_dir)
    cbs = [AtomicSaveModelCallback(monitor="accuracy", fname=BEST_NAME, reset_on_fit=False), LastCheckpointCallback(),
           HistoryCallback(run_dir / "history.csv", quiet=sys.stdout.isatty())]
    if tensorboard and is_main():
        cbs.append(tensorboard_callback()(run_dir / TENSORBOARD_DIR))
    if recipe.patience:
        cbs.append(EarlyStopping(monitor="accuracy", patience=recipe.patience))
    if recipe.mixup > 0 or recipe.cutmix > 0:
        cbs.append(MixUpOrCutMix(recipe.mixup, recipe.cutmix, recipe.mix_prob, recipe.switch_prob))
    if recipe.grad_clip:
        from fastai.callback.training import GradientClip
        cbs.append(GradientClip(max_norm=recipe.grad_clip))
    if recipe.ema_decay:
        cbs.append(EmaCallback(recipe.ema_decay))
    learn = FlowersLearner(dls, model, loss_func=LabelSmoothingCrossEntropyFlat(eps=recipe.label_smoothing),
                    opt_func=partial(adamw, model=model), wd=recipe.wd, metrics=accuracy,
                    splitter=splitters.param_groups, cbs=cbs, path=run_dir, model_dir=".",
                    train_bn=False)  # freeze() must leave the head alone trainable (norms included)
    if not sys.stdout.isatty():
        learn.remove_cb(ProgressCallback)  # HistoryCallback prints the plain per-epoch lines instead
        learn.logger = _silent             # ... and the Recorder's raw lists would repeat them
    if use_channels_last(recipe, model):
        learn.add_cb(ChannelsLast())
    precision = resolve_precision(recipe.precision)
    if precision in ("fp16", "bf16"):
        learn.add_cb(DeviceMixedPrecision(AMPMode(precision)))  # what learn.to_fp16() / to_bf16() add, any device
    return learn


def use_channels_last(recipe: Recipe, model: torch.nn.Module) -> bool:
    """fastai's ChannelsLast for the CNN on CUDA by default: fp16/bf16 convolutions on tensor cores run
    NHWC. On the CPU it measured no faster for ConvNeXt V2 training (bench/RESULTS.md), so off there."""
    if recipe.channels_last is not None:
        return recipe.channels_last
    return torch.cuda.is_available() and not isinstance(model, ClipClassifier)


def stage2_lrs(learn: Learner, recipe: Recipe) -> slice:
    """Discriminative LRs: fastai spreads slice(lo, hi) geometrically from the first group to the head."""
    return slice(recipe.lr / recipe.lr_mult, recipe.lr) if recipe.lr_mult != 1 else slice(recipe.lr, recipe.lr)


def fit_only_callbacks(learn: Learner) -> list[Callback]:
    """Callbacks that only make sense inside a fit: the trackers (early stopping, best checkpoint), the
    history writer and the EMA swap. validate() and tta() fire fit and epoch events too, and the trackers would
    read them as a fit (SaveModelCallback loads best.pth at its end)."""
    fit_only = (TrackerCallback, HistoryCallback, EmaCallback, LastCheckpointCallback, TensorBoardLogging)
    return [cb for cb in learn.cbs if isinstance(cb, fit_only)]


def valid_accuracy(learn: Learner) -> float:
    """Valid accuracy of the model as it stands, outside any fit (e.g. CLIP's zero-shot head before training);
    FlowersLearner.validate already leaves the fit-only callbacks out."""
    return float(learn.validate()[1])


def export_learner(learn: Learner, path: Path) -> None:
    """fastai's learn.export without the fit-only callbacks, so load_learner(...).validate() works."""
    with learn.removed_cbs(fit_only_callbacks(learn)):
        learn.export(path)


def _fit(learn: Learner, epochs: int, lr, recipe: Recipe, stage: str, start_epoch: int = 0) -> None:
    for cb in learn.cbs:
        if isinstance(cb, HistoryCallback):
            cb.stage = stage
    # start_epoch > 0 (resume): fastai replays the one-cycle schedule from that epoch on.
    learn.fit_one_cycle(epochs, lr, pct_start=recipe.pct_start, start_epoch=start_epoch)


def fine_tune(learn: Learner, recipe: Recipe, epochs_done: dict[str, int] | None = None) -> Learner:
    """Stage 1 (freeze_epochs): head only at head_lr. Stage 2 (epochs): the body (or its last
    `unfreeze_last` blocks, see splitters.stage_start) too, with discriminative LRs. Both one-cycle;
    best weights loaded at the end. `epochs_done` (resume_learner, per stage) skips a stage that is over
    and continues a stage begun from its next epoch."""
    done = {"frozen": 0, "unfrozen": 0, **(epochs_done or {})}
    # Resolved before stage 1, so a bad --unfreeze-last fails before any training.
    stage2_start = splitters.stage_start(learn.model, "unfrozen", recipe.unfreeze_last)
    if recipe.freeze_epochs > done["frozen"]:
        _trainable_from(learn, splitters.stage_start(learn.model, "frozen"), keep_optimizer_state=done["frozen"] > 0)
        _fit(learn, recipe.freeze_epochs, recipe.head_lr, recipe, "frozen", start_epoch=done["frozen"])
    if recipe.epochs > done["unfrozen"]:
        _trainable_from(learn, stage2_start, keep_optimizer_state=done["unfrozen"] > 0)
        _fit(learn, recipe.epochs, stage2_lrs(learn, recipe), recipe, "unfrozen", start_epoch=done["unfrozen"])
    return learn


def _trainable_from(learn: Learner, group: int, keep_optimizer_state: bool) -> None:
    """learn.freeze_to(group) (freeze() is -1, unfreeze() is 0). fastai clears the optimizer state there, as a
    new stage should; a stage resumed halfway keeps the state it was saved with."""
    if learn.opt is None:
        learn.create_opt()
    learn.opt.freeze_to(group)
    if not keep_optimizer_state:
        learn.opt.clear_state()


def _stage_progress(history, recipe: Recipe) -> dict[str, int]:
    """Epochs of each stage's one-cycle schedule a run has behind it, from history.csv's `stage` column (a
    DataFrame). A stage that early stopping ended (recipe.patience epochs without a better accuracy, counted
    as EarlyStopping counts them) or that stage 2 followed is over: it counts its full epochs."""
    done = {}
    for stage, epochs in (("frozen", recipe.freeze_epochs), ("unfrozen", recipe.epochs)):
        acc = history.loc[history["stage"] == stage, "accuracy"].to_numpy()
        stopped = bool(recipe.patience) and len(acc) > 0 and _epochs_since_best(acc) >= recipe.patience
        done[stage] = epochs if stopped else min(len(acc), epochs)
    if done["unfrozen"] > 0:
        done["frozen"] = recipe.freeze_epochs
    return done


def _epochs_since_best(acc: np.ndarray) -> int:
    return len(acc) - 1 - int(np.argmax(acc))  # the first maximum: a tie is no improvement


def resume_learner(learn: Learner, recipe: Recipe) -> dict[str, int]:
    """Put an interrupted run's state back into a fresh learner: weights, optimizer and EMA from last.pth, the
    epoch count, best accuracy and early-stopping state from history.csv. Returns the epochs done per stage
    (fine_tune's `epochs_done`, see _stage_progress)."""
    import pandas as pd

    def read_history():  # several processes: rank 0 reads its run folder and sends the table
        history = pd.read_csv(learn.path / "history.csv")
        if len(history) == 0 or not (learn.path / f"{LAST_NAME}.pth").is_file():
            raise FileNotFoundError(f"{learn.path} has no finished epoch (history.csv, last.pth) to resume from; "
                                    f"start a new run instead.")
        return history
    history = on_main(read_history)
    done = _stage_progress(history, recipe)
    stage = history["stage"].iloc[-1]  # the stage of the last finished epoch
    stage_epochs = recipe.freeze_epochs if stage == "frozen" else recipe.epochs
    learn.create_opt()
    load_last(learn)
    if done[stage] >= stage_epochs:  # that stage is over: an unbroken run goes on from its best weights
        learn.load(BEST_NAME, with_opt=False)
    for cb in learn.cbs:
        if isinstance(cb, HistoryCallback):
            cb.epochs_done = len(history)
        if isinstance(cb, SaveModelCallback):
            cb.best = float(history["accuracy"].max())  # a worse epoch must not replace best.pth
        if isinstance(cb, EarlyStopping) and done[stage] < stage_epochs:  # the stage goes on: so does its patience
            acc = history.loc[history["stage"] == stage, "accuracy"].to_numpy()
            cb.resume(float(acc.max()), _epochs_since_best(acc))
    return done
