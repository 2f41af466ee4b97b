"""The data audit: `python -m flowers_fastai data audit`, and audit.json from prepare_split's one decode pass."""

import json
import shutil

import pandas as pd
import pytest
from conftest import make_image_folder
from PIL import Image

from flowers_fastai import audit, data
from flowers_fastai import cli as commands


@pytest.fixture
def planted(tmp_path):
    """A synthetic folder with known problems: two files that do not decode, a same-class duplicate, a
    duplicate re-encoded as PNG under another class, and one image smaller than the others."""
    root = make_image_folder(tmp_path / "images", per_class=4, size=48)
    (root / "rose" / "broken.jpg").write_bytes(b"this is not a jpeg")
    whole = (root / "daisy" / "1.jpg").read_bytes()
    (root / "daisy" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    shutil.copy(root / "dandelion" / "0.jpg", root / "dandelion" / "0 copy.jpg")
    # Same pixels, different bytes and class: only a hash of the decoded image finds it.
    Image.open(root / "rose" / "2.jpg").convert("RGB").save(root / "tulip" / "looks_like_rose.png")
    Image.new("RGB", (30, 40), "red").save(root / "sunflower" / "tiny.png")
    return root


def test_audit_cli_finds_every_planted_problem(planted, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert commands.data(["audit", str(planted), "--json", str(out), "--min-size", "40"]) == 0
    report = json.loads(out.read_text())
    assert report["files"] == 25 and report["class_counts"]["rose"] == 5 and report["class_counts"]["daisy"] == 5
    assert {u["path"] for u in report["unreadable"]} == {"rose/broken.jpg", "daisy/truncated.jpg"}
    assert [g["paths"] for g in report["duplicates"]] == [["dandelion/0 copy.jpg", "dandelion/0.jpg"],
                                                          ["rose/2.jpg", "tulip/looks_like_rose.png"]]
    assert [g["labels"] for g in report["conflicting_duplicates"]] == [["rose", "tulip"]]
    assert [(s["path"], s["width"], s["height"]) for s in report["small_images"]] == [("sunflower/tiny.png", 30, 40)]
    assert report["summary"] == dict(unreadable=2, duplicate_groups=2, duplicate_files=4, redundant_copies=2,
                                     conflicting_groups=1, small_images=1)
    printed = capsys.readouterr().out
    assert "rose/2.jpg == tulip/looks_like_rose.png  (labels: rose, tulip)" in printed
    assert "rose/broken.jpg: not a recognised image format" in printed


def test_min_size_defaults_to_the_training_size(planted, capsys):
    assert commands.data(["audit", str(planted)]) == 0
    assert "smaller than 224px on the short side: 23" in capsys.readouterr().out  # every readable image


def test_audit_of_a_folder_that_cannot_be_scanned_exits_2(tmp_path, capsys):
    assert commands.data(["audit", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_prepare_split_writes_audit_json_from_its_single_decode_pass(planted, tmp_path, monkeypatch):
    decoded = []
    real_load = audit.load_rgb
    monkeypatch.setattr(audit, "load_rgb", lambda path: decoded.append(path) or real_load(path))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.warns(UserWarning, match="cannot be decoded"):
        df = data.prepare_split(planted, run, valid_pct=0.25, seed=0, min_size=40)
    assert len(decoded) == 25  # every file once: the audit and the skip list share the pass
    report = json.loads((run / "audit.json").read_text())
    assert report["summary"]["conflicting_groups"] == 1 and report["min_size"] == 40
    assert set(pd.read_csv(run / "skipped.csv")["path"]) == {u["path"] for u in report["unreadable"]}
    # the photo filed under rose and tulip: both copies left out of the run, and listed
    assert [d["path"] for d in report["dropped_from_training"]] == ["rose/2.jpg", "tulip/looks_like_rose.png"]
    assert len(df) == 21 and not {"rose/2.jpg", "tulip/looks_like_rose.png"} & set(df["path"])
    assert "left out of the run (copies with conflicting labels): 2" in audit.format_report(report)
    # the same-class pair stays, on one side of the split
    assert df.set_index("path").loc[["dandelion/0 copy.jpg", "dandelion/0.jpg"], "split"].nunique() == 1


def test_real_photos_conflicting_duplicates_are_found(real_flowers, tmp_path):
    out = tmp_path / "audit.json"
    assert commands.data(["audit", str(real_flowers), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (conflict,) = report["conflicting_duplicates"]  # one Flickr photo filed under rose and under tulip
    assert conflict["labels"] == ["rose", "tulip"]
    assert conflict["paths"] == ["rose/17104364030_ee31ee279b_n.jpg", "tulip/17104364030_ee31ee279b_n.jpg"]
    same_class = [g for g in report["duplicates"] if len(g["labels"]) == 1]
    assert [g["paths"] for g in same_class] == [["sunflower/15069459615_7e0fd61914_n.jpg",
                                                 "sunflower/15072973261_73e2912ef2_n.jpg"]]
    assert report["summary"]["unreadable"] == 0 and report["files"] == 60
