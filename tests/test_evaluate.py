"""Evaluation reports: the metric and baseline arithmetic on known inputs, TTA views, and
`python -m flowers_fastai evaluate` on a tiny exported model and on a run folder."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CNN, TINY_SIZE, make_image_folder
from PIL import Image

from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.preprocess import Preprocess, preprocess_image
from flowers_fastai import cli as commands
from flowers_fastai import evaluate
from flowers_fastai.metrics import baselines, classification_metrics, confusion_matrix


def test_baselines_for_known_class_counts():
    b = baselines([10, 30, 20, 20, 20], CLASSES)
    major, uniform = b["majority_class"], b["uniform_random"]
    assert major["predicts"] == "dandelion" and major["accuracy"] == pytest.approx(0.3)
    assert major["macro_f1"] == pytest.approx(2 * 0.3 / 1.3 / 5)  # only dandelion scores: P=0.3, R=1
    assert major["loss"] == pytest.approx(-(0.1 * math.log(0.1) + 0.3 * math.log(0.3) + 0.6 * math.log(0.2)))
    assert uniform["accuracy"] == pytest.approx(0.2) and uniform["loss"] == pytest.approx(math.log(5))
    # per class F1 of precision p (its frequency) and recall 1/5: 2p/(5p+1)
    assert uniform["macro_f1"] == pytest.approx(np.mean([0.2 / 1.5, 0.6 / 2.5, 0.2, 0.2, 0.2]))


def test_majority_baseline_equals_scoring_the_constant_predictor():
    y = np.repeat(np.arange(5), [3, 9, 4, 2, 2])
    prior = np.bincount(y, minlength=5) / len(y)
    scored = classification_metrics(y, np.tile(prior, (len(y), 1)), CLASSES)
    assert scored["accuracy"] == pytest.approx(scored["baselines"]["majority_class"]["accuracy"])
    assert scored["macro_f1"] == pytest.approx(scored["baselines"]["majority_class"]["macro_f1"])
    assert scored["loss"] == pytest.approx(scored["baselines"]["majority_class"]["loss"])


def test_classification_metrics_on_a_hand_checked_case():
    y = [0, 0, 1, 1, 2, 3, 4, 4]
    pred = [0, 1, 1, 1, 0, 3, 4, 2]
    probs = np.full((len(y), 5), 0.1)
    probs[np.arange(len(y)), pred] = 0.6
    m = classification_metrics(y, probs, CLASSES)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, 5).tolist()
    assert np.array(m["confusion_matrix"]).sum() == 8 and m["confusion_matrix"][0] == [1, 1, 0, 0, 0]
    assert m["accuracy"] == pytest.approx(5 / 8)
    daisy, dandelion, rose = (m["per_class"][c] for c in ("daisy", "dandelion", "rose"))
    assert (daisy["precision"], daisy["recall"], daisy["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (dandelion["precision"], dandelion["recall"]) == pytest.approx((2 / 3, 1.0))
    assert (rose["precision"], rose["recall"], rose["f1"]) == (0.0, 0.0, 0.0)  # predicted once, wrongly
    f1s = [0.5, 0.8, 0.0, 1.0, 2 / 3]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["loss"] == pytest.approx(-(5 * math.log(0.6) + 3 * math.log(0.1)) / 8)


def test_tta_views_start_with_the_served_crop_and_mirror_it(tmp_path):
    path = make_image_folder(tmp_path / "imgs", per_class=1, size=80) / "rose" / "0.jpg"
    prep = factory.cnn_preprocess(factory.create_cnn(TINY_CNN), TINY_SIZE)
    views = evaluate.tta_views(path, prep)
    assert views.shape == (10, 3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(views[0], preprocess_image(path, prep))
    assert torch.equal(views[5], views[0].flip(-1))
    assert not torch.equal(views[1], views[0])  # corner crops see other pixels


@pytest.fixture
def photos(real_photos, tmp_path):
    """5 real photos per class plus one file that does not decode."""
    root = tmp_path / "photos"
    for label, files in real_photos.items():
        (root / label).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / label / f.name)
    (root / "tulip" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
    return root


def test_evaluate_exported_model_writes_every_report(tiny_cnn_pth, photos, tmp_path, capsys):
    out = tmp_path / "eval"
    assert commands.evaluate([str(tiny_cnn_pth), "--data", str(photos), "--out", str(out), "--tta", "--bs", "7"]) == 0
    for name in ("eval_metrics.json", "predictions.csv", "confusion_matrix.png", "top_losses.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "curves.png").exists()  # a .pth has no history
    m = json.loads((out / "eval_metrics.json").read_text())
    assert m["n_images"] == 25 and np.array(m["confusion_matrix"]).sum() == 25
    assert [s["path"] for s in m["skipped"]] == ["tulip/corrupt.jpg"]
    assert m["baselines"]["majority_class"]["accuracy"] == pytest.approx(0.2)
    assert m["tta"]["views"] == 10
    assert set(m["per_class"]) == set(CLASSES) and math.isfinite(m["loss"])
    preds = pd.read_csv(out / "predictions.csv")
    assert len(preds) == 25 and (preds["predicted"] == preds["label"]).mean() == pytest.approx(m["accuracy"])
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_matches_the_served_predictions(tiny_cnn_pth, photos, tmp_path):
    import flowers_classifier as fc
    commands.evaluate([str(tiny_cnn_pth), "--data", str(photos), "--out", str(tmp_path / "eval")])
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    model = fc.load_model(tiny_cnn_pth, device="cpu")
    for row in preds.head(5).itertuples():
        probs = fc.predict_proba(model, photos / row.path)
        assert max(probs, key=probs.get) == row.predicted
        assert probs[row.label] == pytest.approx(math.exp(-row.loss), rel=1e-4)


def _fake_run(run: Path, images: Path) -> Path:
    """A run folder as train.py leaves it: metrics.json (spec + data), best.pth, split.csv, history.csv."""
    torch.manual_seed(0)
    net = factory.create_cnn(TINY_CNN)
    spec = dict(family="cnn", model_name=TINY_CNN, classes=list(CLASSES),
                **factory.cnn_preprocess(net, TINY_SIZE).to_dict())
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(dict(model=spec, config=dict(data=str(images)))))
    torch.save(net.state_dict(), run / "best.pth")
    rows = [(f"{c}/{i}.jpg", c, i < 2) for c in CLASSES for i in range(6)]
    pd.DataFrame(rows, columns=["path", "label", "is_valid"]).to_csv(run / "split.csv", index=False)
    pd.DataFrame(dict(epoch=[0, 1, 2], stage=["frozen", "unfrozen", "unfrozen"], train_loss=[1.6, 1.2, 0.9],
                      valid_loss=[1.5, 1.1, 1.0], accuracy=[0.3, 0.5, 0.6], lr=[1e-3, 1e-3, 1e-4],
                      time=[1, 1, 1])).to_csv(run / "history.csv", index=False)
    return run


def test_evaluate_run_folder_uses_the_valid_split_and_plots_curves(tmp_path):
    images = make_image_folder(tmp_path / "images", per_class=6)
    run = _fake_run(tmp_path / "run", images)
    assert commands.evaluate([str(run)]) == 0
    m = json.loads((run / "eval_metrics.json").read_text())
    assert m["n_images"] == 10 and np.array(m["confusion_matrix"]).sum() == 10  # 2 valid rows per class
    assert "curves.png" in m["files"] and (run / "curves.png").stat().st_size > 0


def test_evaluate_run_reports_the_test_split_apart_from_valid(tmp_path, capsys):
    """A split.csv with a test split: T is fitted on the valid rows alone (export.py's fit too), and the
    test rows are measured raw and calibrated in their own section and files."""
    from flowers_fastai.export import run_payload
    images = make_image_folder(tmp_path / "images", per_class=6)
    run = _fake_run(tmp_path / "run", images)
    split = pd.read_csv(run / "split.csv")
    split["split"] = np.tile(["valid"] * 2 + ["train"] * 2 + ["test"] * 2, len(CLASSES))  # _fake_run's order
    assert (split["is_valid"] == (split["split"] == "valid")).all()
    split.to_csv(run / "split.csv", index=False)  # 2 valid, 2 test, 2 train rows per class
    assert commands.evaluate([str(run)]) == 0
    m = json.loads((run / "eval_metrics.json").read_text())
    assert m["split"] == "valid" and m["n_images"] == 10 and m["calibration"]["n_images"] == 10
    test = m["test"]
    assert test["split"] == "test" and test["n_images"] == 10 and np.array(test["confusion_matrix"]).sum() == 10
    for key in ("raw", "calibrated"):
        assert set(test["calibration"][key]) >= {"ece", "nll", "brier"}
    assert test["calibration"]["temperature"] == m["calibration"]["temperature"]
    assert test["calibration"]["fitted_on"] == "the 10 valid images"  # T never saw the test rows
    assert run_payload(run)[1]["n_images"] == 10  # nor does export.py's fit
    preds = pd.read_csv(run / "predictions_test.csv")
    assert set(preds["path"]) == set(split.loc[split["split"] == "test", "path"])
    assert {"predictions_test.csv", "reliability_test.png", "confusion_matrix_test.png"} <= set(m["files"])
    assert (run / "reliability_test.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "valid split, 10 images" in printed and "test split, 10 images" in printed


def test_evaluate_errors_name_the_flag(tiny_cnn_pth, tmp_path, capsys):
    assert commands.evaluate([str(tiny_cnn_pth)]) == 2
    assert "--data" in capsys.readouterr().err
    assert commands.evaluate([str(tmp_path / "missing.pth"), "--data", str(tmp_path)]) == 2
    assert "missing.pth" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    assert commands.evaluate([str(run)]) == 2
    assert "split.csv" in capsys.readouterr().err


class BrightSpotNet(torch.nn.Module):
    """Says dandelion, confidently, for a view that holds a white pixel, and daisy, barely, for any other."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # FlowerClassifier reads the dtype and device of one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x.amax(dim=(1, 2, 3)) > 0.9).float() * 20 * self.scale
        low = torch.full_like(bright, -30.0)
        return torch.stack([torch.full_like(bright, 0.2), bright, low, low, low], dim=1)


def test_tta_averages_the_views_and_can_change_the_answer(tmp_path):
    """A white stripe on the right edge lies outside the served center crop but inside 4 of the 10 TTA
    views (top/bottom-right corners and their mirrors): plain says daisy (0.55), TTA says dandelion."""
    import flowers_classifier as fc
    from flowers_classifier.backends import EagerBackend
    prep = Preprocess(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.875)  # center crop: columns 4..67 of 73
    arr = np.zeros((73, 73, 3), dtype=np.uint8)
    arr[:, 70:] = 255
    (tmp_path / "imgs" / "dandelion").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "imgs" / "dandelion" / "stripe.png")
    model = fc.FlowerClassifier(EagerBackend(BrightSpotNet(), "cnn", 64), "cnn", "bright-spot", CLASSES, prep)
    df = pd.DataFrame([("dandelion/stripe.png", "dandelion")], columns=["path", "label"])
    m = evaluate.evaluate(model, tmp_path / "imgs", df, tmp_path / "eval", tta=True)
    assert m["accuracy"] == 0 and m["tta"]["accuracy"] == 1
    p_daisy = math.exp(0.2) / (math.exp(0.2) + 1)  # a view without the stripe (the other 3 classes ~0)
    p_tta = 0.4 * 1.0 + 0.6 * (1 - p_daisy)        # the mean over 10 views of P(dandelion)
    assert m["tta"]["loss"] == pytest.approx(-math.log(p_tta), rel=1e-4)
