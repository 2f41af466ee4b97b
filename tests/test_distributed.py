"""Data-parallel training on the CPU: 2 processes (torchrun, gloo) on a tiny model and the real photos."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_CNN

import flowers_classifier as fc
from flowers_fastai import cli as commands
from flowers_fastai import data, distributed

REPO = Path(__file__).resolve().parents[1]
FILES = ("split.csv", "audit.json", "history.csv", "metrics.json", "best.pth", "last.pth", "learner.pkl",
         "eval_metrics.json", "confusion_matrix.png")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
            *args]


def _tiny(data: Path, out: Path, *args: str) -> list[str]:
    return ["--model", TINY_CNN, "--no-pretrained", "--data", str(data), "--img-size", "32", "--bs", "8",
            "--out", str(out), *args]


def _torchrun_per_rank(flag: str, base: Path, *args: str) -> list[str]:
    """torchrun whose ranks each get their own run folder, `flag base/rank<RANK>`, as on machines that share no
    disk: a shell per rank adds the flag (torchrun sets RANK; $0 is this Python, "$@" the arguments)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
            "sh", "-c", f'exec "$0" train.py "$@" {flag} "{base}/rank$RANK"', sys.executable, *args]


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ddp_run(real_flowers, tmp_path_factory):
    """One 1-epoch run launched as 2 processes with torchrun; returns (run folder, exported .pth, stdout)."""
    tmp = tmp_path_factory.mktemp("ddp")
    done = _run(_torchrun(*_tiny(real_flowers, tmp / "run", "--epochs", "1", "--freeze-epochs", "0",
                                 "--export", str(tmp / "m.pth"))))
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
    assert commands.train(["--out", str(tmp_path / "run"), "--no-pretrained"]) == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("outcome", ["finished", "ValueError", "KeyboardInterrupt"])
def test_train_main_leaves_the_process_group_on_every_way_out(monkeypatch, tmp_path, outcome):
    """A rank that exits with its gloo group still up can abort (SIGABRT) in interpreter teardown: main leaves
    it whether training finished, failed with a user error, or was interrupted."""
    def fake_train(args):
        dist = torch.distributed
        dist.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
        assert dist.is_initialized()
        if outcome == "ValueError":
            raise ValueError("bad flag")
        if outcome == "KeyboardInterrupt":
            raise KeyboardInterrupt
        return tmp_path

    monkeypatch.setattr(commands, "train_run", fake_train)
    if outcome == "KeyboardInterrupt":
        with pytest.raises(KeyboardInterrupt):
            commands.train(["--out", str(tmp_path / "run")])
    else:
        assert commands.train(["--out", str(tmp_path / "run")]) == (0 if outcome == "finished" else 2)
    assert not torch.distributed.is_initialized()
    distributed.shutdown()  # no group: nothing to do, no error


def test_lr_auto_under_two_processes_rank_0_finds_every_rank_uses(real_flowers, tmp_path):
    """--lr auto: stage 1 data-parallel, lr_find on rank 0 alone (outside DDP), its valley broadcast."""
    run = tmp_path / "run"
    done = _run(_torchrun(*_tiny(real_flowers, run, "--lr", "auto", "--lr-find-iters", "30", "--freeze-epochs",
                                 "1", "--epochs", "1", "--mixup", "0", "--no-export")))
    metrics = json.loads((run / "metrics.json").read_text())
    valley = json.loads((run / "lr_find.json").read_text())["suggestions"]["valley"]
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert metrics["lr_auto"]["valley"] == valley == metrics["recipe"]["lr"]
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["stage"]) == ["frozen", "unfrozen"] and (hist.loc[1:, "lr"] <= valley * 1.001).all()
    assert metrics["distributed"]["weights_in_sync"]  # rank 1 never ran lr_find: still the same weights
    assert done.stdout.count("--lr auto: lr_find valley suggestion") == 2  # both ranks train stage 2 with it
    assert not list(run.glob("models/**/_tmp.pth")) and not list(run.glob("**/_tmp.pth"))


def test_lr_find_and_overfit_batch_refused_under_two_processes(real_flowers, tmp_path):
    cmd = _torchrun(*_tiny(real_flowers, tmp_path / "run", "--lr-find"))
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "single-process explorations" in done.stderr


def test_sigint_under_torchrun_then_resume_with_two_processes(real_flowers, tmp_path):
    """Ctrl-C (SIGINT to torchrun's process group) after the first epoch: every rank exits, metrics.json says
    interrupted; --resume with 2 processes finishes the 3 epochs, weights in sync; 1 process is refused.
    With freeze -> unfreeze, discriminative LRs, MixUp/CutMix and EMA (its state in last.pth) on."""
    run = tmp_path / "run"
    cmd = _torchrun(*_tiny(real_flowers, run, "--freeze-epochs", "1", "--epochs", "2", "--mixup", "0.4",
                           "--cutmix", "1.0", "--ema", "0.9", "--lr-mult", "10", "--no-export"))
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "history.csv").is_file() and len(pd.read_csv(run / "history.csv")) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: torchrun and both ranks
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode != 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["world_size"] == 2, out[-3000:]
    done_epochs = len(pd.read_csv(run / "history.csv"))
    assert 1 <= done_epochs < 3, out[-3000:]
    assert "ema" in torch.load(run / "last.pth", map_location="cpu", weights_only=True)  # EMA state to resume

    one = subprocess.run([sys.executable, "train.py", "--resume", str(run)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "same number of processes" in one.stderr

    resumed = _run(_torchrun("--resume", str(run)))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert metrics["distributed"]["weights_in_sync"] and metrics["recipe"]["ema_decay"] == 0.9
    hist = pd.read_csv(run / "history.csv")
    assert len(hist) == 3 and list(hist["stage"]) == ["frozen", "unfrozen", "unfrozen"], resumed.stdout[-2000:]


def _report_failures(log: Path, start, n: int) -> None:
    start.wait()  # every writer released at once, onto a log that does not exist yet
    for i in range(n):
        data.report_late_failure(log, f"rose/{os.getpid()}-{i}.jpg", "no such file")


def test_late_failures_are_listed_once_by_rank_0_and_its_workers(tmp_path, monkeypatch):
    """skipped.csv: several processes of rank 0 (its DataLoader workers, forked) append at the same moment to a
    new file: one header, every row. A rank > 0 only warns: its run folder may be on another machine."""
    monkeypatch.setenv("RANK", "1")
    with pytest.warns(UserWarning, match="rank 1: not listed in skipped.csv"):
        data.report_late_failure(tmp_path / "rank1.csv", "rose/a.jpg", "no such file")
    assert not (tmp_path / "rank1.csv").exists()

    monkeypatch.setenv("RANK", "0")
    ctx = multiprocessing.get_context("fork")
    writers, rows = 6, 20
    for trial in range(5):
        log = tmp_path / f"skipped{trial}.csv"
        start = ctx.Barrier(writers)
        procs = [ctx.Process(target=_report_failures, args=(log, start, rows)) for _ in range(writers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * writers
        lines = log.read_text().splitlines()
        assert lines[0] == "path,reason" and lines.count("path,reason") == 1, lines[:10]
        table = pd.read_csv(log)
        assert len(table) == writers * rows and table["reason"].str.startswith("failed during training").all()


def test_ranks_with_their_own_run_folders_train_and_resume(real_flowers, tmp_path):
    """Ranks whose run folders differ (two machines, no shared disk): only rank 0's folder is written, and what
    rank 1 needs from it comes over the process group: the split, best.pth at each fit's end (both stages), and
    on --resume metrics.json, history.csv, last.pth and best.pth (stage 1 just ended: stage 2 starts from its
    best weights)."""
    run, other = tmp_path / "rank0", tmp_path / "rank1"
    _run(_torchrun_per_rank("--out", tmp_path, "--model", TINY_CNN, "--no-pretrained", "--data", str(real_flowers),
                            "--img-size", "32", "--bs", "8", "--freeze-epochs", "1", "--epochs", "1", "--mixup", "0",
                            "--no-export"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["world_size"] == 2
    assert metrics["distributed"]["weights_in_sync"] and metrics["distributed"]["final_weights_in_sync"]
    assert not list(other.iterdir())  # rank 1 wrote nothing, and read nothing there

    # An interruption right after stage 1, made from the finished run: its stage-2 row dropped.
    hist = pd.read_csv(run / "history.csv")
    hist.iloc[:1].to_csv(run / "history.csv", index=False)
    (run / "metrics.json").write_text(json.dumps(dict(metrics, status="interrupted")))
    resumed = _run(_torchrun_per_rank("--resume", tmp_path))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished", resumed.stdout[-2000:]
    assert metrics["distributed"]["weights_in_sync"] and metrics["distributed"]["final_weights_in_sync"]
    assert list(pd.read_csv(run / "history.csv")["stage"]) == ["frozen", "unfrozen"]
    assert not list(other.iterdir())
