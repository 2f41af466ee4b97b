"""flowers_classifier: safe payload loading, preprocessing of odd images, predict/predict_proba."""

import dataclasses
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CNN, TINY_SIZE
from PIL import Image

import flowers_classifier as fc
from flowers_classifier import backends, factory, quantize
from flowers_classifier import payload as payload_format
from flowers_classifier.classes import CLASSES
from flowers_classifier.preprocess import Preprocess, load_rgb, preprocess_image
from flowers_fastai import cpu_package


def test_payload_is_plain_data_loadable_with_weights_only(tiny_cnn_pth):
    payload = torch.load(tiny_cnn_pth, weights_only=True)
    # quick_gelu is clip only; the fixture is written uncalibrated, without a temperature (tests/test_calibration.py),
    # and without the int8 request (tests/test_int8.py)
    assert set(payload) == (payload_format.REQUIRED_KEYS | payload_format.OPTIONAL_KEYS) - {
        "quick_gelu", payload_format.TEMPERATURE_KEY, payload_format.QUANTIZE_KEY}
    assert payload["family"] == "cnn" and payload["classes"] == list(CLASSES)
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the marker file would prove code ran


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"format_version": 1, "payload": _Exploit(str(marker))}, evil)
    with pytest.raises(fc.ModelFileError, match="pickled Python objects.*nothing in it was executed"):
        fc.load_cnn_model(evil)
    assert not marker.exists()


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(fc.ModelFileError, match="no such model file.*train.py --arch cnn"):
        fc.load_cnn_model(tmp_path / "none.pth")


def test_bare_name_is_looked_up_in_models_dir(tiny_cnn_pth, monkeypatch):
    monkeypatch.setattr(payload_format, "MODELS_DIR", tiny_cnn_pth.parent)
    model = fc.load_cnn_model("cnn_flowers.pth")
    assert model.family == "cnn"


def test_cnn_file_is_refused_by_load_vit_model(tiny_cnn_pth):
    with pytest.raises(fc.ModelFileError, match="holds a 'cnn' model.*load_cnn_model"):
        fc.load_vit_model(tiny_cnn_pth)


def test_predict_returns_one_of_the_five_classes(tiny_cnn_pth, real_photos):
    model = fc.load_cnn_model(tiny_cnn_pth, device="cpu")
    for photos in real_photos.values():
        probs = fc.predict_proba(model, photos[0])
        assert list(probs) == list(CLASSES) and abs(sum(probs.values()) - 1) < 1e-5
        assert fc.predict(model, photos[0]) == max(probs, key=probs.get)


def test_damaged_image_error_names_the_file(tiny_cnn_pth, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(fc.InvalidImageError, match="broken.jpg") as err:
        fc.predict(fc.load_cnn_model(tiny_cnn_pth, device="cpu"), bad)
    assert isinstance(err.value, ValueError)


def test_flowers_classifier_never_imports_fastai(tiny_cnn_pth):
    code = (f"import sys, flowers_classifier as fc; fc.load_cnn_model(r'{tiny_cnn_pth}', device='cpu'); "
            "print('fastai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def photo(tmp_path, name="p.jpg", exif_orientation=None):
    """A photo with a distinct top half, optionally stored rotated with an EXIF orientation tag."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:20] = (200, 30, 30)
    img = Image.fromarray(arr)
    path = tmp_path / name
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation  # 6 = stored rotated, display rotated 90 degrees clockwise
        img.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif.tobytes(), quality=95)
    else:
        img.save(path, quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path):
    upright = load_rgb(photo(tmp_path, "up.jpg"))
    rotated = load_rgb(photo(tmp_path, "rot.jpg", exif_orientation=6))
    assert rotated.size == upright.size
    assert np.abs(np.asarray(rotated, float) - np.asarray(upright, float)).mean() < 3


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    img = Image.new("RGB", (30, 20), (120, 60, 200)).convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    x = preprocess_image(path, Preprocess(16, (0.5,) * 3, (0.5,) * 3))
    assert x.shape == (3, 16, 16) and torch.isfinite(x).all()


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    path = tmp_path / "clear.png"
    path.write_bytes(buf.getvalue())
    assert load_rgb(path).getpixel((3, 3)) == (255, 255, 255)


def test_cpu_micro_batches_give_the_whole_batch_result_in_order(tiny_cnn_pth):
    model = fc.load_model(tiny_cnn_pth, device="cpu", backend="eager")
    assert model.backend.micro_batch == backends.cpu_micro_batch(model.prep.image_size) == 24  # 2 x (224/64)^2
    assert backends.cpu_micro_batch(224) == backends.CPU_MICRO_BATCH and backends.cpu_micro_batch(336) == 1
    x = torch.randn(2 * backends.CPU_MICRO_BATCH + 1, 3, model.prep.image_size, model.prep.image_size)
    whole = model.probabilities(x)
    # the micro-batch is chosen when the backend is built: one of CPU_MICRO_BATCH images, same weights
    chunked_backend = backends.EagerBackend(model.net, "cnn", model.prep.image_size,
                                            micro_batch=backends.CPU_MICRO_BATCH)
    chunked = dataclasses.replace(model, backend=chunked_backend).probabilities(x)
    assert chunked.shape == (len(x), len(CLASSES))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    one_by_one = torch.cat([model.probabilities(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(chunked, one_by_one, rtol=1e-5, atol=1e-6)


def test_cpu_module_swaps_keep_the_outputs():
    """The module swaps of the CPU path (Linear as 1x1 convolution, 1x1 convolutions and patchify as Linear,
    depthwise convolutions on small maps as a dense mix) replace what they say and compute the same net."""
    torch.manual_seed(0)
    net = factory.create_cnn(TINY_CNN).eval()
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        expected = net(x)
    linears = sum(type(m) is torch.nn.Linear for m in net.modules())
    backends._linears_as_convs(net)
    assert linears > 0 and not any(type(m) is torch.nn.Linear for m in net.modules())
    assert sum(isinstance(m, backends._LinearAsConv) for m in net.modules()) == linears
    quantize.as_linears(net, patches=True)
    # convnextv2_atto at 64 px: stages on 16x16, 8x8, 4x4 and 2x2 maps with (2, 2, 6, 2) blocks; the last two
    # stages' depthwise convolutions are on maps of at most SMALL_MAP (16) positions
    assert cpu_package.small_map_depthwise_as_dense(net, x[:1]) == 6 + 2
    assert sum(isinstance(m, cpu_package.SmallMapDepthwiseConv) for m in net.modules()) == 8
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)
