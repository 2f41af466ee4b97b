"""WiSE-FT for the CLIP model: a pretrained CLIP run keeps its zero-shot model (zeroshot.pth), `export.py RUN
--wise-ft ALPHA` interpolates towards it (0 = zero-shot, 1 = fine-tuned, weights mixed elementwise) and
`evaluate RUN --wise-ft-sweep` measures alpha 0..1; runs without a meaningful zero-shot model are refused.
The "pretrained" weights are a random open_clip checkpoint (tests/test_clip.py's save_random_clip): a real
text tower, so a real zero-shot head, without a download."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_CLIP, TINY_SIZE, require
from test_clip import save_random_clip

import flowers_classifier as fc
from flowers_classifier import factory
from flowers_classifier.payload import TEMPERATURE_KEY, load_payload
from flowers_classifier.preprocess import preprocess_image
from flowers_fastai import cli as commands
from flowers_fastai import export, pretrained


@pytest.fixture(scope="module")
def clip_run(real_flowers, tmp_path_factory) -> tuple[Path, Path]:
    """(a 1-epoch tiny CLIP run from a zero-shot head, the checkpoint it started from)."""
    tmp = tmp_path_factory.mktemp("wise")
    ckpt = save_random_clip(tmp / "vit_s_32_random.pt")
    run = tmp / "run"
    rc = commands.train(["--arch", "clip", "--model", TINY_CLIP, "--img-size", str(TINY_SIZE), "--weights", str(ckpt),
                     "--data", str(real_flowers), "--freeze-epochs", "0", "--epochs", "1", "--bs", "16",
                     "--out", str(run), "--no-export"])
    assert rc == 0
    return run, ckpt


def _valid_photos(run: Path, real_flowers: Path) -> list[Path]:
    split = pd.read_csv(run / "split.csv")
    return [real_flowers / p for p in split[split.is_valid]["path"]]


def _probs(model: fc.FlowerClassifier, photos: list[Path]) -> np.ndarray:
    return np.stack([list(fc.predict_proba(model, p).values()) for p in photos])


def _export(run: Path, out: Path, *flags: str) -> dict:
    assert commands.export([str(run), "--out", str(out), *flags]) == 0
    return load_payload(out)


def test_alpha_0_is_the_zero_shot_model(clip_run, real_flowers, tmp_path):
    run, ckpt = clip_run
    assert (run / "zeroshot.pth").is_file()
    _export(run, tmp_path / "a0.pth", "--wise-ft", "0", "--fp32", "--no-calibrate")
    photos = _valid_photos(run, real_flowers)
    ours = _probs(fc.load_model(tmp_path / "a0.pth", device="cpu"), photos)
    zero_shot = pretrained.create_clip(TINY_CLIP, pretrained=ckpt, image_size=TINY_SIZE, head_init="zeroshot").eval()
    prep = factory.preprocess_for(zero_shot)
    with torch.no_grad():
        expected = zero_shot(torch.stack([preprocess_image(p, prep) for p in photos])).softmax(-1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_alpha_1_is_the_fine_tuned_model_and_0_5_the_mean_of_the_weights(clip_run, real_flowers, tmp_path):
    run, _ = clip_run
    finetuned = torch.load(run / "best.pth", weights_only=True)
    zeroshot = torch.load(run / "zeroshot.pth", weights_only=True)
    a1 = _export(run, tmp_path / "a1.pth", "--wise-ft", "1", "--fp32", "--no-calibrate")
    ft = _export(run, tmp_path / "ft.pth", "--fp32", "--no-calibrate")
    photos = _valid_photos(run, real_flowers)
    np.testing.assert_array_equal(_probs(fc.load_model(tmp_path / "a1.pth", device="cpu"), photos),
                                  _probs(fc.load_model(tmp_path / "ft.pth", device="cpu"), photos))
    half = _export(run, tmp_path / "a05.pth", "--wise-ft", "0.5", "--fp32", "--no-calibrate")["state_dict"]
    changed = 0
    for k, v in finetuned.items():
        assert torch.equal(a1["state_dict"][k], ft["state_dict"][k])
        if v.is_floating_point():
            torch.testing.assert_close(half[k], (zeroshot[k].float() + v.float()) / 2, rtol=1e-6, atol=1e-7)
            changed += not torch.equal(zeroshot[k], v)
        else:
            assert torch.equal(half[k], v)
    assert changed > 0  # training moved the weights: the mean is not trivially either end


def test_wise_ft_export_is_calibrated_like_any_other(clip_run, tmp_path, capsys):
    run, _ = clip_run
    payload = _export(run, tmp_path / "w.pth", "--wise-ft", "0.3")
    assert "WiSE-FT alpha 0.3" in capsys.readouterr().out
    assert payload[TEMPERATURE_KEY] > 0 and payload["dtype"] == "float16"  # CLIP default: fp16 storage


@pytest.fixture(scope="module")
def moved_run(clip_run, tmp_path_factory) -> Path:
    """The CLIP run with a fine-tuned head far from its zero-shot one (a seeded random head; the zero-shot head is
    it with the classes shifted): the 1-epoch tiny run barely moves its weights and its near-uniform
    probabilities fit T at its bound, so that mixing them, or fitting T twice, would go unseen."""
    run = tmp_path_factory.mktemp("moved") / "run"
    run.mkdir()
    for name in ("metrics.json", "split.csv"):
        shutil.copy(clip_run[0] / name, run / name)
    best = torch.load(clip_run[0] / "best.pth", weights_only=True)
    zeroshot = torch.load(clip_run[0] / "zeroshot.pth", weights_only=True)
    best["head.weight"] = 3 * torch.randn(best["head.weight"].shape, generator=torch.Generator().manual_seed(0))
    zeroshot["head.weight"] = best["head.weight"].roll(1, 0)
    torch.save(best, run / "best.pth")
    torch.save(zeroshot, run / "zeroshot.pth")
    return run


@pytest.mark.parametrize("flags", [("--wise-ft", "0.5"), ()])
def test_one_command_writes_one_set_of_weights_and_one_temperature(moved_run, real_flowers, tmp_path, monkeypatch,
                                                                    flags):
    """.pth, .onnx and CPU package of one export come from the same payload: WiSE-FT weights, fp16 storage and the
    temperature fitted once on them (the package's compile is replaced by a probe of what it was given)."""
    require(importlib.util.find_spec("onnxruntime") is not None, "the ONNX check needs onnxruntime")
    run = moved_run
    pth, onnx_path, compiled = tmp_path / "w.pth", tmp_path / "w.onnx", []
    monkeypatch.setattr(export, "compile_cpu_package", lambda payload, path: compiled.append(payload) or (path, 0.0))
    payload = _export(run, pth, *flags, "--onnx", str(onnx_path), "--cpu-package")
    onnx_model = fc.load_model(onnx_path)
    assert payload["dtype"] == "float16" and onnx_model.temperature == payload[TEMPERATURE_KEY] != 1.0
    photos = _valid_photos(run, real_flowers)
    np.testing.assert_allclose(_probs(onnx_model, photos), _probs(fc.load_model(pth, device="cpu"), photos),
                               atol=1e-4)
    (package_payload,) = compiled
    assert package_payload[TEMPERATURE_KEY] == payload[TEMPERATURE_KEY]
    assert all(torch.equal(package_payload["state_dict"][k], v) for k, v in payload["state_dict"].items())


def test_sweep_reports_every_alpha(clip_run, tmp_path, capsys):
    run, _ = clip_run
    assert commands.evaluate([str(run), "--wise-ft-sweep", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "wise_ft.json").read_text())
    assert [r["alpha"] for r in report["rows"]] == [round(0.1 * i, 1) for i in range(11)]
    assert all(0 <= r["accuracy"] <= 1 and r["nll"] > 0 and 0 <= r["ece"] <= 1 for r in report["rows"])
    assert "alpha  accuracy     NLL     ECE" in out and (tmp_path / "wise_ft.png").stat().st_size > 0
    # alpha 1 is the fine-tuned model, measured the same way as the run's own (raw) evaluation
    raw = json.loads((run / "eval_metrics.json").read_text())["calibration"]["raw"]
    assert report["rows"][-1]["nll"] == pytest.approx(raw["nll"], abs=2e-3)  # fp32 sweep vs fp16 payload


@pytest.mark.parametrize("config, reason", [
    (dict(arch="clip", no_pretrained=True, head_init="random"), "--no-pretrained"),
    (dict(arch="cnn", no_pretrained=False), "cnn run"),
    (dict(arch="clip", no_pretrained=False, head_init="random"), "random head"),
])
def test_runs_without_a_meaningful_zero_shot_model_are_refused(tmp_path, capsys, config, reason):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(dict(model={}, config=config)))
    assert commands.export([str(run), "--wise-ft", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--wise-ft" in err and reason in err
    assert commands.evaluate([str(run), "--wise-ft-sweep"]) == 2
    assert reason in capsys.readouterr().err
