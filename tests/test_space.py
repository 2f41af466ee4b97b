"""The Gradio Space (`export.py RUN|MODEL.pth --space DIR`, flowers_fastai/space.py): its README's Space YAML
(huggingface_hub.SpaceCard), the pinned requirements without fastai, the vendored runtime and demo, the example
photos; and the Space itself: a fresh virtual environment where pip installs exactly DIR/requirements.txt offline
from local wheels, then `python app.py` inside DIR serves, and gradio_client gets the label fc.predict gives.

The local wheels are made from this environment's own installed distributions (their files, as the wheels they
were installed from held them), so the test needs no network and no download cache on a CI machine; torch and the
CUDA libraries it pulls in (gigabytes: copying them would take minutes) are linked into the venv first, as a base
image would have them, and pip must find them satisfying the file's torch pin (tests/test_wheelhouse.py's "PyTorch
box"). pip resolves and installs everything else itself."""

from __future__ import annotations

import base64
import csv
import filecmp
import hashlib
import importlib.metadata as md
import importlib.util
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from huggingface_hub import SpaceCard
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_layers import clean_env, dependency_closure, installed_distributions, linked_venv, run

import flowers_classifier as fc
from flowers_fastai import cli as commands
from flowers_fastai.space import APP_FILE, EXAMPLES_DIR, MODEL_DIR, REQUIREMENTS_FILE, VENDORED

REPO_ID = "acme/flowers-atto"
BASE = ("torch", "pip")  # linked, not installed: torch's closure is gigabytes (see the module docstring)
NOT_IN_A_SPACE = ("fastai", "fastcore", "flowers-fastai", "accelerate")  # the trainer's
DIST_INFO_WRITTEN_BY_INSTALLERS = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


@pytest.fixture(scope="module")
def space(finished_run, tmp_path_factory) -> Path:
    """The Space of the finished run: examples from its test split, the card naming REPO_ID."""
    out = tmp_path_factory.mktemp("space") / "space"
    assert commands.export([str(finished_run), "--space", str(out), "--repo-id", REPO_ID]) == 0
    return out


def pinned(space: Path) -> dict[str, str]:
    """requirements.txt: canonical name -> the version it pins (every line pins one)."""
    reqs = [Requirement(line) for line in (space / REQUIREMENTS_FILE).read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs), reqs
    return {canonicalize_name(r.name): next(iter(r.specifier)).version for r in reqs}


def test_space_card_requirements_code_and_examples(space, finished_run):
    card = SpaceCard.load(space / "README.md").data
    assert (card.sdk, card.sdk_version, card.app_file) == ("gradio", md.version("gradio"), APP_FILE)
    assert card.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert card.license == "other" and card.title and card.models == [REPO_ID]
    # the runtime's and the demo's requirements, at the versions installed here; nothing of the trainer
    pins = pinned(space)
    runtime = [Requirement(r) for r in md.requires("flowers-fastai")]
    wanted = {canonicalize_name(r.name) for r in runtime if r.marker is None or r.marker.evaluate({"extra": "demo"})}
    assert set(pins) == wanted and {"torch", "timm", "safetensors", "gradio"} <= wanted
    assert all(pins[name] == md.version(name) for name in pins)
    assert pins["gradio"] == card.sdk_version
    assert not set(pins) & {canonicalize_name(n) for n in NOT_IN_A_SPACE}
    # the runtime and the demo, copied as they are here; the trainer not at all
    for name in VENDORED:
        source = Path(importlib.util.find_spec(name).origin).parent
        copied = sorted(p.relative_to(space / name) for p in (space / name).rglob("*.py"))
        assert copied == sorted(p.relative_to(source) for p in source.rglob("*.py") if "__pycache__" not in p.parts)
        assert all(filecmp.cmp(source / p, space / name / p, shallow=False) for p in copied)
    assert not (space / "flowers_fastai").exists()
    # one example photo per class, from the run's test split: photos the model never trained on
    with open(finished_run / "split.csv") as f:
        test_photos = {Path(row["path"]).name for row in csv.DictReader(f) if row["split"] == "test"}
    examples = sorted((space / EXAMPLES_DIR).iterdir())
    assert len(examples) == len(fc.CLASSES) and all(p.name[3:] in test_photos for p in examples)
    app = (space / APP_FILE).read_text()
    assert "GRADIO_SERVER_NAME" in app and "GRADIO_SERVER_PORT" in app and '"7860"' in app
    assert sorted(p.name for p in (space / MODEL_DIR).iterdir()) == ["config.json", "model.safetensors"]


def test_examples_flag(tiny_cnn_pth, real_flowers, tmp_path, capsys):
    direct = tmp_path / "photos"
    (direct / "more").mkdir(parents=True)
    rose = sorted((real_flowers / "rose").glob("*.jpg"))
    for photo in rose[:2]:
        (direct / photo.name).write_bytes(photo.read_bytes())
    (direct / "more" / rose[2].name).write_bytes(rose[2].read_bytes())
    assert commands.export([str(tiny_cnn_pth), "--space", str(tmp_path / "s"), "--examples", str(direct)]) == 0
    assert sorted(p.name[3:] for p in (tmp_path / "s" / EXAMPLES_DIR).iterdir()) == sorted(p.name for p in rose[:3])
    (tmp_path / "empty").mkdir()
    assert commands.export([str(tiny_cnn_pth), "--space", str(tmp_path / "t"), "--examples",
                            str(tmp_path / "empty")]) == 2
    assert f"--examples {tmp_path / 'empty'}: no photos" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # refused before anything was written


# --------------------------------------------------------------------------- the Space, installed and running

def wheel_of(dist: md.Distribution, site: Path, dest: Path) -> Path:
    """The wheel `dist` was installed from, rebuilt from its installed files (its RECORD): the same files and
    metadata, a fresh RECORD; scripts (outside site-packages) are left to pip, which writes them from
    entry_points.txt."""
    info = Path(dist._path).name  # NAME-VERSION.dist-info
    tags = [line.split(":", 1)[1].strip() for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag:")]
    py, abi, platform = (".".join(dict.fromkeys(t.split("-")[i] for t in tags)) for i in range(3))
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    path = dest / f"{name}-{dist.version}-{py}-{abi}-{platform}.whl"
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for file in dist.files:
            if file.parts[0] == ".." or "__pycache__" in file.parts or \
                    (file.parts[0] == info and file.name in DIST_INFO_WRITTEN_BY_INSTALLERS):
                continue
            data = (site / file).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            wheel.writestr(file.as_posix(), data)
            record.append(f"{file.as_posix()},sha256={digest},{len(data)}")
        wheel.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, port: int, deadline_s: float = 300) -> None:
    """Until something listens on `port` (the app prints its URL after); fails with the app's output if it exits."""
    end = time.monotonic() + deadline_s  # a hang guard, not a speed check
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{proc.stdout.read()[-4000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not listen on port {port} within {deadline_s} s")


@pytest.mark.slow
def test_space_installs_offline_from_its_requirements_and_predicts(space, finished_run, real_photos, tmp_path):
    site = Path(sysconfig.get_paths()["purelib"])
    every = installed_distributions(site)
    required = dependency_closure([f"{n}=={v}" for n, v in pinned(space).items()], every)
    base = dependency_closure(list(BASE), every)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, dist in required.items():
        if name not in base:
            wheel_of(dist, site, wheels)

    venv = tmp_path / "venv"
    python, new_site = linked_venv(venv, base, every, site)
    # The linked distributions are .venv's files: pip must never replace (uninstall through the links) one.
    constraints = tmp_path / "base.txt"
    constraints.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in base.values()))
    in_venv = dict(env=clean_env(), cwd=tmp_path)  # PIP_CONFIG_FILE=/dev/null: no index but --find-links
    run([python, "-m", "pip", "install", "--no-index", "--find-links", wheels, "-c", constraints, "--no-compile",
         "-q", "-r", space / REQUIREMENTS_FILE], "pip install -r requirements.txt, offline", **in_venv)
    run([python, "-m", "pip", "check"], "pip check in the Space's venv", **in_venv)
    installed = {canonicalize_name(d.metadata["Name"]) for d in md.distributions(path=[str(new_site)])}
    assert installed == set(required) | set(base), f"pip installed {sorted(installed - set(required) - set(base))}"
    assert not installed & {canonicalize_name(n) for n in NOT_IN_A_SPACE}

    port, photo = free_port(), real_photos["rose"][0]
    app = subprocess.Popen([python, APP_FILE], cwd=space, env=clean_env(GRADIO_SERVER_NAME="127.0.0.1",
                           GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(app, port)
        result, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(handle_file(str(photo)), "CNN", False,
                                                                            api_name="/predict")
    finally:
        app.terminate()
        app.wait(30)
    model = fc.load_model(space / MODEL_DIR)
    assert result["label"] == fc.predict(model, photo)
    served = {c["label"]: c["confidence"] for c in result["confidences"]}
    assert served == pytest.approx(fc.predict_proba(model, photo), abs=1e-6)
    code = "import importlib.util as u, sys; print(*(m for m in sys.argv[1:] if u.find_spec(m)))"
    imported = run([python, "-c", code, "fastai", "flowers_fastai"], "looking for the trainer in the Space",
                   env=clean_env(), cwd=space)
    assert not imported.stdout.split(), f"the Space can import {imported.stdout}"
