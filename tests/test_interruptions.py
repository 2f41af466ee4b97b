"""Interrupted training and export lose nothing; data that breaks mid-run never crashes an epoch."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CLIP, TINY_CNN, make_image_folder
from fastai.callback.channelslast import ChannelsLast
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from timm.layers import DropPath

from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_fastai import data
from flowers_fastai.learner import EmaCallback

TRAIN = [sys.executable, "train.py", "--model", TINY_CNN, "--no-pretrained", "--img-size", "64", "--bs", "16",
         "--no-export", "--patience", "0"]


def history_rows(run_dir) -> int:
    path = run_dir / "history.csv"
    return len(path.read_text().splitlines()) - 1 if path.exists() else 0


def test_sigint_in_epoch_2_then_resume_continues_the_same_run(tmp_path):
    run_dir = tmp_path / "run"
    # Generated photos: the test is about interrupting, and 60 per class make epochs long enough to hit one.
    images = make_image_folder(tmp_path / "images", per_class=60, size=64)
    cmd = TRAIN + ["--data", str(images), "--freeze-epochs", "1", "--epochs", "3",
                   "--out", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while history_rows(run_dir) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # inside epoch 2 (the first unfrozen one)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"python train.py --resume {run_dir}" in err
    finished = history_rows(run_dir)
    assert 1 <= finished < 4
    hist = pd.read_csv(run_dir / "history.csv")
    assert hist["epoch"].tolist() == list(range(finished))  # only whole epochs, no half-written row
    best = torch.load(run_dir / "best.pth", weights_only=True)  # complete and loadable
    assert "head.fc.weight" in best
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    split_before = (run_dir / "split.csv").read_text()

    out = subprocess.run([sys.executable, "train.py", "--resume", str(run_dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    hist = pd.read_csv(run_dir / "history.csv")
    assert hist["epoch"].tolist() == [0, 1, 2, 3]
    assert hist["stage"].tolist() == ["frozen", "unfrozen", "unfrozen", "unfrozen"]
    assert (run_dir / "split.csv").read_text() == split_before
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["best_accuracy"] == hist["accuracy"].max()
    assert (run_dir / "learner.pkl").exists()


def test_resume_refuses_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"status": "finished", "recipe": {"lr": 1e-3}}))
    out = subprocess.run([sys.executable, "train.py", "--resume", str(run_dir)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "already finished" in out.stderr


def test_killed_export_leaves_no_half_written_file(tmp_path, tiny_cnn_pth):
    """export.py killed (SIGKILL) in the middle of writing: the target keeps its old content."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    payload = torch.load(tiny_cnn_pth, weights_only=True)
    spec = {k: v for k, v in payload.items() if k not in ("state_dict", "format_version", "dtype")}
    (run_dir / "metrics.json").write_text(json.dumps({"model": spec}))
    torch.save(payload["state_dict"], run_dir / "best.pth")
    target = tmp_path / "cnn_flowers.pth"
    target.write_bytes(b"previous export")
    code = ("import os, signal, torch, flowers_fastai.export as e\n"
            "def dying_save(obj, f):\n"
            "    open(f, 'wb').write(b'half a payload')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"torch.save = dying_save\ne.export_run(r'{run_dir}', r'{target}')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert out.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous export"
    # and a normal export replaces it with a loadable payload
    subprocess.run([sys.executable, "export.py", str(run_dir), "--out", str(target)], cwd=ROOT, check=True)
    assert torch.load(target, weights_only=True)["family"] == "cnn"


def test_non_image_files_and_symlink_loops_are_reported_not_fatal(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=3)
    (root / "rose" / "notes.txt").write_text("not an image")
    (root / "daisy" / "Thumbs.db").write_bytes(b"\x00" * 10)
    os.symlink("..", root / "tulip" / "loop")  # a folder that contains itself
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.warns(UserWarning, match="2 file\\(s\\)"):
        df = data.prepare_split(root, run_dir, seed=0)
    assert len(df) == 3 * len(CLASSES)
    assert set(pd.read_csv(run_dir / "skipped.csv")["path"]) == {"rose/notes.txt", "daisy/Thumbs.db"}


def test_file_deleted_after_the_check_is_reported_and_the_epoch_finishes(tmp_path):
    """The check passed; then a file vanishes before the epoch reads it. Training completes."""
    from flowers_classifier import factory
    from flowers_classifier.preprocess import Preprocess
    from flowers_fastai.learner import Recipe, build_learner, fine_tune

    root = make_image_folder(tmp_path / "imgs", per_class=4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    df = data.prepare_split(root, run_dir, valid_pct=0.25, seed=0)
    gone = df[~df.is_valid]["path"].iloc[0]
    (root / gone).unlink()
    data.RGBImage.failure_log = run_dir / "skipped.csv"
    try:
        dls = data.make_dataloaders(df, root, Preprocess(32, (0.5,) * 3, (0.5,) * 3), bs=8)
        learn = build_learner(dls, factory.create_cnn(TINY_CNN), Recipe(patience=None), run_dir)
        with pytest.warns(UserWarning, match="no such file"):
            fine_tune(learn, Recipe(epochs=1, freeze_epochs=0, patience=None))
    finally:
        data.RGBImage.failure_log = None
    assert len(pd.read_csv(run_dir / "history.csv")) == 1
    reported = pd.read_csv(run_dir / "skipped.csv")
    rows = zip(reported.path, reported.reason, strict=True)
    assert any(p.endswith(gone) and "failed during training" in r for p, r in rows)


class InterruptAfterFirstEpoch(Callback):
    """Ctrl-C right after the first epoch's checkpoints and history row were written."""

    order = 100

    def after_epoch(self):
        raise KeyboardInterrupt


class StopBeforeTraining(Exception):
    pass


class CaptureResumed(Callback):
    """The resumed learner as its first fit starts training (EMA and channels_last applied in before_fit)."""

    order = 100

    def before_train(self):
        ema = next(cb for cb in self.learn.cbs if isinstance(cb, EmaCallback))
        self.ema_state, self.ema_steps = {k: v.clone() for k, v in ema.model_ema.module.state_dict().items()}, ema.steps
        raise StopBeforeTraining("captured the resumed learner")


def _drop_probs(model) -> list[float]:
    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


def _grad_checkpointing(model) -> list[bool]:
    return [m.grad_checkpointing for m in model.modules() if hasattr(m, "grad_checkpointing")]


@pytest.mark.parametrize("arch", ["cnn", "clip"])
def test_resume_rebuilds_the_model_ema_and_recipe_of_the_run(tmp_path, real_flowers, monkeypatch, arch):
    """Interrupted after epoch 1, then --resume (train.resume_args + train.train, in-process): the same
    drop-path rate (cnn from --weights: 0.1), gradient checkpointing (clip), the EMA as last.pth saved it
    (not re-initialised from the weights) and the recipe's precision and channels_last."""
    from flowers_fastai import learner as learner_mod
    from flowers_fastai import train as train_mod

    monkeypatch.setattr(data.RGBImage, "failure_log", None)  # train() sets it; leave no trace for other tests
    run_dir = tmp_path / "run"
    argv = ["--data", str(real_flowers), "--img-size", "64", "--bs", "16", "--no-export", "--patience", "0",
            "--freeze-epochs", "0", "--epochs", "2", "--ema", "0.999", "--channels-last", "--precision", "fp32",
            "--out", str(run_dir)]
    if arch == "cnn":  # a local backbone file counts as pretrained: drop path 0.1
        torch.manual_seed(0)
        torch.save(factory.create_cnn(TINY_CNN).state_dict(), tmp_path / "backbone.pth")
        argv += ["--model", TINY_CNN, "--weights", str(tmp_path / "backbone.pth")]
    else:
        argv += ["--arch", "clip", "--model", TINY_CLIP, "--no-pretrained", "--head-init", "random",
                 "--grad-checkpointing"]
    learners = []

    def fine_tune(learn, recipe, epochs_done=0, cb=InterruptAfterFirstEpoch):
        learners.append(learn)
        learn.add_cb(cb())
        return learner_mod.fine_tune(learn, recipe, epochs_done)

    monkeypatch.setattr(train_mod, "fine_tune", fine_tune)
    with pytest.raises(train_mod.TrainingInterrupted):
        train_mod.train(train_mod.build_parser().parse_args(argv))
    saved = torch.load(run_dir / "last.pth", weights_only=True)

    monkeypatch.setattr(train_mod, "fine_tune", partial(fine_tune, cb=CaptureResumed))
    with pytest.raises(StopBeforeTraining):
        train_mod.train(train_mod.resume_args(run_dir))
    first, resumed = learners
    capture = next(cb for cb in resumed.cbs if isinstance(cb, CaptureResumed))

    assert _drop_probs(resumed.model) == _drop_probs(first.model)
    assert _grad_checkpointing(resumed.model) == _grad_checkpointing(first.model)
    if arch == "cnn":
        assert _drop_probs(first.model) and all(p > 0 for p in _drop_probs(first.model))
    else:
        assert first.model.visual.transformer.grad_checkpointing
    assert capture.ema_steps == saved["ema"]["steps"] == len(first.dls.train)
    assert all(torch.equal(capture.ema_state[k], saved["ema"]["module"][k]) for k in capture.ema_state)
    raw = resumed.model.state_dict()
    assert any(not torch.equal(capture.ema_state[k], raw[k]) for k in raw if raw[k].is_floating_point())
    recipe = json.loads((run_dir / "metrics.json").read_text())["recipe"]
    assert (recipe["precision"], recipe["channels_last"]) == ("fp32", True)
    assert any(isinstance(cb, ChannelsLast) for cb in resumed.cbs)
    assert not any(isinstance(cb, MixedPrecision) for cb in resumed.cbs)


class InterruptStage2(Callback):
    """Ctrl-C as stage 2 (unfrozen) starts training its epoch `epoch`: epochs 0..epoch-1 of it are finished."""

    order = 100

    def __init__(self, epoch: int):
        self.at = epoch

    def before_train(self):
        if self.learn.history.stage == "unfrozen" and self.epoch == self.at:
            raise KeyboardInterrupt


class FirstTrainedEpoch(Callback):
    """Where the resumed run starts training: stage, epoch of its fit's schedule, and what is trainable."""

    order = 100
    seen = None

    def before_train(self):
        if self.seen is None:
            self.seen = dict(stage=self.learn.history.stage, epoch=self.epoch, n_epoch=self.n_epoch,
                             body_trainable=all(p.requires_grad for p in self.model.parameters()))


@pytest.mark.parametrize("stage2_done", [0, 1, 2])
def test_resume_after_stage_1_stopped_early_continues_stage_2(tmp_path, real_flowers, monkeypatch, stage2_done):
    """--freeze-epochs 5 --patience 2: stage 1 stops early after 3 epochs (at an LR too small to change a
    prediction, accuracy never improves), stage 2 finishes `stage2_done` epochs and Ctrl-C comes. --resume
    goes on with stage 2 (body unfrozen) at its epoch `stage2_done`, with stage 2's patience as it stood:
    the run ends as an unbroken one would, after 3 epochs of each stage."""
    from flowers_fastai import learner as learner_mod
    from flowers_fastai import train as train_mod

    monkeypatch.setattr(data.RGBImage, "failure_log", None)  # train() sets it; leave no trace for other tests
    run_dir = tmp_path / "run"
    argv = ["--data", str(real_flowers), "--model", TINY_CNN, "--no-pretrained", "--img-size", "64", "--bs", "16",
            "--no-export", "--freeze-epochs", "5", "--epochs", "4", "--patience", "2", "--head-lr", "1e-12",
            "--lr", "1e-12", "--out", str(run_dir)]
    added = []

    def fine_tune(learn, recipe, epochs_done=None, cb=None):
        added.append(cb)
        learn.add_cb(cb)
        return learner_mod.fine_tune(learn, recipe, epochs_done)

    monkeypatch.setattr(train_mod, "fine_tune", partial(fine_tune, cb=InterruptStage2(stage2_done)))
    with pytest.raises(train_mod.TrainingInterrupted):
        train_mod.train(train_mod.build_parser().parse_args(argv))
    stages = pd.read_csv(run_dir / "history.csv")["stage"].tolist()
    assert stages == ["frozen"] * 3 + ["unfrozen"] * stage2_done  # stage 1 did stop early

    monkeypatch.setattr(train_mod, "fine_tune", partial(fine_tune, cb=FirstTrainedEpoch()))
    train_mod.train(train_mod.resume_args(run_dir))
    assert added[-1].seen == dict(stage="unfrozen", epoch=stage2_done, n_epoch=4, body_trainable=True)
    hist = pd.read_csv(run_dir / "history.csv")
    assert hist["stage"].tolist() == ["frozen"] * 3 + ["unfrozen"] * 3
    assert hist["epoch"].tolist() == list(range(6))
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
