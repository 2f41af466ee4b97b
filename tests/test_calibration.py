"""Temperature scaling: the fit (flowers_fastai.calibration), the calibration metrics, the payload key and how
flowers_classifier serves it (calibrated by default, raw on request, T = 1 for files without one), and the
calibrated export + evaluation of a run folder."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CNN, TINY_SIZE, make_image_folder, tiny_cnn_payload_file

import flowers_classifier as fc
from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.payload import TEMPERATURE_KEY, load_payload
from flowers_classifier.preprocess import preprocess_image
from flowers_fastai import cli as commands
from flowers_fastai.calibration import TEMPERATURE_BOUNDS, fit_temperature, image_logits, nll_at
from flowers_fastai.metrics import calibration_metrics


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated at T = 1 by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, size=(n, len(CLASSES)))
    y = np.array([rng.choice(len(CLASSES), p=p) for p in _softmax(z)])
    return z, y


def test_fit_recovers_a_known_temperature():
    z, y = calibrated_sample(4000, seed=0)
    assert fit_temperature(z * 4, y) == pytest.approx(4, rel=0.1)  # logits 4x too sharp: T ~ 4 undoes it
    assert fit_temperature(z / 3, y) == pytest.approx(1 / 3, rel=0.1)  # under-confident: T < 1


def test_fit_is_bounded_on_a_validation_set_the_model_gets_all_right():
    z, y = calibrated_sample(200, seed=1)
    y = z.argmax(1)  # every prediction right: the NLL keeps falling as T -> 0
    t = fit_temperature(z, y)
    assert math.isfinite(t) and t > 0 and t == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)
    assert nll_at(z, y, t) < nll_at(z, y, 1.0)


def test_calibration_metrics_by_hand():
    probs = np.array([[0.9, 0.1, 0, 0, 0], [0.6, 0.4, 0, 0, 0], [0.3, 0.7, 0, 0, 0]])
    y = np.array([0, 1, 1])
    m = calibration_metrics(y, probs)
    # bins (of 15): 0.9 -> right, 0.6 -> wrong, 0.7 -> right, each alone in its bin
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.3) / 3)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7)) / 3)
    assert m["brier"] == pytest.approx((0.01 + 0.01 + 0.36 + 0.36 + 0.09 + 0.09) / 3)


def _photo_table(root: Path, first: bool) -> pd.DataFrame:
    """Half of the committed photos of each class: the first 6 (to fit T) or the other 6 (held out)."""
    rows = [(f"{c}/{p.name}", c) for c in CLASSES for p in sorted((root / c).glob("*.jpg"))]
    df = pd.DataFrame(rows, columns=["path", "label"])
    nth = df.groupby("label").cumcount()
    return df[(nth < 6) if first else (nth >= 6)].reset_index(drop=True)


def test_overconfident_model_gets_t_above_1_and_better_held_out(real_flowers, tmp_path):
    """A random-init tiny CNN with its logits multiplied by 20 (head weights and bias scaled): confident
    and mostly wrong. T fitted on half of the real photos is > 1 and lowers ECE and NLL on the other half."""
    payload = load_payload(tiny_cnn_payload_file(tmp_path / "cnn.pth"))
    for key in ("head.fc.weight", "head.fc.bias"):
        payload["state_dict"][key] = payload["state_dict"][key] * 20
    raw = fc.model_from_payload(payload, device="cpu", calibrated=False)
    fit_logits, fit_y = image_logits(raw, real_flowers, _photo_table(real_flowers, first=True))
    t = fit_temperature(fit_logits, fit_y)
    assert t > 1
    held_logits, held_y = image_logits(raw, real_flowers, _photo_table(real_flowers, first=False))
    before = calibration_metrics(held_y, _softmax(held_logits))
    after = calibration_metrics(held_y, _softmax(held_logits / t))
    assert after["ece"] < before["ece"] and after["nll"] < before["nll"]
    # The served model does the same: a payload holding T serves softmax(logits / T).
    payload[TEMPERATURE_KEY] = t
    served = fc.model_from_payload(payload, device="cpu")
    photo = real_flowers / _photo_table(real_flowers, first=False)["path"][0]
    probs = np.array(list(fc.predict_proba(served, photo).values()))
    logits = raw.logits(preprocess_image(photo, raw.prep)[None]).numpy()
    np.testing.assert_allclose(probs, _softmax(logits / t)[0], atol=1e-5)


def test_argmax_never_changes_with_the_temperature(tiny_cnn_pth, real_photos):
    model = fc.load_model(tiny_cnn_pth, device="cpu")
    photos = [p for ps in real_photos.values() for p in ps]
    predictions = []
    for t in (0.05, 0.5, 1.0, 3.0, 20.0):
        served = dataclasses.replace(model, temperature=t)
        predictions.append([r["predicted_class"] for r in fc.predict_batch(served, photos)])
    assert all(p == predictions[0] for p in predictions)


def test_payload_without_temperature_serves_t1_and_calibrated_false_ignores_t(tiny_cnn_pth, real_photos, tmp_path):
    assert TEMPERATURE_KEY not in torch.load(tiny_cnn_pth, weights_only=True)  # a file from before calibration
    old = fc.load_model(tiny_cnn_pth, device="cpu")
    assert old.temperature == 1.0
    photo = real_photos["rose"][0]
    x = preprocess_image(photo, old.prep)[None]
    np.testing.assert_allclose(old.probabilities(x).numpy(), _softmax(old.logits(x).numpy()), atol=1e-6)
    payload = torch.load(tiny_cnn_pth, weights_only=True) | {TEMPERATURE_KEY: 3.0}
    torch.save(payload, tmp_path / "t3.pth")
    calibrated, raw = fc.load_model(tmp_path / "t3.pth", device="cpu"), fc.load_cnn_model(tmp_path / "t3.pth",
                                                                                          calibrated=False)
    assert calibrated.temperature == 3.0 and raw.temperature == 1.0
    assert fc.predict_proba(raw, photo) == pytest.approx(fc.predict_proba(old, photo), abs=1e-6)
    np.testing.assert_allclose(calibrated.probabilities(x).numpy(), _softmax(old.logits(x).numpy() / 3), atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "2"])
def test_a_bad_temperature_is_refused_naming_the_file(tiny_cnn_pth, tmp_path, bad):
    torch.save(torch.load(tiny_cnn_pth, weights_only=True) | {TEMPERATURE_KEY: bad}, tmp_path / "bad.pth")
    with pytest.raises(fc.ModelFileError, match="bad.pth.*temperature"):
        fc.load_model(tmp_path / "bad.pth")


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as train.py leaves it (metrics.json, best.pth, split.csv) on a synthetic image folder."""
    images = make_image_folder(tmp_path / "images", per_class=6)
    torch.manual_seed(0)
    net = factory.create_cnn(TINY_CNN)
    spec = dict(family="cnn", model_name=TINY_CNN, classes=list(CLASSES),
                **factory.cnn_preprocess(net, TINY_SIZE).to_dict())
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(dict(model=spec, config=dict(data=str(images), arch="cnn"))))
    torch.save(net.state_dict(), run / "best.pth")
    rows = [(f"{c}/{i}.jpg", c, i < 3) for c in CLASSES for i in range(6)]
    pd.DataFrame(rows, columns=["path", "label", "is_valid"]).to_csv(run / "split.csv", index=False)
    return run


def test_export_calibrates_on_valid_and_evaluate_reports_before_after(tmp_path, capsys):
    run = _run_folder(tmp_path)
    assert commands.export([str(run), "--out", str(tmp_path / "cal.pth")]) == 0
    assert "calibrated on 15 valid images: temperature" in capsys.readouterr().out
    t = load_payload(tmp_path / "cal.pth")[TEMPERATURE_KEY]
    assert TEMPERATURE_BOUNDS[0] <= t <= TEMPERATURE_BOUNDS[1]
    assert commands.export([str(run), "--out", str(tmp_path / "raw.pth"), "--no-calibrate"]) == 0
    assert TEMPERATURE_KEY not in load_payload(tmp_path / "raw.pth")

    assert commands.evaluate([str(run)]) == 0
    out = capsys.readouterr().out
    assert f"calibration, temperature {t:.3f}: ECE" in out
    m = json.loads((run / "eval_metrics.json").read_text())
    c = m["calibration"]
    assert c["temperature"] == pytest.approx(t) and c["n_images"] == 15 and c["raw"]["ece_bins"] == 15
    assert c["calibrated"]["nll"] <= c["raw"]["nll"] + 1e-9  # fitted on these very images: never worse
    assert "reliability.png" in m["files"] and (run / "reliability.png").stat().st_size > 0


def test_export_without_the_images_writes_t1_and_says_how_to_calibrate(tmp_path, capsys):
    run = _run_folder(tmp_path)
    for p in (tmp_path / "images").rglob("*.jpg"):
        p.unlink()
    for d in sorted((tmp_path / "images").iterdir()):
        d.rmdir()
    (tmp_path / "images").rmdir()
    assert commands.export([str(run), "--out", str(tmp_path / "m.pth")]) == 0
    out = capsys.readouterr().out
    assert "not calibrated" in out and "--data DIR" in out
    assert TEMPERATURE_KEY not in load_payload(tmp_path / "m.pth")


def test_export_with_undecodable_valid_images_is_an_error_that_writes_nothing(tmp_path, capsys):
    run = _run_folder(tmp_path)
    for p in (tmp_path / "images").rglob("*.jpg"):
        p.write_bytes(b"not a jpeg")
    assert commands.export([str(run), "--out", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err
    assert f"cannot calibrate {run}" in err and "--no-calibrate" in err
    assert not (tmp_path / "m.pth").exists()


def test_onnx_carries_the_temperature_in_its_metadata(tiny_cnn_pth, real_photos, tmp_path):
    from flowers_fastai.onnx_export import export_onnx
    payload = fc.load_payload(tiny_cnn_pth) | {TEMPERATURE_KEY: 2.5}
    path, _ = export_onnx(payload, tmp_path / "t.onnx")
    served, raw = fc.load_model(path), fc.load_model(path, calibrated=False)
    assert served.temperature == 2.5 and raw.temperature == 1.0
    x = preprocess_image(real_photos["tulip"][0], served.prep)[None]
    logits = served.logits(x).numpy()
    np.testing.assert_allclose(served.probabilities(x).numpy(), _softmax(logits / 2.5), atol=1e-5)
    np.testing.assert_allclose(raw.probabilities(x).numpy(), _softmax(logits), atol=1e-5)
