"""flowers-predict (flowers_apps.cli.predict): `--engine ray` (a Ray Data pipeline) gives the in-process records row
for row, broken files included, with the same exit code; --out writes them as CSV or Parquet; the local engine
never imports Ray. The Ray runs are on the session's local Ray (conftest `ray_cluster`)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import flowers_classifier as fc
from flowers_apps import cli


@pytest.fixture(scope="module")
def photos(real_flowers, tmp_path_factory):
    """Every committed photo (in a folder, searched recursively) plus broken files given by name: truncated,
    not an image, empty, missing."""
    tmp = tmp_path_factory.mktemp("batch")
    folder = tmp / "flowers"
    shutil.copytree(real_flowers, folder)
    data = next(folder.glob("rose/*.jpg")).read_bytes()
    broken = {"truncated.jpg": data[:len(data) // 2], "notes.jpg": b"roses are red", "empty.png": b""}
    for name, content in broken.items():
        (tmp / name).write_bytes(content)
    return [str(folder), *(str(tmp / name) for name in broken), str(tmp / "missing.jpg")]


def test_engine_ray_equals_in_process_predict_batch_row_for_row(ray_cluster, tiny_cnn_pth, photos, tmp_path):
    out_json, out_parquet = tmp_path / "ray.json", tmp_path / "ray.parquet"
    args = [*photos, "--model", str(tiny_cnn_pth), "--bs", "8", "--engine", "ray", "--replicas", "2"]
    assert cli.predict([*args, "--json", str(out_json), "--out", str(out_parquet)]) == 1  # some files are broken
    records = json.loads(out_json.read_text())
    expected = fc.predict_batch(fc.load_model(tiny_cnn_pth, device="cpu"), fc.find_images(photos), bs=8)
    assert len(records) == len(expected) == 60 + 4
    for got, want in zip(records, expected, strict=True):
        assert got["image_path"] == want["image_path"] and got["error"] == want["error"]
        assert got["predicted_class"] == want["predicted_class"]
        if want["error"] is None:
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
            assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
    assert sum(r["error"] is not None for r in records) == 4

    import pyarrow.parquet as pq
    table = pq.read_table(out_parquet).to_pylist()
    assert [r["image_path"] for r in table] == [r["image_path"] for r in records]
    assert [r["error"] for r in table] == [r["error"] for r in records]
    assert table[0]["probabilities"] == pytest.approx(records[0]["probabilities"], abs=1e-6)
    assert table[-1]["probabilities"] is None


def test_engine_flags_need_the_ray_engine_and_out_needs_a_known_suffix(tiny_cnn_pth, real_photos, tmp_path, capsys):
    photo = str(real_photos["rose"][0])
    for flags in (["--replicas", "2"], ["--address", "127.0.0.1:6379"], ["--out", str(tmp_path / "r.xlsx")]):
        with pytest.raises(SystemExit) as exit_:
            cli.predict([photo, "--model", str(tiny_cnn_pth), *flags])
        assert exit_.value.code == 2
        assert flags[0] in capsys.readouterr().err


def test_local_engine_writes_out_and_never_imports_ray(tiny_cnn_pth, real_photos, tmp_path):
    """flowers-predict without --engine is `python -m flowers_classifier` plus --out: no Ray imported."""
    out = tmp_path / "local.csv"
    code = ("import sys; from flowers_apps import cli; code = cli.predict(sys.argv[1:]); "
            "print('ray' in sys.modules, code)")
    files = [str(p) for p in real_photos["daisy"][:3]] + [str(tmp_path / "missing.jpg")]
    done = subprocess.run([sys.executable, "-c", code, *files, "--model", str(tiny_cnn_pth), "--out", str(out),
                           "--json", str(tmp_path / "local.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.splitlines()[-1] == "False 1", done.stdout + done.stderr
    records = json.loads((tmp_path / "local.json").read_text())
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image_path"] for r in rows] == files
    assert json.loads(rows[0]["probabilities"]) == pytest.approx(records[0]["probabilities"], abs=1e-9)
    assert float(rows[0]["confidence"]) == pytest.approx(records[0]["confidence"], abs=1e-9)
    assert rows[-1]["probabilities"] == "" and "no such file" in rows[-1]["error"]


def test_engine_ray_refuses_more_replicas_than_the_cluster_can_feed(ray_cluster, tiny_cnn_pth, real_photos, capsys):
    """Each model actor reserves a CPU and reading/decoding needs one more: a job that cannot run says so (exit 2)
    instead of waiting forever."""
    photo = str(real_photos["rose"][0])
    assert cli.predict([photo, "--model", str(tiny_cnn_pth), "--engine", "ray", "--replicas", "64"]) == 2
    assert "--replicas 64 needs 65 CPUs" in capsys.readouterr().err
