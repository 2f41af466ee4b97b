"""Exploring before training: `train.py --lr-find`, `--lr auto`, the initial sanity check and
`--overfit-batch`, on a synthetic folder with a tiny random-init convnextv2_atto at 64 px."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CNN, TINY_SIZE, make_image_folder

from flowers_classifier import factory
from flowers_fastai import cli as commands
from flowers_fastai import train
from flowers_fastai.data import make_dataloaders, prepare_split
from flowers_fastai.learner import HistoryCallback, Recipe, build_learner
from flowers_fastai.probes import LR_FIND_METHODS, SanityCheckError, find_lr, sanity_check

TINY = ["--arch", "cnn", "--model", TINY_CNN, "--no-pretrained", "--img-size", str(TINY_SIZE), "--bs", "8",
        "--workers", "0"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("lr") / "images", per_class=8)


@pytest.fixture
def learn(images, tmp_path):
    """The learner train.py would build for a from-scratch tiny run (no MixUp, so the loss is plain)."""
    torch.manual_seed(0)
    df = prepare_split(images, tmp_path, valid_pct=0.25, seed=0)
    model = factory.create_cnn(TINY_CNN)
    dls = make_dataloaders(df, images, factory.cnn_preprocess(model, TINY_SIZE), bs=8)
    return build_learner(dls, model, Recipe(freeze_epochs=0, epochs=1, label_smoothing=0.0), tmp_path)


def test_lr_argument_accepts_numbers_and_auto():
    parse = lambda *a: train.build_parser().parse_args(list(a))  # noqa: E731
    assert parse("--lr", "auto").lr == "auto"
    assert parse("--lr", "3e-4").lr == pytest.approx(3e-4)
    for bad in ("fast", "-1e-3", "0"):
        with pytest.raises(SystemExit):
            parse("--lr", bad)


def test_lr_find_cli_writes_plot_and_suggestions_and_does_not_train(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert commands.train([*TINY, "--data", str(images), "--lr-find", "--lr-find-iters", "30", "--out", str(out)]) == 0
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    found = json.loads((out / "lr_find.json").read_text())
    assert set(found["suggestions"]) == set(LR_FIND_METHODS)
    # The suggestions come from the curve written beside them: fastai's "minimum" is a tenth of the LR at
    # the lowest loss of the sweep less its first tenth and last 5 steps, "steep" one of the swept LRs.
    window = slice(found["num_it"] // 10, -5)
    lrs, losses = np.array(found["lrs"])[window], np.array(found["losses"], dtype=float)[window]
    diverged = np.flatnonzero(~np.isfinite(losses))  # fastai cuts the sweep at the first NaN
    end = diverged[0] if len(diverged) else len(losses)
    assert found["suggestions"]["minimum"] == pytest.approx(lrs[:end][losses[:end].argmin()] / 10, rel=1e-5)
    assert np.isclose(lrs, found["suggestions"]["steep"], rtol=1e-5).any()
    assert found["stage"] == "unfrozen"  # from scratch there is no frozen stage to start with
    assert len(found["lrs"]) == len(found["losses"]) == found["recorded_steps"] > 20
    assert found["lrs"] == sorted(found["lrs"])  # the exponential sweep, step by step
    printed = capsys.readouterr().out
    assert all(f"{name} " in printed for name in LR_FIND_METHODS)
    # It stops there: no training, no export, and the folder can still take the real run.
    assert not any((out / name).exists() for name in ("best.pth", "metrics.json", "learner.pkl"))
    assert len(pd.read_csv(out / "history.csv")) == 0


def test_too_few_lr_find_steps_is_a_clear_error(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert commands.train([*TINY, "--data", str(images), "--lr-find", "--lr-find-iters", "10", "--out", str(out)]) == 2
    assert "raise --lr-find-iters" in capsys.readouterr().err
    assert not (out / "lr_find.json").exists()


def test_find_lr_leaves_weights_and_callbacks_as_they_were(learn, tmp_path):
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    cbs = {type(cb).__name__ for cb in learn.cbs}
    found = find_lr(learn, "frozen", tmp_path / "explore", num_it=30)
    assert found["stage"] == "frozen" and len(found["suggestions"]) == 4
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    assert {type(cb).__name__ for cb in learn.cbs} == cbs
    history = next(cb for cb in learn.cbs if isinstance(cb, HistoryCallback))
    assert history.epochs_done == 0  # the mock fit did not count as training epochs
    assert not any((tmp_path / f"{name}.pth").exists() for name in ("best", "last"))  # nor saved checkpoints
    assert (tmp_path / "explore" / "lr_find.png").is_file()


def test_lr_auto_trains_stage_2_with_the_valley_suggestion(images, tmp_path):
    out = tmp_path / "run"
    assert commands.train([*TINY, "--data", str(images), "--lr", "auto", "--lr-find-iters", "30", "--epochs", "1",
                       "--mixup", "0", "--out", str(out), "--no-export"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    valley = json.loads((out / "lr_find.json").read_text())["suggestions"]["valley"]
    assert metrics["lr_auto"]["valley"] == valley and metrics["lr_auto"]["used_for"] == "lr"
    assert metrics["recipe"]["lr"] == valley  # the recipe trained with
    hist = pd.read_csv(out / "history.csv")
    # one-cycle ends each epoch below its max: every recorded LR is at most the suggestion
    assert list(hist["stage"]) == ["unfrozen"] and (hist["lr"] <= valley * 1.001).all() and (hist["lr"] > 0).all()
    # the start-of-training sanity check and the end-of-training evaluation are in the run folder
    assert metrics["sanity"]["grad_norm"] > 0
    assert abs(metrics["sanity"]["initial_loss"] - math.log(5)) < 0.5
    assert (out / "eval_metrics.json").is_file() and (out / "audit.json").is_file()
    assert metrics["evaluation"]["accuracy"] == json.loads((out / "eval_metrics.json").read_text())["accuracy"]


def test_sanity_check_records_chance_loss_and_a_gradient(learn):
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    result = sanity_check(learn)
    assert result["loss_ok"] and result["initial_loss"] == pytest.approx(math.log(5), abs=0.3)
    assert result["grad_norm"] > 0 and result["params_without_grad"] == 0
    assert all(torch.equal(before[k], v) for k, v in learn.model.state_dict().items())
    assert all(p.grad is None for p in learn.model.parameters())


def test_sanity_check_fails_when_nothing_can_train(learn):
    for p in learn.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SanityCheckError, match="requires grad"):
        sanity_check(learn)


def test_sanity_check_warns_on_a_far_off_initial_loss(learn):
    with torch.no_grad():
        learn.model.head.fc.weight.mul_(1e4)  # huge logits: a confident random head
    with pytest.warns(UserWarning, match="initial loss"):
        assert not sanity_check(learn)["loss_ok"]


def test_overfit_batch_succeeds_and_reports(images, tmp_path):
    out = tmp_path / "run"
    assert commands.train([*TINY, "--data", str(images), "--overfit-batch", "--out", str(out)]) == 0
    result = json.loads((out / "overfit_batch.json").read_text())
    assert result["success"] and result["final_loss"] < 0.1 and result["batch_accuracy"] == 1.0
    assert 1 <= result["steps"] <= 200 and len(result["losses"]) == result["steps"] + 1
    assert not (out / "best.pth").exists()


def test_overfit_batch_failure_exits_1(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert commands.train([*TINY, "--data", str(images), "--overfit-batch", "--lr", "1e-9", "--overfit-steps", "3",
                       "--out", str(out)]) == 1
    result = json.loads((out / "overfit_batch.json").read_text())
    assert not result["success"] and result["steps"] == 3
    assert "could not overfit one batch" in capsys.readouterr().err
