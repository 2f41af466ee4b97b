"""Experiments (flowers_fastai/experiments.py): a 2 x 2 grid of tiny from-scratch runs trains each run once
into its own folder and summarises it; a second invocation trains nothing; a bad plan key fails before any
training; a failing run is recorded while the others finish; interrupted experiments resume each run as
they should (skip, resume, start afresh, train again on changed settings); each run frees the last one's
learner. The grid's plan also turns on --tensorboard, whose event files are read back here."""

import gc
import json
import re
import weakref

import pandas as pd
import pytest
from conftest import TINY_CNN, make_image_folder
from fastai.callback.core import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowers_fastai import cli as commands
from flowers_fastai import data, experiments, learner
from flowers_fastai import train as train_mod

TINY = f"""[defaults]
model = "{TINY_CNN}"
no_pretrained = true
img-size = 32
epochs = 1
bs = 8
patience = 0
"""


def write_plan(path, body: str, data, top: str = "") -> str:
    """`top`: top-level keys such as seeds, which must come before the first [table]."""
    path.write_text(top + TINY + f'data = "{data}"\n' + body)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("photos"), per_class=6, size=40)


@pytest.fixture(scope="module")
def grid(photos, tmp_path_factory):
    """(experiment folder, plan path, exit code) of 2 LRs x 2 seeds, one epoch each."""
    tmp = tmp_path_factory.mktemp("grid")
    plan = write_plan(tmp / "plan.toml", "tensorboard = true\n[grid]\nlr = [1e-3, 3e-3]\n", photos,
                      top="seeds = [0, 1]\n")
    out = tmp / "exp"
    return out, plan, commands.experiments([plan, "--out", str(out)])


def test_grid_trains_each_run_once_and_summarises(grid):
    out, _, code = grid
    assert code == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["lr=0.001-seed0", "lr=0.001-seed1", "lr=0.003-seed0", "lr=0.003-seed1"]
    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4 and set(results["status"]) == {"finished"}
    assert sorted(zip(results["lr"], results["seed"], strict=True)) == [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
    for _, row in results.iterrows():  # each row is its own run's metrics.json
        metrics = json.loads((out / row["run_dir"] / "metrics.json").read_text())
        assert metrics["config"]["lr"] == row["lr"] and metrics["config"]["seed"] == row["seed"]
        assert row["best_accuracy"] == metrics["best_accuracy"] and row["best_epoch"] == metrics["best_epoch"]
    summary = experiments.summarize(results)
    for config in ("lr=0.001", "lr=0.003"):
        accs = [json.loads((out / f"{config}-seed{s}" / "metrics.json").read_text())["best_accuracy"] for s in (0, 1)]
        assert summary.loc[config, "best_mean"] == pytest.approx(sum(accs) / 2)
        assert summary.loc[config, "best_std"] == pytest.approx(pd.Series(accs).std())
        assert f"{100 * sum(accs) / 2:.1f} ± {100 * pd.Series(accs).std():.1f}" in (out / "summary.md").read_text()
    assert list(summary["best_mean"]) == sorted(summary["best_mean"], reverse=True)
    assert (out / "summary.png").stat().st_size > 0


def test_second_invocation_trains_nothing(grid, monkeypatch, capsys):
    out, plan, _ = grid
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    calls = []
    monkeypatch.setattr(experiments, "train", lambda args: calls.append(args))
    assert commands.experiments([plan, "--out", str(out)]) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == stamps
    assert len(pd.read_csv(out / "results.csv")) == 4
    assert commands.experiments([plan, "--out", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("skip (finished)") == 4


def test_tensorboard_logs_loss_accuracy_and_lr(grid):
    out, _, _ = grid
    run = out / "lr=0.003-seed1"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train_loss", "valid_loss", "accuracy", "lr"} <= set(events.Tags()["scalars"])
    history = pd.read_csv(run / "history.csv")
    assert [e.value for e in events.Scalars("accuracy")] == pytest.approx(list(history["accuracy"]))
    assert len(events.Scalars("train_loss")) > len(history)  # per step, not per epoch


def test_unknown_plan_key_fails_before_training(photos, tmp_path, monkeypatch, capsys):
    plan = write_plan(tmp_path / "plan.toml", '[[run]]\nname = "ok"\n[[run]]\nname = "typo"\nlearning_rate = 1e-3\n',
                      photos)
    calls = []
    monkeypatch.setattr(experiments, "train", lambda args: calls.append(args))
    assert commands.experiments([plan, "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "'typo'" in err and "train.py --help" in err
    assert calls == [] and not (tmp_path / "exp").exists()


def test_failed_run_is_recorded_and_the_others_finish(photos, tmp_path):
    body = f'[[run]]\nname = "no-photos"\ndata = "{tmp_path / "missing"}"\n[[run]]\nname = "ok"\n'
    out = tmp_path / "exp"
    assert commands.experiments([write_plan(tmp_path / "plan.toml", body, photos), "--out", str(out)]) == 1
    results = pd.read_csv(out / "results.csv").set_index("config")
    assert results.loc["no-photos", "status"] == "failed"
    assert "missing" in results.loc["no-photos", "error"]
    assert (out / "no-photos-seed42" / experiments.ERROR_FILE).is_file()
    assert results.loc["ok", "status"] == "finished"
    assert list(experiments.summarize(results.reset_index()).index) == ["ok"]


class InterruptAfterFirstEpoch(Callback):
    """Ctrl-C right after the first epoch's checkpoints and history row were written."""

    order = 100

    def after_epoch(self):
        raise KeyboardInterrupt


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def test_second_invocations_skip_resume_restart_and_rerun_what_they_should(photos, tmp_path, monkeypatch, capsys):
    """A real plan of three tiny runs, run four times. 1: "done" finishes, Ctrl-C after "cut"'s first epoch.
    2: "done" is skipped, "cut" resumes from its epoch, Ctrl-C in "auto"'s lr_find (--lr auto, after its
    frozen epoch, before its LR was chosen). 3: "auto" starts afresh (train.py cannot resume it) and
    finishes. 4: "done"'s lr changed in the plan: it trains again, its old folder kept aside; results.csv
    labels every run with the settings its metrics.json records."""
    monkeypatch.setattr(data.RGBImage, "failure_log", None)  # train() sets it; leave no trace for other tests
    runs = ('[[run]]\nname = "done"\nlr = {lr}\n[[run]]\nname = "cut"\nepochs = 2\n'
            '[[run]]\nname = "auto"\nlr = "auto"\nfreeze-epochs = 1\nlr-find-iters = 30\n')
    plan, out = tmp_path / "plan.toml", tmp_path / "exp"
    write_plan(plan, runs.format(lr=1e-3), photos, top="seeds = [0]\n")
    done, cut, auto = out / "done-seed0", out / "cut-seed0", out / "auto-seed0"
    interrupt = {cut}

    def fine_tune(learn, recipe, epochs_done=0):
        if learn.dls.flowers["run_dir"] in interrupt:
            interrupt.discard(learn.dls.flowers["run_dir"])
            learn.add_cb(InterruptAfterFirstEpoch())
        return learner.fine_tune(learn, recipe, epochs_done)

    def status(folder):
        return json.loads((folder / "metrics.json").read_text())["status"]

    monkeypatch.setattr(train_mod, "fine_tune", fine_tune)
    assert commands.experiments([str(plan), "--out", str(out)]) == 130
    assert (status(done), status(cut), auto.exists()) == ("finished", "interrupted", False)
    first_epoch = pd.read_csv(cut / "history.csv")
    assert len(first_epoch) == 1
    done_stamp = (done / "metrics.json").stat().st_mtime_ns

    monkeypatch.setattr(train_mod, "find_lr", ctrl_c)
    assert commands.experiments([str(plan), "--out", str(out)]) == 130
    assert (done / "metrics.json").stat().st_mtime_ns == done_stamp
    history = pd.read_csv(cut / "history.csv")
    assert status(cut) == "finished" and history["epoch"].tolist() == [0, 1]
    pd.testing.assert_frame_equal(history.iloc[:1], first_epoch)  # resumed, not trained again
    auto_metrics = json.loads((auto / "metrics.json").read_text())
    assert auto_metrics["status"] == "interrupted" and auto_metrics["recipe"]["lr"] is None
    assert len(pd.read_csv(auto / "history.csv")) == 1 and (auto / "last.pth").is_file()

    monkeypatch.undo()
    monkeypatch.setattr(data.RGBImage, "failure_log", None)
    assert commands.experiments([str(plan), "--out", str(out)]) == 0
    metrics = json.loads((auto / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["recipe"]["lr"] == metrics["lr_auto"]["valley"]
    assert pd.read_csv(auto / "history.csv")["stage"].tolist() == ["frozen", "unfrozen"]
    assert not (auto / experiments.ERROR_FILE).exists()
    assert (done / "metrics.json").stat().st_mtime_ns == done_stamp

    write_plan(plan, runs.format(lr=3e-3), photos, top="seeds = [0]\n")
    capsys.readouterr()
    assert commands.experiments([str(plan), "--out", str(out), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert re.search(r"^train again +\S*done-seed0: train\.py", dry, re.M) and "--lr 0.001 -> 0.003" in dry
    assert dry.count("skip (finished)") == 2
    assert commands.experiments([str(plan), "--out", str(out)]) == 0
    kept = out / experiments.SUPERSEDED / "done-seed0"
    old = json.loads((kept / "metrics.json").read_text())
    assert old["status"] == "finished" and old["config"]["lr"] == 1e-3
    assert (kept / "metrics.json").stat().st_mtime_ns == done_stamp
    results = pd.read_csv(out / "results.csv").set_index("config")
    assert list(results["status"]) == ["finished"] * 3
    for _, row in results.iterrows():
        ran = json.loads((out / row["run_dir"] / "metrics.json").read_text())["config"]
        assert row["lr"] == str(ran["lr"]) and row["seed"] == ran["seed"]
    assert results.loc["done", "lr"] == "0.003"


def test_each_run_frees_the_previous_runs_learner(photos, tmp_path, monkeypatch):
    """When a run's learner is built, nothing of the previous run's learner is left: its model, optimizer
    state and (on a GPU) their memory are freed by the experiment itself, not whenever Python's cycle
    collector happens to run (switched off here, so that the test does not depend on its timing)."""
    monkeypatch.setattr(data.RGBImage, "failure_log", None)
    plan = write_plan(tmp_path / "plan.toml", "[grid]\nlr = [1e-3, 3e-3]\n", photos)
    built, alive_at_next = [], []

    def make_learner(*args, **kwargs):
        alive_at_next.extend(ref() is not None for ref in built)
        learn = make_learner_real(*args, **kwargs)
        built.extend([weakref.ref(learn), weakref.ref(learn.model)])
        return learn

    make_learner_real = train_mod.make_learner
    monkeypatch.setattr(train_mod, "make_learner", make_learner)
    gc.disable()
    try:
        assert commands.experiments([plan, "--out", str(tmp_path / "exp")]) == 0
    finally:
        gc.enable()
    assert len(built) == 4 and alive_at_next == [False, False]
