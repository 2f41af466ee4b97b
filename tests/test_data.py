"""Data folder checks, label normalisation, the stratified split, undecodable files, the DataBlock."""

import shutil

import pandas as pd
import pytest
import torch
from conftest import make_image_folder

from flowers_classifier.classes import CLASSES, normalize_label
from flowers_classifier.preprocess import Preprocess, preprocess_image
from flowers_fastai import data
from flowers_fastai.data import DatasetError


@pytest.mark.parametrize("name, label", [("roses", "rose"), ("Sunflowers", "sunflower"), ("TULIPS", "tulip"),
                                         ("daisy", "daisy"), (" Dandelion ", "dandelion"), ("lily", None)])
def test_normalize_label(name, label):
    assert normalize_label(name) == label


def test_scan_folder_maps_plural_and_case_insensitive_names(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    (root / "rose").rename(root / "Roses")
    (root / "tulip").rename(root / "TULIPS")
    (root / "LICENSE.txt").write_text("not a class")  # stray files beside class folders are ignored
    df = data.scan_folder(root)
    assert sorted(df["label"].unique()) == sorted(CLASSES)
    assert (df["label"] == "rose").sum() == 2
    assert all(p.startswith("Roses/") for p in df[df.label == "rose"]["path"])


def test_missing_class_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    shutil.rmtree(root / "daisy")
    with pytest.raises(DatasetError, match="missing class folder.*daisy"):
        data.scan_folder(root)


def test_unknown_class_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    (root / "orchid").mkdir()
    with pytest.raises(DatasetError, match="unknown class folder 'orchid'"):
        data.scan_folder(root)


def test_empty_class_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    for f in (root / "tulip").iterdir():
        f.unlink()
    (root / "tulip" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="'tulip' has no image files"):
        data.scan_folder(root)


def test_missing_data_folder_names_the_flag(tmp_path):
    with pytest.raises(DatasetError, match="--data .*no such folder"):
        data.scan_folder(tmp_path / "nope")


def test_stratified_split_is_seeded_and_per_class(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=10)
    df = data.scan_folder(root)
    a, b = data.stratified_split(df, 0.2, seed=1), data.stratified_split(df, 0.2, seed=1)
    c = data.stratified_split(df, 0.2, seed=2)
    assert a["is_valid"].tolist() == b["is_valid"].tolist()
    assert a["is_valid"].tolist() != c["is_valid"].tolist()
    assert a.groupby("label")["is_valid"].sum().tolist() == [2] * len(CLASSES)


def test_stratified_split_on_real_counts():
    counts = dict(daisy=607, dandelion=861, rose=610, sunflower=578, tulip=795)  # the flowers128 set's
    table = pd.DataFrame([(f"{c}/{i}.jpg", c) for c, n in counts.items() for i in range(n)], columns=["path", "label"])
    df = data.stratified_split(table, 0.2, seed=42)
    per_class = df.groupby("label")["is_valid"].agg(["sum", "count"])
    ratio = per_class["sum"] / per_class["count"]
    assert ratio.between(0.19, 0.21).all(), ratio


def plant_bad_files(root):
    """A truncated JPEG and a text file renamed .jpg, beside good images."""
    good = next((root / "rose").glob("*.jpg")).read_bytes()
    (root / "rose" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "daisy" / "notes.jpg").write_text("this is not an image\n")
    return {"rose/truncated.jpg", "daisy/notes.jpg"}


def test_prepare_split_skips_and_reports_undecodable_files(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=5)
    bad = plant_bad_files(root)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.warns(UserWarning, match="2 file\\(s\\).*cannot be decoded"):
        df = data.prepare_split(root, run, valid_pct=0.2, seed=0)
    assert not bad & set(df["path"])
    assert set(pd.read_csv(run / "skipped.csv")["path"]) == bad
    written = pd.read_csv(run / "split.csv")
    assert list(written.columns) == ["path", "label", "is_valid"] and len(written) == 5 * len(CLASSES)


def test_class_left_empty_by_undecodable_files_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=2)
    for f in (root / "sunflower").iterdir():
        f.write_text("garbage")
    with pytest.raises(DatasetError, match="sunflower have no decodable images"), pytest.warns(UserWarning):
        data.prepare_split(root, tmp_path, seed=0)


def test_valid_batches_are_exactly_the_serving_preprocessing(tmp_path):
    """Valid DataLoader tensors == flowers_classifier's preprocessing of the same files."""
    root = make_image_folder(tmp_path / "imgs", per_class=4, size=50)
    df = data.stratified_split(data.scan_folder(root), 0.5, seed=0)
    prep = Preprocess(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", 0.875)
    dls = data.make_dataloaders(df, root, prep, bs=4)
    xb, yb = dls.valid.one_batch()
    valid_rows = df[df.is_valid].reset_index(drop=True)
    expected = torch.stack([preprocess_image(root / p, prep) for p in valid_rows["path"][:4]])
    assert torch.allclose(xb.cpu(), expected, atol=1e-6)
    assert [CLASSES[i] for i in yb.tolist()] == valid_rows["label"][:4].tolist()
    xt, _ = dls.train.one_batch()
    assert xt.shape == (4, 3, 32, 32)


def test_min_scale_reaches_the_train_crop_only(tmp_path):
    from fastai.vision.augment import RandomResizedCrop
    root = make_image_folder(tmp_path / "imgs", per_class=2, size=40)
    df = data.stratified_split(data.scan_folder(root), 0.5, seed=0)
    dls = data.make_dataloaders(df, root, Preprocess(32, (0.5,) * 3, (0.25,) * 3), bs=2, min_scale=0.7)
    crops = [t for t in dls.train.after_item.fs if isinstance(t, RandomResizedCrop)]
    assert len(crops) == 1 and crops[0].min_scale == 0.7 and crops[0].split_idx == 0
