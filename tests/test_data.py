"""Data folder checks, label normalisation, the stratified split, undecodable files, the DataBlock."""

import json
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


def test_test_split_is_stratified_seeded_and_apart_from_valid(tmp_path):
    df = data.scan_folder(make_image_folder(tmp_path / "imgs", per_class=10))
    a, b = (data.stratified_split(df, 0.2, seed=1, test_pct=0.3) for _ in range(2))
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != data.stratified_split(df, 0.2, seed=2, test_pct=0.3)["split"].tolist()
    per_class = a.groupby("label")["split"].value_counts().unstack()
    assert per_class["test"].tolist() == [3] * len(CLASSES) and per_class["valid"].tolist() == [2] * len(CLASSES)
    assert a["is_valid"].tolist() == (a["split"] == "valid").tolist()  # old readers of is_valid see valid only
    assert set(data.stratified_split(df, 0.2, seed=1)["split"]) == {"train", "valid"}  # test_pct 0: none


def test_split_fractions_are_checked():
    df = pd.DataFrame([(f"{c}/{i}.jpg", c) for c in CLASSES for i in range(3)], columns=["path", "label"])
    with pytest.raises(DatasetError, match="--test-pct 0.8 with --valid-pct 0.2"):
        data.stratified_split(df, 0.2, test_pct=0.8)
    two = df.groupby("label").head(2)
    with pytest.raises(DatasetError, match="'daisy' has 2 usable image.*need at least 3 distinct"):
        data.stratified_split(two, 0.2, test_pct=0.2)


def test_test_rows_never_reach_the_dataloaders(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=6, size=40)
    df = data.stratified_split(data.scan_folder(root), 0.2, seed=0, test_pct=0.3)
    dls = data.make_dataloaders(df, root, Preprocess(32, (0.5,) * 3, (0.25,) * 3), bs=4)
    seen = {str(p) for dl in (dls.train, dls.valid) for p in dl.items["path"]}
    test = set(df.loc[df["split"] == "test", "path"])
    assert len(test) == 2 * len(CLASSES) and not test & seen
    assert set(dls.valid.items["path"]) == set(df.loc[df["split"] == "valid", "path"])
    old = pd.read_csv(_write_old_split(df, tmp_path / "old.csv"))  # a split.csv from before test splits
    dls = data.make_dataloaders(old, root, Preprocess(32, (0.5,) * 3, (0.25,) * 3), bs=4)
    assert len(dls.train.items) + len(dls.valid.items) == len(df)


def _write_old_split(df, path):
    df[["path", "label", "is_valid"]].to_csv(path, index=False)
    return path


def plant_copies(root, per_class: int = 3):
    """`per_class` extra copies of image 0 of every class, byte-for-byte and re-encoded as PNG."""
    from PIL import Image
    for label in CLASSES:
        Image.open(root / label / "0.jpg").save(root / label / "copy.png")
        for i in range(per_class - 1):
            shutil.copy(root / label / "0.jpg", root / label / f"copy{i}.jpg")
    return {label: {f"{label}/0.jpg", f"{label}/copy.png"} | {f"{label}/copy{i}.jpg" for i in range(per_class - 1)}
            for label in CLASSES}


def test_copies_of_a_photo_stay_on_one_side_of_the_split(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=8)
    copies = plant_copies(root)
    for seed in range(12):  # unrelated draws: a split by file would part the copies in most of them
        run = tmp_path / f"run{seed}"
        run.mkdir()
        df = data.prepare_split(root, run, valid_pct=0.25, seed=seed, test_pct=0.25).set_index("path")
        for label, group in copies.items():
            assert df.loc[sorted(group), "split"].nunique() == 1, (seed, label, df.loc[sorted(group), "split"])
        assert df.groupby("label")["split"].nunique().eq(3).all()  # still every class in every split


def test_copies_filed_under_two_classes_are_left_out_and_listed(real_flowers, tmp_path, capsys):
    df = data.prepare_split(real_flowers, tmp_path, seed=0, test_pct=0.2, min_size=64)
    conflict = {"rose/17104364030_ee31ee279b_n.jpg", "tulip/17104364030_ee31ee279b_n.jpg"}
    assert not conflict & set(df["path"]) and not conflict & set(pd.read_csv(tmp_path / "split.csv")["path"])
    report = json.loads((tmp_path / "audit.json").read_text())
    assert {d["path"] for d in report["dropped_from_training"]} == conflict
    assert report["summary"]["dropped_files"] == 2
    assert all("rose and tulip" in d["reason"] for d in report["dropped_from_training"])
    same_class = df.set_index("path").loc[["sunflower/15069459615_7e0fd61914_n.jpg",
                                           "sunflower/15072973261_73e2912ef2_n.jpg"], "split"]
    assert same_class.nunique() == 1  # the same-class pair is kept, on one side
    with pytest.raises(DatasetError, match="carries different labels"):
        data.stratified_split(pd.DataFrame(dict(path=["a", "b"], label=["rose", "tulip"])), groups=["x", "x"])


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
    assert list(written.columns) == ["path", "label", "is_valid", "split"] and len(written) == 5 * len(CLASSES)


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
