"""`python -m flowers_fastai data download` against a small flower_photos-style archive on 127.0.0.1."""

import functools
import http.server
import tarfile
import threading

import pytest
from conftest import make_image_folder

from flowers_classifier.classes import CLASSES
from flowers_fastai import cli as commands
from flowers_fastai import data


@pytest.fixture
def archive_server(tmp_path):
    """Serves flower_photos.tgz (plural folder names + LICENSE.txt, like TensorFlow's) on loopback."""
    src = make_image_folder(tmp_path / "src" / "flower_photos", per_class=3)
    for label in ("rose", "sunflower", "tulip"):
        (src / label).rename(src / f"{label}s")
    (src / "LICENSE.txt").write_text("CC-BY\n")
    served = tmp_path / "served"
    served.mkdir()
    with tarfile.open(served / "flower_photos.tgz", "w:gz") as tar:
        tar.add(src, arcname="flower_photos")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/flower_photos.tgz"
    server.shutdown()
    server.server_close()


def test_download_extracts_and_normalises_class_folders(archive_server, tmp_path, capsys):
    dest = tmp_path / "data" / "flowers"
    assert commands.data(["download", "--dest", str(dest), "--url", archive_server]) == 0
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(CLASSES)
    assert len(list((dest / "rose").glob("*.jpg"))) == 3
    assert "rose 3" in capsys.readouterr().out
    # A second call finds the folder and does not download again.
    assert data.download_flowers(dest, url="http://127.0.0.1:9/unreachable.tgz") == dest.absolute()


def test_download_failure_says_what_to_do(tmp_path, capsys):
    dest = tmp_path / "flowers"
    assert commands.data(["download", "--dest", str(dest), "--url", "http://127.0.0.1:9/flower_photos.tgz"]) == 2
    err = capsys.readouterr().err
    assert "download of http://127.0.0.1:9/flower_photos.tgz failed" in err and "--data" in err
