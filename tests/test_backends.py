"""One FlowerClassifier, backends behind it (flowers_classifier/backends.py): each backend serves the eager
probabilities through the whole predict API (one image, TTA, batches, the ensemble, calibration);
`backend="auto"` picks as load_model states; a backend asked for by name that cannot serve says why; and a
loaded model is fixed: nothing on it or its backend is set afterwards."""

from __future__ import annotations

import dataclasses
import shutil
import sys

import pytest
import torch

import flowers_classifier as fc
from flowers_classifier.aot import cpu_package_path
from flowers_classifier.backends import BackendError
from flowers_classifier.inference import _choose_backend
from flowers_classifier.payload import INT8, QUANTIZE_KEY, TEMPERATURE_KEY
from flowers_fastai import cli as commands

T = 2.5  # a calibration temperature, so that every backend is shown to serve softmax(logits / T)
# Max abs difference of probabilities from eager, as each backend's own tests bound it: the ONNX graph and the
# compiled package compute the same fp32 function (test_onnx.py, test_cpu_package.py); int8 approximates it
# (test_int8.py's INT8_PROB_TOLERANCE).
TOLERANCE = {"onnx": 1e-4, "cpu-package": 1e-4, "int8": 0.02}


@pytest.fixture(scope="module")
def files(packaged_cnn, tmp_path_factory):
    """(.pth with a temperature and the CPU package beside it, the same model's .onnx): the package still fits,
    as the temperature acts outside its graph; the ONNX graph is written by export.py's CLI."""
    folder = tmp_path_factory.mktemp("backends")
    pth = folder / "cnn_flowers.pth"
    torch.save(fc.load_payload(packaged_cnn) | {TEMPERATURE_KEY: T}, pth)
    shutil.copy(cpu_package_path(packaged_cnn), cpu_package_path(pth))
    onnx_path = folder / "cnn_flowers.onnx"
    assert commands.export([str(pth), "--onnx", str(onnx_path)]) == 0
    return pth, onnx_path


def _load(name: str, files, **options) -> fc.FlowerClassifier:
    pth, onnx_path = files
    return fc.load_model(onnx_path if name == "onnx" else pth, backend=name, **options)


def _max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b) == list(fc.CLASSES)
    return max(abs(a[c] - b[c]) for c in fc.CLASSES)


@pytest.mark.parametrize("name", ["onnx", "int8", "cpu-package"])
def test_every_backend_serves_the_eager_probabilities(name, files, tiny_vit_pth, real_photos):
    model, eager = _load(name, files, device="cpu"), _load("eager", files, device="cpu")
    assert (model.backend.name, eager.backend.name) == (name, "eager")
    assert model.temperature == eager.temperature == T and model.prep == eager.prep
    tolerance = TOLERANCE[name]
    photos = real_photos["rose"][:2] + real_photos["tulip"][:2]
    for tta in (False, True):
        assert _max_diff(fc.predict_proba(model, photos[0], tta=tta), fc.predict_proba(eager, photos[0], tta=tta)) \
            < tolerance
    got, expected = fc.predict_batch(model, photos, bs=3), fc.predict_batch(eager, photos, bs=3)
    assert [r["image_path"] for r in got] == [r["image_path"] for r in expected]
    assert max(_max_diff(g["probabilities"], e["probabilities"]) for g, e in zip(got, expected, strict=True)) \
        < tolerance
    views = [(p, v) for p, v, _ in fc.iter_probabilities(model, photos[:2], load=fc.preprocess.tta_views)]
    assert all(v.shape == (10, len(fc.CLASSES)) for _, v in views)
    vit = fc.load_vit_model(tiny_vit_pth, device="cpu")
    assert _max_diff(fc.predict_proba([model, vit], photos[1]), fc.predict_proba([eager, vit], photos[1])) \
        < tolerance
    raw, raw_eager = _load(name, files, device="cpu", calibrated=False), _load("eager", files, calibrated=False,
                                                                               device="cpu")
    assert raw.temperature == 1.0
    x = fc.preprocess.preprocess_image(photos[2], model.prep)[None]
    assert (raw.probabilities(x) - raw_eager.probabilities(x)).abs().max() < tolerance
    torch.testing.assert_close(model.probabilities(x), (model.logits(x) / T).softmax(-1))


def test_auto_picks_as_load_model_states(files, tiny_cnn_pth, tmp_path):
    pth, onnx_path = files
    assert fc.load_model(onnx_path).backend.name == "onnx"
    assert fc.load_model(pth, device="cpu").backend.name == "cpu-package"  # a fitting package beside the .pth
    assert fc.load_model(tiny_cnn_pth, device="cpu").backend.name == "eager"  # none beside it
    asks_int8 = tmp_path / "int8.pth"
    torch.save(fc.load_payload(pth) | {QUANTIZE_KEY: INT8}, asks_int8)
    shutil.copy(cpu_package_path(pth), cpu_package_path(asks_int8))
    assert fc.load_model(asks_int8, device="cpu").backend.name == "int8"  # the file's request before the package
    payload = fc.load_payload(pth)
    assert _choose_backend("auto", payload, pth, torch.device("cpu"), True) == "eager"  # compile: the eager network's
    assert _choose_backend("auto", payload, pth, torch.device("cuda"), False) == "eager"  # a GPU: eager


def test_a_backend_named_that_cannot_serve_says_why(files, tiny_cnn_pth, monkeypatch):
    pth, onnx_path = files
    cases = [
        (dict(backend="onnx"), tiny_cnn_pth, r"backend='onnx' serves an \.onnx graph.*export\.py .* --onnx"),
        (dict(backend="eager"), onnx_path, r"served by ONNX Runtime only, not load_model\(backend='eager'\)"),
        (dict(backend="cpu-package"), tiny_cnn_pth, r"no CPU package beside .*--cpu-package"),
        (dict(backend="int8", device="cuda"), pth, r"backend='int8' runs on the CPU only.*device='cpu'"),
        (dict(backend="cpu-package", device="cuda"), pth, r"backend='cpu-package' runs on the CPU only"),
        (dict(backend="cpu-package", compile=True), pth, r"compile=True.*already compiled"),
        (dict(backend="fast"), pth, r"backend='fast'.*not a backend.*'eager'"),
    ]
    for options, path, reason in cases:
        with pytest.raises(BackendError, match=reason):
            fc.load_model(path, **options)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed: its import fails
    with pytest.raises(BackendError, match=r"needs onnxruntime.*pip install onnxruntime"):
        fc.load_model(onnx_path, backend="onnx")
    assert issubclass(BackendError, fc.ModelFileError)  # what callers already catch (the CLI's exit code 2)


def test_a_loaded_model_is_fixed(files):
    """Today's flags set on a model after load (channels_last, micro_batch, compiled, int8, temperature)
    would change what it serves behind its back: the model and its backend refuse them."""
    pth, onnx_path = files
    for name in ("eager", "int8", "cpu-package", "onnx"):
        model = _load(name, files, device="cpu")
        for attribute, value in [("channels_last", False), ("micro_batch", 1), ("compiled", None), ("int8", True),
                                 ("temperature", 1.0), ("backend", None)]:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(model, attribute, value)
        for attribute in ("micro_batch", "device", "name", "compiled", "net", "_forward", "_package"):
            with pytest.raises(AttributeError, match="fixed when built"):
                setattr(model.backend, attribute, None)
        assert model.temperature == T and model.backend.name == name
