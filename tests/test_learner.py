"""The Learner and recipe: freeze/unfreeze, discriminative LRs, MixUp/CutMix, EMA, history, checkpoints, weight decay
and seeding."""

import os
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP, TINY_CNN, TINY_SIZE, make_image_folder
from fastai.callback.core import Callback
from fastai.callback.mixup import MixHandler
from fastai.losses import LabelSmoothingCrossEntropyFlat

from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.preprocess import Preprocess
from flowers_fastai import cli as commands
from flowers_fastai import data, experiments, flowers_dataloaders, flowers_learner, learner, train
from flowers_fastai.learner import EarlyStopping, EmaCallback, MixUpOrCutMix, Recipe, build_learner, fine_tune

QUIET = dict(patience=None, grad_clip=1.0)


@pytest.fixture
def tiny_dls(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=6, size=40)
    df = data.stratified_split(data.scan_folder(root), 0.34, seed=0)
    prep = Preprocess(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return data.make_dataloaders(df, root, prep, bs=8)


def tiny_learner(dls, run_dir, **recipe):
    torch.manual_seed(0)
    return build_learner(dls, factory.create_cnn(TINY_CNN), Recipe(**{**QUIET, **recipe}), run_dir)


def test_freeze_leaves_only_the_head_trainable(tiny_dls, tmp_path):
    learn = tiny_learner(tiny_dls, tmp_path)
    learn.freeze()
    trainable = {id(p) for p in learn.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in learn.model.head.parameters()}
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())


def test_unfrozen_stage_lrs_rise_geometrically_from_body_to_head(tiny_dls, tmp_path):
    learn = tiny_learner(tiny_dls, tmp_path)
    fine_tune(learn, Recipe(epochs=1, freeze_epochs=0, lr=1e-3, lr_mult=100, **QUIET))
    lrs = torch.tensor([h["lr"] for h in learn.opt.hypers], dtype=torch.float64)
    assert len(lrs) == 6  # stem, 4 stages, head
    ratios = lrs[1:] / lrs[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 100 ** (1 / 5)), rtol=1e-6)


def test_two_stage_fine_tune_writes_history_and_atomic_best_checkpoint(tiny_dls, tmp_path):
    learn = tiny_learner(tiny_dls, tmp_path)
    fine_tune(learn, Recipe(epochs=2, freeze_epochs=1, **QUIET))
    hist = pd.read_csv(tmp_path / "history.csv")
    assert list(hist.columns) == ["epoch", "stage", "train_loss", "valid_loss", "accuracy", "lr", "time"]
    assert hist["epoch"].tolist() == [0, 1, 2] and hist["stage"].tolist() == ["frozen", "unfrozen", "unfrozen"]
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert all(torch.equal(best[k], v) for k, v in learn.model.state_dict().items())  # best loaded at the end
    assert not list(tmp_path.glob("*.tmp*"))


def mix_batch(cb, x, y):
    """Run the callback's before_train/before_batch on a stand-in learner; return it."""
    learn = SimpleNamespace(xb=(x.clone(),), yb=(y,), loss_func=LabelSmoothingCrossEntropyFlat(), training=True)
    learn.x, learn.y = learn.xb[0], y
    cb.learn = learn
    cb.before_train()
    cb.before_batch()
    return learn


def test_mixup_blends_images_and_losses():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 5
    cb = MixUpOrCutMix(mixup_alpha=0.4, cutmix_alpha=0.0)
    learn = mix_batch(cb, x, y)
    assert not torch.equal(learn.xb[0], x) and (cb.lam >= 0.5).all()
    pred = torch.randn(8, 5)
    plain = LabelSmoothingCrossEntropyFlat(reduction="none")
    expected = (cb.lam * plain(pred, y) + (1 - cb.lam) * plain(pred, cb.yb1[0])).mean()
    assert torch.allclose(learn.loss_func(pred, y), expected, atol=1e-6)


def test_cutmix_pastes_patches_from_other_images():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    cb = MixUpOrCutMix(mixup_alpha=0.0, cutmix_alpha=1.0)
    out = mix_batch(cb, x, y).xb[0]
    changed = (out != x).any(dim=1)  # (N, H, W) pixels replaced
    assert changed.any() and 0 < float(cb.lam) <= 1
    assert all(any(torch.equal(out[i][:, changed[i]], x[j][:, changed[i]]) for j in range(8))
               for i in range(8) if changed[i].any())


@pytest.mark.parametrize("switch_prob, expect", [(1.0, "cutmix"), (0.0, "mixup")])
def test_switch_prob_picks_cutmix_or_mixup(switch_prob, expect):
    cb = MixUpOrCutMix(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=switch_prob)
    mix_batch(cb, torch.rand(4, 3, 16, 16), torch.arange(4))
    assert cb.distrib is getattr(cb, f"{expect}_distrib")


def test_mix_prob_zero_leaves_batch_and_loss_untouched():
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
    cb = MixUpOrCutMix(mixup_alpha=0.4, cutmix_alpha=1.0, prob=0.0)
    learn = mix_batch(cb, x, y)
    pred = torch.randn(4, 5)
    assert torch.equal(learn.xb[0], x)
    assert torch.allclose(learn.loss_func(pred, y), LabelSmoothingCrossEntropyFlat()(pred, y))


class RawWeightsProbe(Callback):
    """Records the model's weights after EMA swapped the raw ones back (end of each epoch)."""

    order = EmaCallback.order + 1

    def after_epoch(self):
        self.raw = {k: v.clone() for k, v in self.learn.model.state_dict().items()}


def test_ema_weights_are_validated_checkpointed_and_kept(tiny_dls, tmp_path):
    learn = tiny_learner(tiny_dls, tmp_path, ema_decay=0.5)
    probe = RawWeightsProbe()
    learn.add_cb(probe)
    fine_tune(learn, Recipe(epochs=1, freeze_epochs=0, ema_decay=0.5, **QUIET))
    ema = next(cb for cb in learn.cbs if isinstance(cb, EmaCallback)).model_ema.module.state_dict()
    final = learn.model.state_dict()
    assert all(torch.equal(final[k], ema[k]) for k in final)
    assert any(not torch.equal(final[k], probe.raw[k]) for k in final if final[k].is_floating_point())


def test_channels_last_is_opt_in_on_cpu_and_trains(tiny_dls, tmp_path):
    stem_is_nhwc = lambda learn: learn.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)  # noqa: E731
    for name in ("default", "nhwc"):
        (tmp_path / name).mkdir()
    default = tiny_learner(tiny_dls, tmp_path / "default")
    fine_tune(default, Recipe(epochs=1, freeze_epochs=0, **QUIET))
    assert not stem_is_nhwc(default)  # CPU default: off
    nhwc = tiny_learner(tiny_dls, tmp_path / "nhwc", channels_last=True)
    fine_tune(nhwc, Recipe(epochs=1, freeze_epochs=0, channels_last=True, **QUIET))
    assert stem_is_nhwc(nhwc)
    assert pd.read_csv(tmp_path / "nhwc" / "history.csv")["train_loss"].notna().all()


class TrainedEpochs(Callback):
    """Counts the epochs a fit really trained, independently of the callbacks under test."""

    n = 0

    def after_train(self):
        self.n += 1


def test_early_stopping_keeps_the_epoch_that_stops_the_fit(tiny_dls, tmp_path, capsys):
    # An LR far too small to change a prediction: accuracy cannot improve, so patience 1 stops at epoch 2.
    recipe = Recipe(epochs=5, freeze_epochs=0, lr=1e-12, patience=1, grad_clip=1.0)
    learn = tiny_learner(tiny_dls, tmp_path, **vars(recipe))
    counter = TrainedEpochs()
    learn.add_cb(counter)
    fine_tune(learn, recipe)
    assert 1 < counter.n < recipe.epochs  # it did stop early, after more than one epoch
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["epoch"].tolist() == list(range(counter.n))
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(printed) == counter.n
    stopper = next(cb for cb in learn.cbs if isinstance(cb, EarlyStopping))
    assert stopper.order > max(cb.order for cb in learn.cbs if cb is not stopper and cb is not counter)


def test_ema_warms_up_towards_the_trained_weights(tiny_dls, tmp_path):
    """decay 0.999 on ~14 steps: without timm's warmup the EMA would still be ~99% the initial weights."""
    recipe = Recipe(epochs=5, freeze_epochs=0, lr=1e-2, lr_mult=1, ema_decay=0.999, **QUIET)
    learn = tiny_learner(tiny_dls, tmp_path, **vars(recipe))
    initial = {k: v.clone() for k, v in learn.model.state_dict().items()}
    probe = RawWeightsProbe()
    learn.add_cb(probe)
    fine_tune(learn, recipe)
    ema_cb = next(cb for cb in learn.cbs if isinstance(cb, EmaCallback))
    assert ema_cb.steps == recipe.epochs * len(tiny_dls.train)
    ema = ema_cb.model_ema.module.state_dict()
    dist = lambda a, b: sum(float((a[k] - b[k]).float().norm()) for k in a if a[k].is_floating_point())  # noqa: E731
    assert dist(ema, probe.raw) < 0.5 * dist(ema, initial)


class KeepBatch(Callback):
    """Before MixUpOrCutMix: a copy of the batch as the data loader gave it."""

    order = MixUpOrCutMix.order - 1

    def before_batch(self):
        self.x0, self.y0 = self.xb[0].clone(), self.yb[0].clone()


class CheckMixedLoss(Callback):
    """After MixUpOrCutMix: recomputes the loss by hand, mixed in training and plain in validation."""

    order = MixUpOrCutMix.order + 1

    def __init__(self, kept: KeepBatch, eps: float):
        self.kept, self.plain = kept, LabelSmoothingCrossEntropyFlat(eps=eps, reduction="none")
        self.mixed, self.validated = 0, 0

    def after_loss(self):
        mix = next(cb for cb in self.learn.cbs if isinstance(cb, MixUpOrCutMix))
        pred, y = self.learn.pred.float(), self.kept.y0
        assert torch.equal(self.learn.yb[0], y)  # integer labels stay; the loss does the mixing
        if self.learn.training:
            assert getattr(self.learn.loss_func, "__func__", None) is MixHandler.lf
            assert not torch.equal(self.learn.xb[0], self.kept.x0)
            lam = torch.as_tensor(mix.lam, dtype=torch.float32)
            expected = (lam * self.plain(pred, y) + (1 - lam) * self.plain(pred, mix.yb1[0])).mean()
            assert torch.allclose(self.learn.loss, expected, atol=1e-5)
            self.mixed += 1
        else:
            assert isinstance(self.learn.loss_func, LabelSmoothingCrossEntropyFlat)
            assert torch.equal(self.learn.xb[0], self.kept.x0)
            assert torch.allclose(self.learn.loss, self.plain(pred, y).mean(), atol=1e-5)
            self.validated += 1


@pytest.mark.parametrize("mix", [dict(mixup=0.4), dict(cutmix=1.0)])
def test_mixup_and_cutmix_mix_the_training_loss_of_a_real_fit_and_not_validation(tiny_dls, tmp_path, mix):
    recipe = Recipe(epochs=1, freeze_epochs=0, label_smoothing=0.1, **mix, **QUIET)
    learn = tiny_learner(tiny_dls, tmp_path, **vars(recipe))
    kept = KeepBatch()
    check = CheckMixedLoss(kept, recipe.label_smoothing)
    learn.add_cbs([kept, check])
    fine_tune(learn, recipe)
    assert check.mixed == len(tiny_dls.train) and check.validated == len(tiny_dls.valid)


def test_training_never_imports_tensorboard_and_asking_without_it_says_what_to_install(tiny_dls, tmp_path,
                                                                                      monkeypatch):
    """fastai's TensorBoardCallback module imports the `tensorboard` package: only `tensorboard=True` loads it,
    so [train] alone (an offline wheelhouse) trains; without the package, the flag's error names the extra."""
    code = "import sys, flowers_fastai.train, flowers_fastai.api; print([m for m in sys.modules if 'tensorb' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]", f"importing the trainer imported {out.strip()}"
    monkeypatch.setitem(sys.modules, "fastai.callback.tensorboard", None)  # as if tensorboard were not installed
    learner.tensorboard_callback.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"--tensorboard .*pip install 'flowers-fastai\[tensorboard\]'"):
            build_learner(tiny_dls, factory.create_cnn(TINY_CNN), Recipe(**QUIET), tmp_path,
                          tensorboard=True)
    finally:
        learner.tensorboard_callback.cache_clear()


# --------------------------------------------------------------------------- seeding and determinism

@pytest.fixture
def restore_determinism(monkeypatch):
    """seed_everything sets process-wide flags: put them back for the tests that follow."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # monkeypatch restores the original
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    cudnn.benchmark, cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def determinism() -> tuple[bool, bool, bool]:
    cudnn = torch.backends.cudnn
    return cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled()


def test_seeds_are_fixed_by_default_and_bit_reproducibility_is_opt_in(restore_determinism):
    learner.seed_everything(3, deterministic=True)
    assert determinism() == (False, True, True)  # cuDNN's deterministic kernels, torch's deterministic ops
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    first = torch.rand(4), np.random.rand(), random.random()
    # The default, right after a deterministic run in the same process (as experiments.py runs them):
    learner.seed_everything(3)
    assert determinism() == (True, False, False)  # cuDNN free to benchmark and pick the fastest kernels
    again = torch.rand(4), np.random.rand(), random.random()
    assert torch.equal(again[0], first[0]) and again[1:] == first[1:]  # the seeds are still fixed


def test_deterministic_flag_reaches_the_run_and_experiment_plans(restore_determinism, tmp_path):
    parse = train.build_parser().parse_args
    assert not parse([]).deterministic and parse(["--deterministic"]).deterministic
    images = make_image_folder(tmp_path / "images", per_class=4, size=32)
    tiny = ["--model", TINY_CNN, "--no-pretrained", "--img-size", "32", "--bs", "8", "--workers", "0"]
    code = commands.train([*tiny, "--data", str(images), "--deterministic", "--lr-find", "--lr-find-iters", "30",
                       "--out", str(tmp_path / "run")])
    assert code == 0 and determinism() == (False, True, True)
    # experiments.py builds each run's command line with train.py's parser: a boolean key is the bare flag
    runs = experiments.plan_runs({"grid": {"deterministic": [True, False]}}, tmp_path / "plan.toml", tmp_path)
    assert [parse(run.argv).deterministic for run in runs] == [True, False]


# --------------------------------------------------------------------------- weight decay

def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "cnn":
        return factory.create_cnn(TINY_CNN)
    return factory.create_clip(TINY_CLIP, image_size=TINY_SIZE)


def no_decay_names(model: torch.nn.Module) -> set[str]:
    """timm's rule, spelled out here: 1-D parameters, and the names the model's no_weight_decay() gives."""
    listed = {f"visual.{n}" for n in model.visual.no_weight_decay()} if hasattr(model, "visual") else set()
    return {n for n, p in model.named_parameters() if p.ndim <= 1 or n in listed}


@pytest.mark.parametrize("arch", ["cnn", "clip"])
def test_no_weight_decay_on_1d_parameters_and_the_models_no_weight_decay_names(arch, tiny_dls, tmp_path):
    model = tiny_model(arch)
    skip = no_decay_names(model)
    # what fastai's own wd_bn_bias=False would miss: GRN's gamma, attention's in_proj_bias, CLIP's embeddings
    missed = {"cnn": "stages.0.blocks.0.mlp.grn.weight", "clip": "visual.transformer.resblocks.0.attn.in_proj_bias"}
    assert missed[arch] in skip
    if arch == "clip":
        assert {"visual.positional_embedding", "visual.class_embedding"} <= skip
    learn = build_learner(tiny_dls, model, Recipe(**QUIET), tmp_path)
    learn.create_opt()
    do_wd = {n: learn.opt.state[p].get("do_wd", True) for n, p in model.named_parameters()}
    assert {n for n, on in do_wd.items() if not on} == skip  # every 2-D+ weight outside the list decays
    # A real AdamW step with zero gradients moves nothing but decoupled weight decay: p *= 1 - lr * wd.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    learn.opt.set_hypers(lr=0.1, wd=0.5)
    learn.opt.step()
    for n, p in model.named_parameters():
        expected = before[n] if n in skip else before[n] * (1 - 0.1 * 0.5)
        assert torch.allclose(p, expected, rtol=1e-6, atol=0), n


def test_no_weight_decay_survives_both_stages_and_resume(tiny_dls, tmp_path):
    learn = tiny_learner(tiny_dls, tmp_path)
    skip = no_decay_names(learn.model)
    fine_tune(learn, Recipe(epochs=1, freeze_epochs=1, **QUIET))  # freeze, clear_state, unfreeze, clear_state
    off = lambda learn: {n for n, p in learn.model.named_parameters() if learn.opt.state[p].get("do_wd") is False}  # noqa: E731
    assert off(learn) == skip
    resumed = tiny_learner(tiny_dls, tmp_path)
    resumed.create_opt()
    learner.load_last(resumed)  # --resume: the optimizer state as last.pth saved it
    assert off(resumed) == skip


@pytest.fixture
def flowers_learn(real_flowers, tmp_path):
    """flowers_learner as the README builds it (random init, 64 px, the committed photos), EMA on."""
    dls = flowers_dataloaders(real_flowers, model=TINY_CNN, img_size=TINY_SIZE, bs=16, pretrained=False,
                              run_dir=tmp_path / "run")
    torch.manual_seed(0)
    return flowers_learner(dls, pretrained=False, ema_decay=0.9)


def weights(learn) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learn.model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class InterruptSecondEpoch(Callback):
    """Ctrl-C (a notebook's interrupt) after the first step of a fit's second epoch."""

    def after_step(self):
        if self.epoch == 1:
            raise KeyboardInterrupt


def test_validate_and_tta_evaluate_and_never_change_the_weights(flowers_learn):
    """fastai fires before_fit/after_fit around validate() and tta(): the best-checkpoint callback must not read
    that as a fit (no best.pth yet on a fresh learner; after a fit, best.pth is not the model's weights)."""
    learn, n_valid = flowers_learn, len(flowers_learn.dls.valid_ds)
    for trained in (False, True):
        if trained:  # interrupted in epoch 2: the weights are one step past best.pth (epoch 1's)
            with pytest.raises(KeyboardInterrupt):
                learn.fit_one_cycle(2, 1e-3, cbs=InterruptSecondEpoch())
            assert not same_weights(weights(learn), torch.load(learn.path / "best.pth", weights_only=True))
        before = weights(learn)
        loss, acc = learn.validate()
        preds, targets = learn.tta(n=2)
        assert 0 <= acc <= 1 and preds.shape == (n_valid, len(CLASSES)) and len(targets) == n_valid
        assert same_weights(weights(learn), before)
        assert (learn.path / "best.pth").exists() == trained
    assert len(pd.read_csv(learn.path / "history.csv")) == 1  # validate/tta logged no epoch


@pytest.mark.parametrize("freeze_epochs", [0, 1])
def test_fastais_own_fine_tune_runs_and_ends_on_the_best_weights(flowers_learn, freeze_epochs):
    """learn.fine_tune as a new user calls it; freeze_epochs=0 is an empty frozen fit (no epoch, no best.pth)."""
    flowers_learn.fine_tune(1, 1e-3, freeze_epochs=freeze_epochs)
    assert len(pd.read_csv(flowers_learn.path / "history.csv")) == 1 + freeze_epochs
    assert same_weights(weights(flowers_learn), torch.load(flowers_learn.path / "best.pth", weights_only=True))
