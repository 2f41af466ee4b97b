"""Declared versions are versions that run: pyproject.toml's ranges admit this venv's packages (what CI tests)
and the torch of the offline GPU server (the wheelhouse command of docs/offline.md); torch's floor and the
Dockerfile's base image are one of those two, not an older release that nothing here runs."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from flowers_fastai import wheelhouse as wh

ROOT = Path(__file__).resolve().parents[1]
TESTED = ("torch", "torchvision", "timm", "open-clip-torch", "fastai", "gradio", "gradio-client")


def declared() -> dict[str, Requirement]:
    """Every requirement of the project and its extras, by canonical name (the extras' self-reference left out)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    reqs = (Requirement(r) for r in lines)
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != wh.PROJECT}


def floor(req: Requirement) -> Version:
    (low,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return low


def docker_torch() -> Version:
    """The torch of the Dockerfile's base image, from its tag (pytorch/pytorch:<torch>-cuda<X.Y>-cudnn<N>-...)."""
    found = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-\w+\s*$",
                      (ROOT / "Dockerfile").read_text(), re.M)
    assert found, "Dockerfile: no 'FROM pytorch/pytorch:<torch>-cuda<X.Y>-cudnn<N>-runtime' line"
    return Version(found[1])


def gpu_server_torch() -> Version:
    """The torch the wheelhouse command of docs/offline.md names for the offline GPU server (--exclude torch==X)."""
    found = re.search(r"--exclude torch==(\d+\.\d+\.\d+)", (ROOT / "docs" / "offline.md").read_text())
    assert found, "docs/offline.md: no wheelhouse command with --exclude torch==X"
    return Version(found[1])


def installed(name: str) -> Version:
    return Version(Version(md.version(name)).public)  # 2.14.1+cu130 -> 2.14.1


@pytest.mark.parametrize("name", TESTED)
def test_the_venvs_packages_are_within_the_declared_ranges(name):
    req = declared()[name]
    assert req.specifier.contains(installed(name)), f"pyproject.toml: {req} excludes the tested {installed(name)}"


def test_torch_range_admits_the_docker_image_and_the_gpu_server(tmp_path):
    spec = declared()["torch"].specifier
    assert spec.contains(docker_torch()), f"Dockerfile's base image has torch {docker_torch()}, outside {spec}"
    assert spec.contains(gpu_server_torch()), (f"docs/offline.md's GPU server torch "
                                              f"{gpu_server_torch()} is outside {spec}")
    # The wheelhouse resolves the server's torch as a stub wheel: the project must accept that stub.
    stub = wh.read_wheel(wh.make_stub("torch", str(gpu_server_torch()), tmp_path))
    assert spec.contains(stub.version), f"the wheelhouse's stub torch {stub.version} is outside {spec}"


def test_torch_floor_and_docker_image_are_versions_that_run():
    runs = {installed("torch"), gpu_server_torch()}  # CI's venv, and the GPU server bench/gpu_check.py runs on
    low = floor(declared()["torch"])
    assert low in runs | {Version(f"{v.major}.{v.minor}") for v in runs}, \
        f"pyproject.toml: torch>={low}, but only {', '.join(sorted(map(str, runs)))} run here; raise the floor"
    assert docker_torch() in runs, (f"Dockerfile: the base image's torch {docker_torch()} is not one that runs here "
                                    f"({', '.join(sorted(map(str, runs)))}); pick its pytorch/pytorch tag")


def test_dockerfile_copies_every_package_it_installs():
    """The image installs the project from the files COPY brings in: a package missing there (flowers_apps was
    once) installs nothing and `app.py` fails in the container only."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = set(re.findall(r"^COPY\s+(\w+)/", (ROOT / "Dockerfile").read_text(), re.M))
    assert set(packages) <= copied, f"Dockerfile: no COPY of {sorted(set(packages) - copied)}"
