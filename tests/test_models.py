"""The CNN factory: local weights files, offline failure, the stage splitter, preprocessing stats."""

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY_CNN, make_image_folder
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from flowers_classifier import factory
from flowers_classifier import model as model_modules
from flowers_classifier.classes import CLASSES
from flowers_fastai import cli as commands
from flowers_fastai import pretrained, splitters
from flowers_fastai import train as train_module


def backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("head.fc")}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_exactly_the_starting_backbone(tmp_path, suffix):
    torch.manual_seed(1)
    source = factory.create_cnn(TINY_CNN, num_classes=1000)  # an ImageNet-style checkpoint
    path = tmp_path / f"backbone{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)  # wrapped, as many trainers save it
    torch.manual_seed(2)
    model = pretrained.create_cnn(TINY_CNN, pretrained=path)
    loaded, expected = backbone(model.state_dict()), backbone(source.state_dict())
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert model.head.fc.out_features == len(CLASSES)


def test_weights_for_another_architecture_are_refused(tmp_path):
    other = factory.create_cnn("convnextv2_femto")
    path = tmp_path / "femto.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(pretrained.WeightsFileError, match="--weights .*femto.safetensors"):
        pretrained.create_cnn(TINY_CNN, pretrained=path)


def test_weights_with_unrelated_keys_are_refused_not_ignored(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(pretrained.WeightsFileError, match="does not match"):
        pretrained.create_cnn(TINY_CNN, pretrained=path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(pretrained.WeightsFileError, match="no such file"):
        pretrained.create_cnn(TINY_CNN, pretrained=tmp_path / "nope.safetensors")


def test_default_tag_prefers_imagenet22k_finetune():
    assert pretrained.cnn_pretrained_tag("convnextv2_tiny") == "fcmae_ft_in22k_in1k"
    assert pretrained.cnn_pretrained_tag("convnextv2_atto") == "fcmae_ft_in1k"  # timm has no 22k atto


def offline_env(tmp_path) -> dict:
    """The hub unreachable (a closed loopback port) and an empty cache: what CI and users offline see."""
    return {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}


def test_hub_weights_offline_fail_fast_naming_both_flags(tmp_path):
    code = ("from flowers_fastai import pretrained\n"
            "try:\n    pretrained.create_cnn('convnextv2_atto', pretrained='hub')\n"
            "except pretrained.PretrainedWeightsUnavailable as e:\n    print('REFUSED', e)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=offline_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert "REFUSED" in out.stdout and "--weights" in out.stdout and "--no-pretrained" in out.stdout


def test_train_cli_offline_default_fails_within_60s(tmp_path):
    data = make_image_folder(tmp_path / "imgs", per_class=3)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "train.py", "--arch", "cnn", "--model", TINY_CNN, "--data", str(data),
                          "--out", str(tmp_path / "run"), "--no-export"],
                         cwd=ROOT, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    assert out.returncode == 2
    assert "--weights" in out.stderr and "--no-pretrained" in out.stderr
    assert not (tmp_path / "run" / "best.pth").exists()


@pytest.fixture
def scan_calls(monkeypatch) -> list:
    """train.prepare_split, recorded and refused: a test sees whether the data scan was reached."""
    calls = []

    def record(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the data scan ran before the weights were checked")
    monkeypatch.setattr(train_module, "prepare_split", record)
    return calls


def test_cnn_offline_weights_error_comes_before_the_data_scan(tmp_path, monkeypatch, scan_calls, capsys):
    # In-process twin of offline_env: the hub on a closed loopback port, an empty cache.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    data = make_image_folder(tmp_path / "imgs", per_class=2)
    rc = commands.train(["--model", TINY_CNN, "--data", str(data), "--out", str(tmp_path / "run"), "--no-export"])
    err = capsys.readouterr().err
    assert rc == 2 and "--weights" in err and "--no-pretrained" in err and TINY_CNN in err
    assert scan_calls == []


@pytest.mark.parametrize("model, message", [(TINY_CNN, "--weights .*nope.pth: no such file"),
                                            ("convnextv2_nope", "--model convnextv2_nope: not a timm model")])
def test_cnn_bad_weights_or_model_fail_before_the_data_scan(tmp_path, scan_calls, capsys, model, message):
    rc = commands.train(["--model", model, "--weights", str(tmp_path / "nope.pth"), "--data", str(tmp_path),
                            "--out", str(tmp_path / "run"), "--no-export"])
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    assert scan_calls == []


def test_stage_splitter_covers_every_parameter_once():
    model = factory.create_cnn(TINY_CNN)
    groups = splitters.param_groups(model)
    assert len(groups) == 1 + len(model.stages) + 1  # stem, stages, head
    ids = [id(p) for g in groups for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in model.head.parameters()} <= {id(p) for p in groups[-1]}


def test_cnn_preprocess_uses_the_backbone_stats():
    prep = factory.cnn_preprocess(factory.create_cnn(TINY_CNN), image_size=96)
    assert prep.image_size == 96 and prep.mean == (0.485, 0.456, 0.406) and prep.interpolation == "bicubic"


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_grn_is_timms_grn_forward_and_backward(channels_last):
    from timm.layers.grn import GlobalResponseNorm
    torch.manual_seed(0)
    ref = GlobalResponseNorm(16, channels_last=channels_last)
    with torch.no_grad():  # timm initialises weight = bias = 0, where GRN is the identity: test it as trained
        ref.weight.normal_()
        ref.bias.normal_()
    fast = model_modules.use_fast_grn(torch.nn.Sequential(ref)).eval()[0]
    assert type(fast) is model_modules.FastGlobalResponseNorm and fast is ref  # swapped in place, same parameters
    slow = GlobalResponseNorm(16, channels_last=channels_last)
    slow.load_state_dict(fast.state_dict())
    shape = (2, 5, 7, 16) if channels_last else (2, 16, 5, 7)
    x = torch.randn(shape, requires_grad=True)
    out_fast, out_slow = fast(x), slow(x)
    torch.testing.assert_close(out_fast, out_slow, rtol=1e-5, atol=1e-5)
    grads_fast = torch.autograd.grad(out_fast.square().sum(), [x, fast.weight, fast.bias])
    grads_slow = torch.autograd.grad(out_slow.square().sum(), [x, slow.weight, slow.bias])
    for a, b in zip(grads_fast, grads_slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_cnn_factory_uses_fast_grn_unless_asked_not_to():
    kinds = lambda net: {type(m).__name__ for m in net.modules() if type(m).__name__.endswith("GlobalResponseNorm")}  # noqa: E731
    assert kinds(factory.create_cnn(TINY_CNN)) == {"FastGlobalResponseNorm"}
    assert kinds(factory.create_cnn(TINY_CNN, fast_grn=False)) == {"GlobalResponseNorm"}


def test_a_builder_that_fails_on_the_meta_device_is_built_for_real(tiny_cnn_pth, monkeypatch):
    """The meta-device build is a shortcut: any failure of it (not only NotImplementedError) falls back to the
    real build, and the model serves the file's weights instead of being called a misfit."""
    import flowers_classifier as fc
    from flowers_classifier import inference
    build = inference.build_from_spec

    def meta_shy(spec, *args, **kwargs):
        if torch.empty(0).is_meta:  # under `with torch.device("meta")`
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return build(spec, *args, **kwargs)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = fc.load_model(tiny_cnn_pth, device="cpu").probabilities(x)
    monkeypatch.setattr(inference, "build_from_spec", meta_shy)
    assert torch.allclose(fc.load_model(tiny_cnn_pth, device="cpu").probabilities(x), expected)


def test_an_architecture_that_cannot_be_built_is_not_called_a_weights_misfit(tiny_cnn_pth, monkeypatch):
    import flowers_classifier as fc
    from flowers_classifier import inference

    def unknown(spec, *args, **kwargs):
        raise ValueError(f"--model {spec['model_name']}: not a timm model name")
    monkeypatch.setattr(inference, "build_from_spec", unknown)
    with pytest.raises(fc.ModelFileError, match="cnn_flowers.pth: cannot build 'convnextv2_atto'.*not a timm model") \
            as error:
        fc.load_model(tiny_cnn_pth, device="cpu")
    assert "do not fit" not in str(error.value)
