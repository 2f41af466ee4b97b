"""flowers_classifier's ensemble: `load_ensemble` and `predict_proba`/`predict` on a list of models
average the probability vectors of the CNN and the ViT (tiny random-init exports, real photos)."""

from __future__ import annotations

import math

import pytest

import flowers_classifier as fc


@pytest.fixture(scope="module")
def ensemble(tiny_cnn_pth, tiny_vit_pth) -> list[fc.FlowerClassifier]:
    return fc.load_ensemble(tiny_cnn_pth, tiny_vit_pth, device="cpu")


def test_load_ensemble_holds_cnn_then_vit(ensemble):
    assert [m.family for m in ensemble] == ["cnn", "clip"]


def test_ensemble_is_the_mean_of_both_models(ensemble, real_photos):
    photo = real_photos["rose"][0]
    cnn, vit = (fc.predict_proba(m, photo) for m in ensemble)
    both = fc.predict_proba(ensemble, photo)
    assert list(both) == list(fc.CLASSES)
    for c in fc.CLASSES:
        assert both[c] == pytest.approx((cnn[c] + vit[c]) / 2, abs=1e-6)
    assert math.fsum(both.values()) == pytest.approx(1.0, abs=1e-5)
    assert cnn != vit  # two different random nets: a mean of identical vectors would prove nothing


def test_predict_on_ensemble_is_the_argmax(ensemble, real_photos):
    photo = real_photos["tulip"][0]
    probs = fc.predict_proba(ensemble, photo)
    assert fc.predict(ensemble, photo) == max(probs, key=probs.get)


def test_single_model_in_a_list_equals_the_model(ensemble, real_photos):
    photo = real_photos["daisy"][0]
    assert fc.predict_proba([ensemble[0]], photo) == fc.predict_proba(ensemble[0], photo)


def test_load_ensemble_refuses_swapped_files(tiny_cnn_pth, tiny_vit_pth):
    with pytest.raises(fc.ModelFileError, match="holds a 'clip' model, not 'cnn'"):
        fc.load_ensemble(tiny_vit_pth, tiny_cnn_pth, device="cpu")


@pytest.mark.parametrize("bad", [[], "cnn_flowers.pth", None])
def test_predict_proba_refuses_what_is_not_a_model(bad, real_photos):
    with pytest.raises(TypeError, match="expected a FlowerClassifier or a non-empty list"):
        fc.predict_proba(bad, real_photos["rose"][0])


def test_bad_image_through_ensemble_names_the_file(ensemble, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    with pytest.raises(fc.InvalidImageError, match="notes.jpg: not a recognised image format"):
        fc.predict_proba(ensemble, bad)
