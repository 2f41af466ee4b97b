"""The offline wheelhouse (flowers_fastai/wheelhouse.py): its option checks and closure logic without a network,
and one real run: a wheelhouse for this interpreter, less what a "PyTorch box" has, installed with
`pip install --no-index` into a fresh venv that has only that box's distributions (symlinked from .venv, as
tests/test_layers.py does for the runtime), where flowers-train trains an epoch and the export predicts."""

from __future__ import annotations

import importlib.metadata as md
import socket
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, TINY_CNN, require
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_layers import clean_env, dependency_closure, installed_distributions, linked_venv, run

from flowers_classifier.classes import CLASSES
from flowers_fastai import cli as commands
from flowers_fastai import wheelhouse as wh
from flowers_fastai.wheelhouse import Exclusion, Wheel, WheelhouseError

# ---------------------------------------------------------------------------------------------------------
# Options: each error names its flag.


def test_exclude_parses_names_versions_and_patterns():
    found = wh.parse_excludes(" torch==2.11.0+cu128, Torch_Vision ,nvidia-*,")
    assert found == [Exclusion("torch", "2.11.0"), Exclusion("torch-vision"), Exclusion("nvidia-*")]
    assert found[2].is_pattern and not found[0].is_pattern
    assert wh.parse_excludes("") == []


@pytest.mark.parametrize("value, says", [("torch>=2", "name==version"), ("torch==", "name==version"),
                                         ("torch==abc", "not a version"), ("nvidia-*==1.0", "pattern"),
                                         ("flowers_fastai", "cannot leave it out")])
def test_exclude_errors_name_the_flag(value, says):
    with pytest.raises(WheelhouseError, match="--exclude") as e:
        wh.parse_excludes(value)
    assert says in str(e.value)


def test_extras_must_be_the_projects():
    assert wh.parse_extras("train, demo", ["train", "demo", "onnx"]) == ["train", "demo"]
    assert wh.parse_extras("", ["train"]) == []
    with pytest.raises(WheelhouseError, match=r"--extras 'train,gpu': no extra named gpu; .* train, demo"):
        wh.parse_extras("train,gpu", ["train", "demo"])


@pytest.mark.parametrize("value", ["3.12.1", "312", "python3.12", "2.7", "3.9"])
def test_python_version_errors_name_the_flag(value):
    with pytest.raises(WheelhouseError, match="--python-version"):
        wh.check_python_version(value)


def test_manylinux_platform_brings_the_older_tags_pip_would_not_add():
    tags = wh.expand_platforms(["manylinux_2_28_x86_64"])
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
            "manylinux_2_5_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and not any("aarch64" in t for t in tags)
    assert set(wh.expand_platforms(["manylinux2014_aarch64"])) >= {"manylinux_2_17_aarch64", "manylinux1_aarch64"}
    assert wh.expand_platforms(["win_amd64", "win_amd64"]) == ["win_amd64"]
    with pytest.raises(WheelhouseError, match="--platform 'manylinux 2_28'"):
        wh.expand_platforms(["manylinux 2_28"])


def test_target_environment_is_the_targets_not_this_interpreters():
    env = wh.target_environment("3.12", ["manylinux_2_28_aarch64"])
    assert (env["python_version"], env["python_full_version"], env["sys_platform"], env["platform_machine"]) == \
        ("3.12", "3.12.0", "linux", "aarch64")
    assert wh.target_environment("3.12", ["win_amd64"])["platform_system"] == "Windows"
    here = wh.target_environment(None, [])
    assert here["python_version"] == sysconfig.get_python_version()
    with pytest.raises(WheelhouseError, match="--platform manylinux_2_28_x86_64 win_amd64: .*different systems"):
        wh.target_environment("3.12", ["manylinux_2_28_x86_64", "win_amd64"])
    with pytest.raises(WheelhouseError, match="--platform solaris_sparc: unknown"):
        wh.target_environment("3.12", ["solaris_sparc"])


def test_bad_options_stop_before_any_download(tmp_path, capsys):
    assert commands.wheelhouse([str(tmp_path / "wh"), "--extras", "gpu"]) == 2
    assert "--extras 'gpu'" in capsys.readouterr().err
    assert commands.wheelhouse([str(tmp_path / "wh"), "--python-version", "3.12.1"]) == 2
    assert "--python-version '3.12.1'" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.whl").touch()
    assert commands.wheelhouse([str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert not (tmp_path / "wh").exists()


# ---------------------------------------------------------------------------------------------------------
# Exclusion and the closure, on made-up wheels.


def test_cuda_wheels_are_always_excluded():
    none = wh.parse_excludes("")
    for name in ("nvidia-cudnn-cu13", "nvidia_nccl_cu12", "triton", "cuda-bindings", "pytorch-triton-rocm"):
        assert wh.is_excluded(name, none), name
    assert not wh.is_excluded("torch", none) and not wh.is_excluded("numpy", none)
    default = [Exclusion(n) for n in wh.DEFAULT_EXCLUDE]
    assert wh.is_excluded("Torch", default) and wh.is_excluded("torchvision", default)
    assert not wh.is_excluded("torchmetrics", default) and not wh.is_excluded("fastai", default)


def fake_wheel(spec: str, *requires: str) -> Wheel:
    name, version = spec.split("==")
    return Wheel(Path(f"{name}-{version}-py3-none-any.whl"), name, version, [Requirement(r) for r in requires])


def fake_index() -> dict[str, Wheel]:
    wheels = [fake_wheel("flowers-fastai==1.0", "torch>=2.4", "timm", 'fastai; extra == "train"',
                         'gradio; extra == "demo"'),
              fake_wheel("torch==2.11.0", "filelock", "sympy", 'nvidia-cudnn-cu13; platform_system == "Linux"'),
              fake_wheel("timm==1.0", "torch", "huggingface-hub"),
              fake_wheel("huggingface-hub==1.0", "filelock", 'tomli; python_version < "3.12"'),
              fake_wheel("fastai==2.8", "fastcore>=2", "torch<3"),
              fake_wheel("fastcore==2.2"), fake_wheel("filelock==3.0"), fake_wheel("sympy==1.0"),
              fake_wheel("nvidia-cudnn-cu13==9.0"), fake_wheel("tomli==2.0"), fake_wheel("gradio==6.0")]
    return {w.name: w for w in wheels}


def test_closure_leaves_out_the_excluded_and_what_only_they_need():
    roots = [(Requirement("flowers-fastai[train]"), "the wheelhouse")]
    env = wh.target_environment("3.12", ["manylinux_2_28_x86_64"])
    kept, unmet = wh.closure(roots, fake_index(), [Exclusion("torch")], env)
    assert not unmet
    # sympy and the CUDA wheel only torch needs: out; filelock, which huggingface-hub needs too: in; tomli only
    # for Python < 3.12 and gradio only for [demo]: out.
    assert sorted(kept) == ["fastai", "fastcore", "filelock", "flowers-fastai", "huggingface-hub", "timm"]
    assert kept["filelock"].required_by == ["huggingface-hub"]
    assert kept["fastai"].required_by == ["flowers-fastai[train]"]
    kept311, _ = wh.closure(roots, fake_index(), [Exclusion("torch")], wh.target_environment("3.11", []))
    assert "tomli" in kept311


def test_closure_reports_what_no_wheel_satisfies():
    index = fake_index()
    index["fastcore"] = fake_wheel("fastcore==1.0")
    del index["huggingface-hub"]
    kept, unmet = wh.closure([(Requirement("flowers-fastai[train]"), "x")], index, [Exclusion("torch")],
                             wh.target_environment("3.12", []))
    assert sorted((r.name, by) for r, by in unmet) == [("fastcore", "fastai"), ("huggingface-hub", "timm")]
    # A requirement only the target's markers ask for (pip ran under another Python): unmet, and resolved
    # again as a plain root.
    index = fake_index()
    index["fastai"] = fake_wheel("fastai==2.8", 'exceptiongroup[x]>=1; python_version >= "3.12"')
    _, unmet = wh.closure([(Requirement("flowers-fastai[train]"), "x")], index, [Exclusion("torch")],
                          wh.target_environment("3.12", []))
    assert [(str(wh.without_marker(r)), by) for r, by in unmet] == [("exceptiongroup[x]>=1", "fastai")]


def test_stub_wheel_has_no_dependencies_and_sorts_above_real_builds(tmp_path):
    stub = wh.read_wheel(wh.make_stub("torch", "2.11.0", tmp_path))
    assert (stub.name, stub.requires, stub.is_stub) == ("torch", [], True)
    assert Requirement("torch>=2.4,<2.12").specifier.contains(stub.version)
    assert Requirement("torch==2.11.0").specifier.contains(stub.version)
    from packaging.version import Version
    assert Version(stub.version) > Version("2.11.0+cu130") > Version("2.11.0")
    with zipfile.ZipFile(stub.path) as zf:
        assert sorted(zf.namelist()) == [f"torch-2.11.0+{wh.STUB_LABEL}.dist-info/{f}" for f in
                                         ("METADATA", "RECORD", "WHEEL")]


# ---------------------------------------------------------------------------------------------------------
# The real thing: build, install offline in a fresh "PyTorch box", train, predict.

# What the target GPU server has (besides Python; scipy comes with scikit-learn): the wheelhouse leaves these
# out, the test venv links them.
PYTORCH_BOX = ("torch", "torchvision", "timm", "accelerate", "pandas", "matplotlib", "scikit-learn", "scipy",
               "numpy", "pillow")
# Only with --extras demo / tensorboard: a training wheelhouse must not carry them.
NOT_FOR_TRAINING = ("gradio", "tensorboard", "grpcio", "protobuf")


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def pytorch_box_wheelhouse(tmp_path_factory) -> Path:
    """`python -m flowers_fastai.wheelhouse` for this interpreter, less the PYTORCH_BOX distributions at the
    versions .venv has (the way a user names what their server has)."""
    require(pypi_reachable(), "needs PyPI (pypi.org:443 unreachable) to download the wheelhouse")
    out = tmp_path_factory.mktemp("wheelhouse") / "wh"
    pins = ",".join(f"{name}=={md.version(name)}" for name in PYTORCH_BOX)
    proc = run([sys.executable, "-m", "flowers_fastai.wheelhouse", out, "--exclude", pins],
               "building the wheelhouse", cwd=ROOT)
    print(proc.stdout)  # the summary, shown with -s
    return out


@pytest.mark.slow
def test_wheelhouse_holds_the_training_closure_and_nothing_the_box_has(pytorch_box_wheelhouse):
    wheels = {canonicalize_name(p.name.split("-")[0]): p for p in pytorch_box_wheelhouse.glob("*.whl")}
    for name in ("flowers-fastai", "fastai", "fastcore", "fastprogress", "fasttransform", "plum-dispatch",
                 "python-fasthtml", "open-clip-torch", "ftfy", "fastdownload"):
        assert name in wheels, f"{name} missing from the wheelhouse: {sorted(wheels)}"
    unwanted = sorted(n for n in wheels if wh.is_excluded(n, [Exclusion(canonicalize_name(p)) for p in PYTORCH_BOX])
                      or n in NOT_FOR_TRAINING)
    assert not unwanted, f"the wheelhouse carries what the box has, CUDA wheels or non-training extras: {unwanted}"
    manifest = (pytorch_box_wheelhouse / wh.MANIFEST).read_text()
    for path in wheels.values():
        assert path.name in manifest, f"{path.name} is not listed in {wh.MANIFEST}"
    # Nothing of torch was even downloaded to resolve: the stubs stood for it.
    assert "torch" not in next((ln for ln in manifest.splitlines() if "downloaded but not needed" in ln), "")


@pytest.mark.slow
def test_offline_install_on_a_pytorch_box_trains_and_predicts(pytorch_box_wheelhouse, real_flowers, tmp_path):
    site = Path(sysconfig.get_paths()["purelib"])
    every = installed_distributions(site)
    box = dependency_closure([*PYTORCH_BOX, "pip", "setuptools"], every)
    venv = tmp_path / "venv"
    python, _ = linked_venv(venv, box, every, site)
    # The linked distributions are .venv's files: pip must never replace (uninstall through the links) one.
    constraints = tmp_path / "box.txt"
    constraints.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in box.values()))
    in_venv = dict(env=clean_env(), cwd=tmp_path)  # cwd: not the repo, whose packages would shadow the installed
    run([python, "-m", "pip", "install", "--no-index", "--find-links", pytorch_box_wheelhouse, "-c", constraints,
         "-q", "flowers-fastai[train]"], "pip install --no-index from the wheelhouse", **in_venv)
    run([python, "-m", "pip", "check"], "pip check in the PyTorch box venv", **in_venv)

    code = ("import importlib.util as u, sys, flowers_fastai, flowers_classifier, fastai, open_clip, fastprogress; "
            "import flowers_fastai.api, flowers_fastai.train; print(flowers_fastai.__file__); "
            "print('present:', *(m for m in sys.argv[1:] if u.find_spec(m)))")
    lines = run([python, "-c", code, *NOT_FOR_TRAINING], "importing the trainer in the venv", **in_venv).stdout
    package_file, present = lines.splitlines()[-2:]
    present = present.removeprefix("present:").strip()
    assert Path(package_file).resolve().is_relative_to(venv.resolve()), f"flowers_fastai came from {package_file}"
    assert not present, f"the training install brought {present}"

    out = tmp_path / "run"
    run([venv / "bin" / "flowers-train", "--arch", "cnn", "--model", TINY_CNN, "--no-pretrained", "--data",
         real_flowers, "--img-size", "32", "--epochs", "1", "--bs", "16", "--patience", "0", "--out", out,
         "--export", tmp_path / "cnn.pth"], "flowers-train in the PyTorch box venv", **in_venv)
    assert (out / "history.csv").read_text().count("\n") == 2, "expected a header and one trained epoch"
    photo = sorted((real_flowers / "rose").glob("*.jpg"))[0]
    predicted = run([venv / "bin" / "flowers-predict", photo, "--model", tmp_path / "cnn.pth"], "flowers-predict",
                    **in_venv).stdout.split("\t")[1].split()[0]
    assert predicted in CLASSES, predicted

