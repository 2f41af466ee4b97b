"""What a user sees from the command lines, output sent to files as in a log: the plan of a training run
printed before its first epoch, no third-party deprecation noise, no stray progress glyph, and no
misleading open_clip warning when a trained model loads."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from conftest import ROOT, TINY_CLIP, TINY_CNN, make_image_folder

import flowers_classifier as fc
from flowers_fastai import pretrained


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_prints_its_plan_first_and_no_deprecation_noise(tmp_path):
    data, out = make_image_folder(tmp_path / "imgs", per_class=6), tmp_path / "run"
    proc = run("train.py", "--model", TINY_CNN, "--no-pretrained", "--img-size", "32", "--epochs", "1",
               "--freeze-epochs", "0", "--bs", "8", "--data", str(data), "--out", str(out), "--no-export")
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" not in proc.stderr and "DeprecationWarning" not in proc.stderr
    lines = proc.stdout.splitlines()
    first_epoch = next(i for i, line in enumerate(lines) if re.match(r"epoch\s+\d", line))
    assert lines[:6] == [f"model: {TINY_CNN} (cnn)", "weights: random init", "device: cpu, precision fp32",
                         f"images: 25 train, 5 valid (from {data})",
                         "epochs: 0 head only + 1 unfrozen, batch size 8", f"run folder: {out}"]
    assert first_epoch >= 6


def test_download_failure_prints_only_the_error(tmp_path):
    proc = run("-m", "flowers_fastai", "data", "download", "--url", "http://127.0.0.1:9/x.tgz", "--dest",
               str(tmp_path / "d"))
    assert proc.returncode == 2
    assert proc.stdout == ""  # fastdownload's progress bar drew a glyph here before the error
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: download of ")


def test_loading_a_trained_vit_does_not_claim_random_weights(tiny_vit_pth, caplog):
    def no_weights_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        fc.load_vit_model(tiny_vit_pth, device="cpu")
        assert no_weights_warnings() == []
        # Only that load is silenced: a model that really is random init still says so.
        pretrained.create_clip(TINY_CLIP, pretrained=None, head_init="random")
        assert len(no_weights_warnings()) == 1
