"""End to end on real photos: train.py -> export.py -> flowers_classifier, and the run folder's contents.

One from-scratch convnextv2_atto run at 64 px on the 60 committed photos, shared by most tests below
through a module fixture; the accuracy test trains on 200 photos per class of the full set (about a
minute on 2 cores) and measures on 300 photos it never saw.
"""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY_CNN, make_image_folder
from fastai.learner import load_learner

import flowers_classifier as fc
from flowers_classifier.classes import CLASSES
from flowers_fastai.data import scan_folder

PER_CLASS, EPOCHS = 200, 8
SMALL_EPOCHS = 3


def run_cli(*args, timeout=900):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def train_and_export(data, tmp, epochs: int, *extra: str):
    """(run_dir, exported .pth, stdout of train.py) of one from-scratch run, exported by export.py."""
    run_dir = tmp / "run"
    out = run_cli("train.py", "--arch", "cnn", "--model", TINY_CNN, "--no-pretrained", "--data", str(data),
                  "--img-size", "64", "--epochs", str(epochs), "--mixup", "0", "--patience", "0",
                  "--out", str(run_dir), "--no-export", *extra)
    run_cli("export.py", str(run_dir), "--out", str(tmp / "cnn_flowers.pth"))
    return run_dir, tmp / "cnn_flowers.pth", out.stdout


@pytest.fixture(scope="module")
def trained(real_flowers, tmp_path_factory):
    """A run on the committed photos (12 per class)."""
    return train_and_export(real_flowers, tmp_path_factory.mktemp("e2e"), SMALL_EPOCHS, "--bs", "16")


@pytest.fixture(scope="module")
def trained_full(flowers128, tmp_path_factory):
    """A run on 200 photos per class of the full set: enough to learn something measurable."""
    return train_and_export(flowers128, tmp_path_factory.mktemp("e2e-full"), EPOCHS,
                            "--max-per-class", str(PER_CLASS))


def test_run_folder_holds_everything(trained):
    run_dir, _, stdout = trained
    for name in ("learner.pkl", "best.pth", "history.csv", "metrics.json", "split.csv"):
        assert (run_dir / name).is_file(), name
    hist = pd.read_csv(run_dir / "history.csv")
    assert len(hist) == SMALL_EPOCHS
    assert {"epoch", "train_loss", "valid_loss", "accuracy", "lr", "time"} <= set(hist)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["best_accuracy"] == hist["accuracy"].max()
    assert metrics["config"]["seed"] == 42 and metrics["wall_time_s"] > 0
    # 60 photos less the one filed under both rose and tulip (both copies left out); no test split by default
    assert sum(metrics["class_counts"]["train"]) + sum(metrics["class_counts"]["valid"]) == 58
    assert "test" not in metrics["class_counts"] and "test" not in metrics["evaluation"]
    assert "images: 48 train, 10 valid (from" in stdout and "left out: 2 image(s)" in stdout
    # calibrated at the end of the run: T in metrics.json, the export and eval_metrics.json agree
    t = metrics["evaluation"]["calibration"]["temperature"]
    assert t == json.loads((run_dir / "eval_metrics.json").read_text())["calibration"]["temperature"]
    assert t == torch.load(trained[1], weights_only=True)["temperature"] and (run_dir / "reliability.png").is_file()
    assert f"calibration: temperature {t:.3f}" in stdout
    # stdout is a pipe here: one plain line per epoch, no progress-bar noise
    assert sum(line.startswith("epoch ") for line in stdout.splitlines()) == SMALL_EPOCHS


def test_test_split_is_held_out_and_reported(real_flowers, tmp_path):
    """--test-pct: the test photos are in split.csv but not trained or tuned on; metrics.json and
    eval_metrics.json report them, raw and calibrated, apart from the valid split that fitted T."""
    run_dir = tmp_path / "run"
    out = run_cli("train.py", "--model", TINY_CNN, "--no-pretrained", "--data", str(real_flowers), "--img-size", "64",
                  "--epochs", "1", "--bs", "16", "--test-pct", "0.2", "--out", str(run_dir), "--no-export")
    split = pd.read_csv(run_dir / "split.csv")
    n = split["split"].value_counts()
    assert (n["train"], n["valid"], n["test"]) == (38, 10, 10)  # 2 test + 2 valid per class, of 58 photos
    assert "images: 38 train, 10 valid, 10 test" in out.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [sum(metrics["class_counts"][s]) for s in ("train", "valid", "test")] == [38, 10, 10]
    evaluation, report = metrics["evaluation"], json.loads((run_dir / "eval_metrics.json").read_text())
    test = evaluation["test"]
    assert evaluation["split"] == "valid" and test["split"] == "test" and test["n_images"] == 10
    assert test == {k: report["test"][k] for k in test}
    assert test["calibration"]["n_images"] == 10 == evaluation["n_images"]  # T fitted on the valid photos only
    for key in ("raw", "calibrated"):
        assert {"ece", "nll", "brier"} <= set(test["calibration"][key])
    predicted = pd.read_csv(run_dir / "predictions_test.csv")
    assert set(predicted["path"]) == set(split.loc[split["split"] == "test", "path"])
    assert f"test split (10 images, never tuned on): accuracy {test['accuracy']:.4f}" in out.stdout


def test_exported_model_beats_majority_on_unseen_photos(trained_full, flowers128):
    run_dir, pth, _ = trained_full
    seen = set(pd.read_csv(run_dir / "split.csv")["path"])
    everything = scan_folder(flowers128)
    unseen = everything[~everything["path"].isin(seen)].sample(300, random_state=0)
    model = fc.load_cnn_model(pth, device="cpu")
    preds = [fc.predict(model, flowers128 / p) for p in unseen["path"]]
    assert set(preds) <= set(CLASSES)
    accuracy = (pd.Series(preds, index=unseen.index) == unseen["label"]).mean()
    majority = unseen["label"].value_counts(normalize=True).max()
    assert accuracy > majority + 0.08, (accuracy, majority)


def test_exported_model_matches_the_fastai_learner(trained, real_flowers):
    run_dir, pth, _ = trained
    learn = load_learner(run_dir / "learner.pkl")
    files = [real_flowers / p for p in pd.read_csv(run_dir / "split.csv").query("is_valid")["path"]]
    ours, _ = learn.get_preds(dl=learn.dls.test_dl([str(f) for f in files]))
    model = fc.load_cnn_model(pth, device="cpu", calibrated=False)  # the learner's raw softmax
    assert 0 < fc.load_cnn_model(pth).temperature == torch.load(pth, weights_only=True)["temperature"]
    served = torch.tensor([list(fc.predict_proba(model, f).values()) for f in files])
    assert torch.equal(ours.argmax(1), served.argmax(1))
    assert (ours - served).abs().max() < 1e-4


def test_corrupt_and_fake_jpegs_are_skipped_and_reported(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=5)
    good = next((root / "rose").glob("*.jpg")).read_bytes()
    (root / "rose" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "tulip" / "readme.jpg").write_text("a text file renamed .jpg\n")
    run_dir = tmp_path / "run"
    out = run_cli("train.py", "--model", TINY_CNN, "--no-pretrained", "--data", str(root), "--img-size", "32",
                  "--epochs", "1", "--bs", "8", "--out", str(run_dir), "--export", str(tmp_path / "m.pth"))
    assert "truncated.jpg" in out.stderr and "readme.jpg" in out.stderr  # the warning lists them
    assert set(pd.read_csv(run_dir / "skipped.csv")["path"]) == {"rose/truncated.jpg", "tulip/readme.jpg"}
    assert json.loads((run_dir / "metrics.json").read_text())["skipped_files"] == 2
    assert fc.predict(fc.load_cnn_model(tmp_path / "m.pth", device="cpu"), root / "rose" / "0.jpg") in CLASSES


def test_help_explains_every_flag():
    from flowers_fastai.train import build_parser
    text = "".join(run_cli("train.py", "--help").stdout.split())  # no whitespace: argparse wraps at hyphens too
    options = [a for a in build_parser()._actions if a.option_strings]
    assert len(options) > 30
    for action in options:
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help text"
        # Each flag is listed with its own help text right after it (metavar and all), not just named.
        flag, help_text = action.option_strings[-1], "".join(action.help.split())
        assert flag in text and help_text in text[text.index(flag):], flag


def test_existing_run_folder_is_not_overwritten(trained):
    run_dir, _, _ = trained
    out = subprocess.run([sys.executable, "train.py", "--no-pretrained", "--data", "x", "--out", str(run_dir)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "already holds a run" in out.stderr


def test_from_scratch_defaults_and_min_scale_flag(tmp_path):
    from flowers_fastai.train import build_parser, resolve_args
    scratch = resolve_args(build_parser().parse_args(["--no-pretrained", "--out", str(tmp_path / "a")]))
    assert (scratch.mixup, scratch.label_smoothing, scratch.min_scale, scratch.freeze_epochs) == (0.0, 0.0, 0.6, 0)
    pretrained = resolve_args(build_parser().parse_args(["--out", str(tmp_path / "b")]))
    assert (pretrained.mixup, pretrained.label_smoothing, pretrained.min_scale) == (0.2, 0.1, 0.35)
    given = resolve_args(build_parser().parse_args(["--no-pretrained", "--min-scale", "0.2", "--mixup", "0.4",
                                                "--out", str(tmp_path / "c")]))
    assert (given.min_scale, given.mixup) == (0.2, 0.4)  # flags win over the defaults
    with pytest.raises(ValueError, match="--min-scale 1.5"):
        resolve_args(build_parser().parse_args(["--min-scale", "1.5", "--out", str(tmp_path / "d")]))
