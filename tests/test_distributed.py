"""Data-parallel training on the CPU: 2 processes (torchrun, gloo) on a tiny model and the real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_CNN

import flowers_classifier as fc
from flowers_fastai import distributed, train

REPO = Path(__file__).resolve().parents[1]
FILES = ("split.csv", "audit.json", "history.csv", "metrics.json", "best.pth", "last.pth", "learner.pkl",
         "eval_metrics.json", "confusion_matrix.png")


@pytest.fixture(scope="module")
def ddp_run(real_flowers, tmp_path_factory):
    """One 1-epoch run launched as 2 processes with torchrun; returns (run folder, exported .pth, stdout)."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--model", TINY_CNN, "--no-pretrained", "--data", str(real_flowers), "--img-size", "32", "--epochs", "1",
           "--freeze-epochs", "0", "--bs", "8", "--out", str(tmp / "run"), "--export", str(tmp / "m.pth")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / "run", tmp / "m.pth", done.stdout


def test_two_processes_train_one_run_written_once(ddp_run, real_photos):
    run, exported, out = ddp_run
    for name in FILES:
        assert (run / name).is_file(), name
    assert len(pd.read_csv(run / "history.csv")) == 1  # one row: rank 0 alone wrote it
    assert out.count("best valid accuracy") == 1 and out.count("exported ") == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    split = pd.read_csv(run / "split.csv")
    n_train = int((~split["is_valid"]).sum())
    assert sum(metrics["distributed"]["train_shards"]) == n_train  # each rank its half of the train split
    assert fc.predict(fc.load_model(exported, device="cpu"), real_photos["rose"][0]) in fc.CLASSES


def test_two_processes_hold_identical_weights(ddp_run):
    run, _, out = ddp_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed"]["world_size"] == 2
    assert metrics["distributed"]["backend"] == "gloo"
    digests = metrics["distributed"]["weights_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and metrics["distributed"]["weights_in_sync"]
    assert "rank 0: " in out and "rank 1: " in out


def test_refuses_an_accelerate_cpu_launch_that_started_one_process(monkeypatch, tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs the script once, MASTER_ADDR set but no WORLD_SIZE."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(ValueError, match="started only this one"):
        distributed.check_launch()
    assert train.main(["--out", str(tmp_path / "run"), "--no-pretrained"]) == 2
    assert not (tmp_path / "run").exists()
