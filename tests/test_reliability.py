"""Bad images (files, their bytes, PIL images) and hostile model files: each case works correctly or raises the
project's own ValueError subclass naming the file; nothing in a model file ever executes."""

import io
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY_CNN, make_image_folder
from PIL import Image

import flowers_classifier as fc
from flowers_classifier.classes import CLASSES


@pytest.fixture(scope="module")
def model(tiny_cnn_pth):
    return fc.load_cnn_model(tiny_cnn_pth, device="cpu")


@pytest.fixture(scope="module")
def a_photo(real_photos) -> Image.Image:
    with Image.open(real_photos["sunflower"][0]) as img:
        return img.convert("RGB")


def bad_file(tmp_path, case, a_photo):
    path = tmp_path / {"directory": "folder.jpg", "text": "notes.txt"}.get(case, f"{case}.jpg")
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "truncated":
        a_photo.save(path, quality=95)
        path.write_bytes(path.read_bytes()[:600])
    elif case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "text":
        path.write_text("roses are red\n")
    elif case == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("case", ["zero_bytes", "truncated", "random_bytes", "text", "directory", "missing"])
def test_undecodable_inputs_raise_invalid_image_naming_the_file(model, tmp_path, a_photo, case):
    path = bad_file(tmp_path, case, a_photo)
    for fn in (fc.predict, fc.predict_proba):
        with pytest.raises(fc.InvalidImageError, match=path.name) as err:
            fn(model, path)
        assert isinstance(err.value, ValueError)


def test_decompression_bomb_is_refused(model, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (120, 120)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's guard, scaled down for the test
    with pytest.raises(fc.InvalidImageError, match="big.png.*too large"):
        fc.predict(model, path)


@pytest.mark.parametrize("case", ["zero_bytes", "truncated", "random_bytes", "text"])
def test_undecodable_bytes_raise_invalid_image_like_the_file(model, tmp_path, a_photo, case):
    """The same guards for an image given as its bytes (an HTTP body) as for the file holding them."""
    data = bad_file(tmp_path, case, a_photo).read_bytes()
    for fn in (fc.predict, fc.predict_proba):
        with pytest.raises(fc.InvalidImageError, match="image bytes") as err:
            fn(model, data)
        assert isinstance(err.value, ValueError)
    (record,) = fc.predict_batch(model, [data])
    assert record["image_path"] is None and "image bytes" in record["error"] and record["probabilities"] is None


def test_decompression_bomb_is_refused_as_bytes_and_as_a_pil_image(model, monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (120, 120)).save(buf, "PNG")
    with Image.open(io.BytesIO(buf.getvalue())) as opened:  # opened before the limit drops: not yet refused
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's guard, scaled down for the test
        for image in (buf.getvalue(), opened):
            with pytest.raises(fc.InvalidImageError, match="too large"):
                fc.predict(model, image)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 7000)  # over the limit, under twice it: the warning's case
        with pytest.raises(fc.InvalidImageError, match="too large"):
            fc.predict(model, opened)


def test_a_truncated_pil_image_is_refused_when_its_pixels_load(model, tmp_path, a_photo):
    path = tmp_path / "half.jpg"
    a_photo.save(path, quality=95)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])  # the header whole, half the pixels
    with Image.open(path) as lazy:  # Image.open reads the header only: the damage shows when the pixels load
        with pytest.raises(fc.InvalidImageError, match="PIL image.*cannot decode"):
            fc.predict_proba(model, lazy)


def test_bytes_and_pil_images_predict_as_the_file(model, real_photos, tmp_path):
    """predict_proba, predict, TTA and the batch path give the file's answer for its bytes and for the PIL image
    it opens to (a PNG/alpha/EXIF-rotated one too: the same decoding)."""
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(real_photos["rose"][0]) as img:
        img.transpose(Image.Transpose.ROTATE_270).save(rotated, exif=exif.tobytes(), quality=95)
    photos = [real_photos["daisy"][0], real_photos["tulip"][1], rotated]
    for path in photos:
        with Image.open(path) as pil:
            for image in (path.read_bytes(), bytearray(path.read_bytes()), pil):
                assert fc.predict_proba(model, image) == pytest.approx(fc.predict_proba(model, path), abs=1e-6)
                assert fc.predict_proba(model, image, tta=True) == pytest.approx(
                    fc.predict_proba(model, path, tta=True), abs=1e-6)
                assert fc.predict(model, image) == fc.predict(model, path)
    mixed = [photos[0].read_bytes(), photos[1], Image.open(photos[2])]
    records = fc.predict_batch(model, mixed, bs=2)
    assert [r["image_path"] for r in records] == [None, str(photos[1]), None]
    for record, path in zip(records, photos, strict=True):
        assert record["error"] is None
        assert record["probabilities"] == pytest.approx(fc.predict_proba(model, path), abs=1e-5)


def save_variant(a_photo, tmp_path, case):
    """The same photo in another mode/format; returns its path."""
    if case == "cmyk":
        path = tmp_path / "cmyk.jpg"
        a_photo.convert("CMYK").save(path, quality=95)
    elif case == "gray_L":
        path = tmp_path / "gray.png"
        a_photo.convert("L").save(path)
    elif case == "gray_LA":
        path = tmp_path / "gray_alpha.png"
        a_photo.convert("LA").save(path)
    elif case == "rgba":
        path = tmp_path / "rgba.png"
        a_photo.convert("RGBA").save(path)
    elif case == "palette_transparency":
        path = tmp_path / "palette.png"
        a_photo.convert("P").save(path, transparency=0)
    elif case == "png16":
        path = tmp_path / "deep.png"
        Image.fromarray(np.asarray(a_photo.convert("L"), dtype=np.uint16) * 257).save(path)
    elif case == "webp":
        path = tmp_path / "photo.webp"
        a_photo.save(path, quality=95)
    elif case == "tiny_1x1":
        path = tmp_path / "dot.png"
        a_photo.resize((1, 1)).save(path)
    return path


@pytest.mark.parametrize("case", ["cmyk", "gray_L", "gray_LA", "rgba", "palette_transparency", "png16", "webp",
                                  "tiny_1x1"])
def test_odd_but_valid_images_are_classified(model, a_photo, tmp_path, case):
    probs = fc.predict_proba(model, save_variant(a_photo, tmp_path, case))
    assert list(probs) == list(CLASSES) and abs(sum(probs.values()) - 1) < 1e-5


def test_16bit_png_matches_its_8bit_version(model, a_photo, tmp_path):
    deep = fc.predict_proba(model, save_variant(a_photo, tmp_path, "png16"))
    eight = fc.predict_proba(model, save_variant(a_photo, tmp_path, "gray_L"))
    assert max(abs(deep[c] - eight[c]) for c in CLASSES) < 1e-3


def test_exif_rotated_photo_predicts_as_the_upright_one(model, a_photo, tmp_path):
    upright = tmp_path / "upright.png"
    a_photo.save(upright)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored rotated 90 degrees clockwise; viewers rotate it back
    rotated = tmp_path / "rotated.png"
    a_photo.transpose(Image.Transpose.ROTATE_270).save(rotated, exif=exif.tobytes())
    assert fc.predict_proba(model, rotated) == fc.predict_proba(model, upright)


def test_animated_gif_uses_its_first_frame(model, a_photo, tmp_path):
    frames = [a_photo.convert("P"), a_photo.rotate(90).convert("P"), a_photo.rotate(180).convert("P")]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = tmp_path / "first.png"
    with Image.open(gif) as img:
        img.convert("RGB").save(first)
    assert fc.predict_proba(model, gif) == fc.predict_proba(model, first)


# --------------------------------------------------------------------------- hostile model files

def tampered(tiny_cnn_pth, tmp_path, change) -> str:
    payload = torch.load(tiny_cnn_pth, weights_only=True)
    change(payload)
    path = tmp_path / "tampered.pth"
    torch.save(payload, path)
    return str(path)


def test_payload_with_a_missing_key_is_refused(tiny_cnn_pth, tmp_path):
    path = tampered(tiny_cnn_pth, tmp_path, lambda p: p.pop("mean"))
    with pytest.raises(fc.ModelFileError, match="tampered.pth.*missing keys \\['mean'\\]"):
        fc.load_cnn_model(path)


def test_payload_with_an_extra_key_is_refused(tiny_cnn_pth, tmp_path):
    path = tampered(tiny_cnn_pth, tmp_path, lambda p: p.update(hook="os.system"))
    with pytest.raises(fc.ModelFileError, match="unexpected keys \\['hook'\\]"):
        fc.load_cnn_model(path)


def test_payload_with_wrong_weights_is_refused(tiny_cnn_pth, tmp_path):
    path = tampered(tiny_cnn_pth, tmp_path, lambda p: p["state_dict"].pop("head.fc.weight"))
    with pytest.raises(fc.ModelFileError, match="weights do not fit convnextv2_atto"):
        fc.load_cnn_model(path)


def test_truncated_model_file_is_refused(tiny_cnn_pth, tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(tiny_cnn_pth.read_bytes()[:50_000])
    with pytest.raises(fc.ModelFileError, match="cut.pth: not a readable model file"):
        fc.load_cnn_model(path)


def test_fastai_learner_pkl_is_refused(tmp_path):
    from flowers_classifier import factory
    from flowers_classifier.preprocess import Preprocess
    from flowers_fastai import data
    from flowers_fastai.learner import Recipe, build_learner

    root = make_image_folder(tmp_path / "imgs", per_class=3)
    df = data.stratified_split(data.scan_folder(root), 0.34, seed=0)
    dls = data.make_dataloaders(df, root, Preprocess(32, (0.5,) * 3, (0.5,) * 3), bs=4)
    learn = build_learner(dls, factory.create_cnn(TINY_CNN), Recipe(), tmp_path)
    learn.export(tmp_path / "learner.pkl")
    assert zipfile.is_zipfile(tmp_path / "learner.pkl")
    with pytest.raises(fc.ModelFileError, match="learner.pkl: refused to load.*pickled Python objects"):
        fc.load_cnn_model(tmp_path / "learner.pkl")
