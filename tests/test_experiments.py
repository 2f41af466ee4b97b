"""Experiments (flowers_fastai/experiments.py): a 2 x 2 grid of tiny from-scratch runs trains each run once
into its own folder and summarises it; a second invocation trains nothing; a bad plan key fails before any
training; a failing run is recorded while the others finish. The grid's plan also turns on --tensorboard,
whose event files are read back here."""

import json

import pandas as pd
import pytest
from conftest import TINY_CNN, make_image_folder
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flowers_fastai import experiments

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
    return out, plan, experiments.main([plan, "--out", str(out)])


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
    assert experiments.main([plan, "--out", str(out)]) == 0
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == stamps
    assert len(pd.read_csv(out / "results.csv")) == 4
    assert experiments.main([plan, "--out", str(out), "--dry-run"]) == 0
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
    assert experiments.main([plan, "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "'typo'" in err and "train.py --help" in err
    assert calls == [] and not (tmp_path / "exp").exists()


def test_failed_run_is_recorded_and_the_others_finish(photos, tmp_path):
    body = f'[[run]]\nname = "no-photos"\ndata = "{tmp_path / "missing"}"\n[[run]]\nname = "ok"\n'
    out = tmp_path / "exp"
    assert experiments.main([write_plan(tmp_path / "plan.toml", body, photos), "--out", str(out)]) == 1
    results = pd.read_csv(out / "results.csv").set_index("config")
    assert results.loc["no-photos", "status"] == "failed"
    assert "missing" in results.loc["no-photos", "error"]
    assert (out / "no-photos-seed42" / experiments.ERROR_FILE).is_file()
    assert results.loc["ok", "status"] == "finished"
    assert list(experiments.summarize(results.reset_index()).index) == ["ok"]


def test_interrupted_run_is_resumed_and_a_crashed_one_restarted(tmp_path, monkeypatch):
    """No training: folders as an interrupted run (a finished epoch, last.pth) and a run that crashed before
    its first epoch leave them; the next invocation resumes the first (train.py --resume) and starts the
    second afresh."""
    plan = tmp_path / "plan.toml"
    plan.write_text('seeds = [0]\n[defaults]\nepochs = 2\n[[run]]\nname = "cut"\n[[run]]\nname = "crashed"\n')
    out = tmp_path / "exp"
    cut, crashed = out / "cut-seed0", out / "crashed-seed0"
    for folder, status in ((cut, "interrupted"), (crashed, "running")):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"status": status}))
        rows = "0,unfrozen,1.5,1.4,0.5,1e-3,1.0\n" if folder == cut else ""
        (folder / "history.csv").write_text("epoch,stage,train_loss,valid_loss,accuracy,lr,time\n" + rows)
    (cut / "last.pth").write_bytes(b"weights")
    (crashed / "split.csv").write_text("left over")
    resumed, started = [], []
    monkeypatch.setattr(experiments, "resume_args", lambda folder: resumed.append(folder) or "resume-args")
    monkeypatch.setattr(experiments, "train", lambda args: started.append(args))
    experiments.main([str(plan), "--out", str(out)])
    assert resumed == [cut] and started[0] == "resume-args"
    assert len(started) == 2 and started[1].out == crashed and started[1].epochs == 2 and started[1].seed == 0
    assert not crashed.exists()  # the partial folder was cleared for the fresh start
