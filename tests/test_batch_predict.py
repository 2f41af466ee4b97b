"""Batch prediction: `python -m flowers_classifier PATH...` and `flowers_classifier.predict_batch`, on real
photos with a tiny exported model; unreadable files are reported without stopping the rest."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import flowers_classifier as fc
from flowers_classifier import cli
from flowers_classifier.classes import CLASSES


@pytest.fixture
def photo_dir(real_photos, tmp_path):
    """Real photos in nested folders (recursion), one corrupt .jpg and a stray text file (ignored)."""
    root = tmp_path / "photos"
    for label, files in real_photos.items():
        folder = root / label / "nested" if label == "tulip" else root / label
        folder.mkdir(parents=True)
        for f in files[:3]:
            shutil.copy(f, folder / f.name)
    (root / "rose" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image")
    return root


def test_cli_predicts_every_good_image_and_reports_the_corrupt_one(tiny_cnn_pth, photo_dir, tmp_path):
    out = tmp_path / "preds.json"
    proc = subprocess.run([sys.executable, "-m", "flowers_classifier", str(photo_dir), "--model", str(tiny_cnn_pth),
                           "--json", str(out), "--bs", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr  # some failed
    records = json.loads(out.read_text())
    good = sorted(p for p in photo_dir.rglob("*.jpg") if p.name != "corrupt.jpg")
    assert len(good) == 15 and len(records) == 16
    by_path = {r["image_path"]: r for r in records}
    for path in good:
        r = by_path[str(path)]
        assert r["error"] is None and r["predicted_class"] in CLASSES
        assert set(r["probabilities"]) == set(CLASSES)
        assert math.isclose(sum(r["probabilities"].values()), 1, rel_tol=1e-5)
        assert r["confidence"] == max(r["probabilities"].values()) == r["probabilities"][r["predicted_class"]]
    bad = by_path[str(photo_dir / "rose" / "corrupt.jpg")]
    assert bad["predicted_class"] is None and "corrupt.jpg" in bad["error"]
    assert "corrupt.jpg" in proc.stderr and "15 image(s) predicted, 1 failed" in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 15  # one line per good image, no progress bar when stderr is not a terminal
    path, ranked = lines[0].split("\t")
    assert path in by_path and len(ranked.split("  ")) == 3  # top-3 "class 0.123" pairs
    assert "\r" not in proc.stderr


def test_exit_code_0_when_every_image_is_predicted(tiny_cnn_pth, real_photos, capsys):
    files = [str(real_photos["rose"][0]), str(real_photos["daisy"][0])]
    assert cli.main([*files, "--model", str(tiny_cnn_pth), "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files
    assert all(len(line.split("\t")[1].split()) == 2 for line in lines)  # "class confidence"


def test_batched_probabilities_equal_single_image_ones(tiny_cnn_pth, real_photos):
    model = fc.load_model(tiny_cnn_pth, device="cpu")
    paths = [p for files in real_photos.values() for p in files[:2]]
    records = fc.predict_batch(model, paths, bs=3)
    assert [r["image_path"] for r in records] == [str(p) for p in paths]
    for path, record in zip(paths, records, strict=True):
        single = fc.predict_proba(model, path)
        assert record["probabilities"] == pytest.approx(single, abs=1e-5)


def test_iter_probabilities_keeps_order_around_failures(tiny_cnn_pth, real_photos, tmp_path):
    model = fc.load_model(tiny_cnn_pth, device="cpu")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    paths = [real_photos["rose"][0], bad, tmp_path / "missing.jpg", real_photos["tulip"][0]]
    results = list(fc.iter_probabilities(model, paths, bs=2))
    assert [r[0] for r in results] == paths
    assert [r[2] is None for r in results] == [True, False, False, True]
    assert "no such file" in results[2][2]
    assert all(r[1].shape == (len(CLASSES),) and torch.isfinite(r[1]).all() for r in results if r[2] is None)


def test_find_images_recurses_and_keeps_explicit_files(photo_dir):
    found = fc.find_images([photo_dir, photo_dir / "notes.txt"])
    assert sum(p.suffix == ".jpg" for p in found) == 16 and found[-1] == photo_dir / "notes.txt"
    assert any("nested" in p.parts for p in found)


def test_usage_errors_exit_2(tiny_cnn_pth, tmp_path, capsys):
    assert cli.main([str(tmp_path), "--model", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err and "--model" in err
    (tmp_path / "empty").mkdir()
    assert cli.main([str(tmp_path / "empty"), "--model", str(tiny_cnn_pth)]) == 2
    assert "folder holds no image files" in capsys.readouterr().err
