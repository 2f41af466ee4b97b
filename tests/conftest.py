"""Shared fixtures: real photos (the 60 committed under tests/data, and the full development set when it
is there), synthetic image folders, and tiny random-init exported models (convnextv2_atto / open_clip
ViT-S-32) that train and load in seconds.

`require(ok, why)` is how a test says it needs something the machine may lack (the full photo set, a
browser, a compiler): a one-line skip on a user's machine, a failure under CI=true, where a skipped test
would let the run pass without testing the product."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.payload import make_payload
from flowers_fastai import cli as commands

ROOT = Path(__file__).resolve().parents[1]

REAL_PHOTOS = ROOT / "tests" / "data" / "flowers"  # 12 real photos per class, committed (tests/data/README.md)
# The full photo set (3451 photos), only for the tests that need hundreds of photos per class: wherever
# FLOWERS128_DIR points (.ci/run sets it), never a guessed path.
FLOWERS128_DIR = os.environ.get("FLOWERS128_DIR", "")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TINY_CNN, TINY_CLIP, TINY_SIZE = "convnextv2_atto", "ViT-S-32", 64


def require(ok: bool, why: str) -> None:
    """Skip the test with `why` on a user's machine; fail it under CI=true, which must test everything."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a prerequisite is missing: {why}", pytrace=False)
    pytest.skip(why)


def thread_cpus_after(code: str) -> tuple[list[int], dict[str, list[int]]]:
    """Run `code` in a fresh interpreter and return the CPUs the process could use before it ran, and the CPUs
    each of its live threads may use after it ({tid: cpus}, from /proc/self/task): a fresh process, so that
    nothing an earlier test did to its threads counts. Linux only (sched_getaffinity)."""
    script = "import os, json\nstart = sorted(os.sched_getaffinity(0))\n" + textwrap.dedent(code) + textwrap.dedent("""
        threads = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                threads[tid] = sorted(os.sched_getaffinity(int(tid)))
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
        print(json.dumps([start, threads]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    start, threads = json.loads(done.stdout.strip().splitlines()[-1])
    return start, threads


# What only writes a model: onnx and onnxscript (torch's ONNX exporter), ONNX Runtime's quantiser, Inductor's
# compiler and packager, the trainer. Loading a model and predicting with it, any backend, imports none of them.
# (Not torch._inductor.cpp_builder: torch._dynamo imports it, and timm imports torch._dynamo.)
BUILDER_MODULES = ("onnx", "onnxscript", "onnxruntime.quantization", "torch.onnx._internal.exporter._core",
                   "torch._inductor.compile_fx", "torch._inductor.codecache", "torch._inductor.package",
                   "flowers_fastai", "fastai")
# What downloads a model from the Hub (flowers_classifier.hub, for an "hf-hub:" id only): serving a local file or
# folder never imports it. (timm imports huggingface_hub itself, but not its download code.)
DOWNLOAD_MODULES = ("huggingface_hub._snapshot_download",)


def builders_imported_by_serving(models: list[Path], photo: Path, python: str | Path = sys.executable,
                                 **run_kwargs) -> list[str]:
    """Load each model file with `load_model`'s defaults and predict `photo` with it, all in one fresh
    interpreter (`python`, run with `run_kwargs`); return the BUILDER_MODULES and DOWNLOAD_MODULES (and their
    submodules) it imported."""
    script = textwrap.dedent("""
        import json, sys
        import flowers_classifier as fc
        *models, photo = sys.argv[1:]
        for path in models:
            assert fc.predict(fc.load_model(path), photo) in fc.CLASSES, path
        print(json.dumps(sorted(n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in BUILDERS))))
    """).replace("BUILDERS", repr(BUILDER_MODULES + DOWNLOAD_MODULES))
    run_kwargs = {"cwd": ROOT, **run_kwargs}
    done = subprocess.run([str(python), "-c", script, *map(str, models), str(photo)], capture_output=True, text=True,
                          timeout=600, **run_kwargs)
    assert done.returncode == 0, f"loading and predicting with {models} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def real_flowers() -> Path:
    """The committed <class>/<photos> folder: 12 real photos per class, one photo filed under both rose and
    tulip (a conflicting duplicate, as in the full set) and one same-class duplicate pair."""
    return REAL_PHOTOS


@pytest.fixture(scope="session")
def flowers128() -> Path:
    """The full photo set, for tests that need hundreds of photos per class."""
    require(bool(FLOWERS128_DIR), "needs the full 128 px photo set (one folder per class): set FLOWERS128_DIR")
    photos = Path(FLOWERS128_DIR)
    require(all((photos / c).is_dir() for c in CLASSES),
            f"FLOWERS128_DIR={FLOWERS128_DIR} is not the photo set: it has no folder per class ({', '.join(CLASSES)})")
    return photos


@pytest.fixture(scope="session")
def real_photos(real_flowers) -> dict[str, list[Path]]:
    """A few real photos per class, sorted for repeatability."""
    return {c: sorted((real_flowers / c).glob("*.jpg"))[:5] for c in CLASSES}


def make_image_folder(root: Path, per_class: int = 6, size: int = 48, seed: int = 0) -> Path:
    """<root>/<class>/<n>.jpg with a different dominant colour per class (learnable, tiny)."""
    rng = np.random.default_rng(seed)
    for i, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        base = np.array([(i * 50) % 256, (255 - i * 40) % 256, (i * 90) % 256], dtype=np.float64)
        for n in range(per_class):
            noise = rng.normal(0, 25, size=(size, size, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / label / f"{n}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def tiny_cnn_payload_file(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = factory.create_cnn(TINY_CNN)
    prep = factory.cnn_preprocess(net, TINY_SIZE)
    spec = dict(family="cnn", model_name=TINY_CNN, classes=list(CLASSES), **prep.to_dict())
    torch.save(make_payload(spec, net.state_dict()), path)
    return path


def tiny_clip_payload_file(path: Path, seed: int = 0, half: bool = True) -> Path:
    torch.manual_seed(seed)
    net = factory.create_clip(TINY_CLIP, image_size=TINY_SIZE)
    prep = factory.clip_preprocess(net)
    spec = dict(family="clip", model_name=TINY_CLIP, classes=list(CLASSES), quick_gelu=False, **prep.to_dict())
    torch.save(make_payload(spec, net.state_dict(), half=half), path)
    return path


@pytest.fixture(scope="session")
def tiny_cnn_pth(tmp_path_factory) -> Path:
    """A random-init convnextv2_atto payload at 64 px, as export.py writes it."""
    return tiny_cnn_payload_file(tmp_path_factory.mktemp("tiny") / "cnn_flowers.pth")


@pytest.fixture(scope="session")
def tiny_vit_pth(tmp_path_factory) -> Path:
    """A random-init open_clip ViT-S-32 payload at 64 px, fp16 storage like a real CLIP export."""
    return tiny_clip_payload_file(tmp_path_factory.mktemp("tiny") / "vit_flowers.pth")


EXPORT_STDERR: dict = {}  # what export.py printed to stderr while packaged_cnn compiled, by .pth path


@pytest.fixture(scope="session")
def packaged_cnn(tiny_cnn_pth, tmp_path_factory) -> Path:
    """A copy of the tiny CNN payload with its CPU package beside it, written through export.py's CLI: compiled
    once per test run (minutes), shared by test_cpu_package.py and test_backends.py."""
    import contextlib
    import io
    import shutil

    require(shutil.which("g++") is not None or shutil.which("c++") is not None,
            "compiling a CPU package needs a C++ compiler (apt-get install g++)")
    pth = tmp_path_factory.mktemp("pkg") / "cnn_flowers.pth"
    shutil.copy(tiny_cnn_pth, pth)
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(io.StringIO()) as err:
        # an empty Inductor cache: a real first compile, as on a user's machine (its autotuning included)
        env.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))
        assert commands.export([str(pth), "--cpu-package"]) == 0
    EXPORT_STDERR[pth] = err.getvalue()
    return pth



@pytest.fixture(scope="session")
def finished_run(real_flowers, tmp_path_factory) -> Path:
    """A finished train.py run folder with a test split (its evaluation, eval_metrics.json, covers valid and test):
    convnextv2_atto from random init, one epoch at 32 px on the committed photos (seconds). Nothing exported."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert commands.train(["--arch", "cnn", "--model", TINY_CNN, "--no-pretrained", "--data", str(real_flowers),
                           "--img-size", "32", "--epochs", "1", "--bs", "16", "--patience", "0", "--test-pct", "0.2",
                           "--out", str(run_dir), "--no-export"]) == 0
    return run_dir


RAY_CPUS = 4  # logical CPUs of the test Ray's head node: two 1-CPU replicas and Ray Data's tasks fit on 2 cores


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every test that needs it (serving, Ray Data), started once (seconds): a
    `ray.cluster_utils.Cluster` head node this process is connected to, so that a test can add a worker node and
    remove it. Its workers import this checkout (PYTHONPATH), not another copy installed in the venv."""
    import importlib.util
    require(importlib.util.find_spec("ray") is not None, "needs Ray: pip install -e '.[serve]'")
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cluster = Cluster(initialize_head=True, connect=True,
                          head_node_args=dict(num_cpus=RAY_CPUS, include_dashboard=False,
                                              object_store_memory=256 * 2**20))
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
