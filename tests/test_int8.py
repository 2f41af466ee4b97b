"""int8 on the CPU (flowers_classifier.quantize, `export.py --int8`, `load_model(backend="int8")`): the rewrites
before quantisation equal the modules they replace, every Linear but the head is really int8, the int8
probabilities stay close to fp32, and the payload's int8 request travels through export.py and load_model
while the file stays a plain weights_only payload."""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_SIZE, tiny_cnn_payload_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

import flowers_classifier as fc
from flowers_classifier import factory, onnx_model
from flowers_classifier.backends import BackendError
from flowers_classifier.explain import grad_cam, gradient_net
from flowers_classifier.inference import _choose_backend
from flowers_classifier.payload import INT8, QUANTIZE_KEY, ModelFileError
from flowers_classifier.preprocess import preprocess_image
from flowers_classifier.quantize import (
    Conv1x1AsLinear,
    PatchConvAsLinear,
    SelfAttention,
    as_linears,
    int8_layers,
    quantize_int8,
)
from flowers_fastai import onnx_export
from flowers_fastai.cli import export as export_main

# Max abs difference of probabilities, int8 vs fp32, on the tiny random-init models. Measured: ~2e-4 (ViT-S-32)
# and ~2e-3 (convnextv2_atto): weights are rounded to 1/127 of each output channel's range and activations
# to 1/127 of each call's range (7-bit, torch's reduce_range), a ~1% logit error that the softmax of these
# near-uniform random models shrinks further. 0.02 leaves ~10x headroom and still catches a broken layer
# (a wrong weight layout or scale moves probabilities by tenths).
INT8_PROB_TOLERANCE = 0.02


def _photos_batch(real_photos, prep) -> torch.Tensor:
    return torch.stack([preprocess_image(p, prep) for files in real_photos.values() for p in files[:2]])


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_equals_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 64) if batch_first else torch.randn(7, 3, 64)
    mask = torch.randn(7, 7)  # an additive float mask, as open_clip passes one (None for its ViT)
    attn = SelfAttention(mha)
    with torch.inference_mode():
        for m in (None, mask):
            expected = mha(x, x, x, need_weights=False, attn_mask=m)[0]
            got, weights = attn(x, x, x, need_weights=False, attn_mask=m)
            assert weights is None and torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(x, torch.zeros_like(x), x)


def test_the_rewritten_vit_and_convnext_equal_the_originals():
    torch.manual_seed(0)
    vit = factory.create_clip("ViT-S-32", image_size=TINY_SIZE).eval()
    cnn = factory.create_cnn("convnextv2_atto").eval()  # atto builds its MLPs as 1x1 convs
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    for net, kind in ((vit, SelfAttention), (cnn, Conv1x1AsLinear)):
        with torch.inference_mode():
            expected = net(x)
            assert as_linears(net) > 0 and any(isinstance(m, kind) for m in net.modules())
            assert torch.allclose(net(x), expected, atol=1e-5)
            assert not any(isinstance(m, nn.MultiheadAttention) for m in net.modules())
    channels_last = cnn.to(memory_format=torch.channels_last)  # how load_model feeds a ConvNeXt on the CPU
    with torch.inference_mode():
        assert torch.allclose(channels_last(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-5)
    assert not any(isinstance(m, PatchConvAsLinear) for m in cnn.modules())  # only asked for (the CPU package)


@pytest.mark.parametrize("in_channels, kernel, size, bias", [(3, 4, 64, True), (40, 2, 7, True), (3, 14, 30, False)])
def test_a_patchify_convolution_equals_its_linear(in_channels, kernel, size, bias):
    """A stem (4x4/4 on RGB), a downsampling layer (2x2/2, an odd map: the last row and column are dropped, as
    the convolution drops them) and a ViT patch embedding (14x14/14, no bias, 30 px: 2 patches and a rest)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, 24, kernel, stride=kernel, bias=bias).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.inference_mode():
        expected = conv(x)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            got = PatchConvAsLinear(conv)(x.contiguous(memory_format=memory_format))
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    net = nn.Sequential(conv, nn.Conv2d(24, 24, 7, padding=3, groups=24), nn.Conv2d(24, 8, 1))
    assert as_linears(net, patches=True) == 2  # the 7x7 depthwise convolution is no patchify and stays
    assert [type(m) for m in net] == [PatchConvAsLinear, nn.Conv2d, Conv1x1AsLinear]
    with pytest.raises(ValueError, match="kernel equals its stride"):
        PatchConvAsLinear(nn.Conv2d(3, 8, 3, stride=2))


@pytest.mark.parametrize("which", ["vit", "cnn"])
def test_int8_quantises_every_linear_but_the_head_and_stays_close(which, tiny_vit_pth, tiny_cnn_pth, real_photos):
    pth = tiny_vit_pth if which == "vit" else tiny_cnn_pth
    fp32, int8 = fc.load_model(pth, device="cpu"), fc.load_model(pth, device="cpu", backend="int8")
    # What there is to quantise in the network as built: Linear layers (but the head), plus per attention
    # block its qkv and out projections, plus every 1x1 convolution.
    plain = factory.build_from_spec(fc.load_payload(pth))
    expected = (sum(type(m) is nn.Linear for m in plain.modules()) - 1
                + 2 * sum(isinstance(m, nn.MultiheadAttention) for m in plain.modules())
                + sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in plain.modules()))
    assert int8_layers(int8.net) == expected > 20 and int8_layers(fp32.net) == 0
    assert isinstance(int8.net.head if which == "vit" else int8.net.get_classifier(), nn.Module)
    batch = _photos_batch(real_photos, fp32.prep)
    p32, p8 = fp32.probabilities(batch), int8.probabilities(batch)
    assert p8.shape == p32.shape and torch.allclose(p8.sum(-1), torch.ones(len(batch)))
    assert (p8 - p32).abs().max() < INT8_PROB_TOLERANCE
    assert fc.predict(int8, real_photos["rose"][0]) in fc.CLASSES


def test_quantize_int8_leaves_the_head_fp32_and_needs_no_data():
    torch.manual_seed(0)
    net = quantize_int8(factory.create_clip("ViT-S-32", image_size=TINY_SIZE).eval())
    assert type(net.head) is nn.Linear and isinstance(net.visual.transformer.resblocks[0].attn.qkv, DynamicLinear)


def _run_folder(pth, root):
    """A run folder as train.py leaves it: metrics.json (the spec) + best.pth (the weights)."""
    payload = fc.load_payload(pth)
    root.mkdir()
    torch.save(payload["state_dict"], root / "best.pth")
    spec = {k: v for k, v in payload.items() if k not in ("state_dict", "format_version", "dtype")}
    (root / "metrics.json").write_text(json.dumps({"model": spec}))
    return root


def test_export_int8_round_trip(tiny_vit_pth, tmp_path, capsys):
    run = _run_folder(tiny_vit_pth, tmp_path / "run")
    out = tmp_path / "vit_int8.pth"
    assert export_main([str(run), "--int8", "--no-calibrate", "--out", str(out)]) == 0
    assert "served int8 on the CPU" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)  # still a plain payload: no packed int8 params, no pickles
    assert payload[QUANTIZE_KEY] == INT8 and payload["dtype"] == "float16"
    assert all(not t.is_quantized for t in payload["state_dict"].values())
    assert int8_layers(fc.load_model(out, device="cpu").net) > 0  # the file says int8
    assert int8_layers(fc.load_model(out, device="cpu", backend="eager").net) == 0  # the caller overrides it
    assert int8_layers(fc.load_model(tiny_vit_pth, device="cpu", backend="int8").net) > 0  # any file can be int8
    # Without --int8 the key is absent; from an exported .pth, --int8 --out writes a copy asking for int8.
    assert export_main([str(run), "--no-calibrate", "--out", str(tmp_path / "plain.pth")]) == 0
    assert QUANTIZE_KEY not in torch.load(tmp_path / "plain.pth", weights_only=True)
    assert export_main([str(tmp_path / "plain.pth"), "--int8", "--out", str(tmp_path / "copy.pth")]) == 0
    copy = torch.load(tmp_path / "copy.pth", weights_only=True)
    assert copy[QUANTIZE_KEY] == INT8 and copy.keys() - {QUANTIZE_KEY} == payload.keys() - {QUANTIZE_KEY}


def test_an_unknown_quantize_mode_is_refused(tiny_cnn_pth, tmp_path):
    payload = fc.load_payload(tiny_cnn_pth) | {QUANTIZE_KEY: "int4"}
    torch.save(payload, tmp_path / "int4.pth")
    with pytest.raises(fc.ModelFileError, match=r"int4.pth: unknown quantize mode 'int4'.*export.py"):
        fc.load_model(tmp_path / "int4.pth")


def test_int8_is_a_cpu_path():
    asks = {QUANTIZE_KEY: INT8}
    cuda, cpu, path = torch.device("cuda"), torch.device("cpu"), Path("m.pth")
    with pytest.raises(BackendError, match="backend='int8'.*CPU only.*device='cpu'"):
        _choose_backend("int8", {}, path, cuda, False)
    with pytest.warns(UserWarning, match="m.pth: asks for int8.*serving it on cuda unquantised"):
        assert _choose_backend("auto", asks, path, cuda, False) == "eager"
    assert _choose_backend("auto", asks, path, cpu, False) == "int8"
    assert _choose_backend("eager", asks, path, cpu, False) == "eager"


def test_onnx_int8_export(tiny_vit_pth, tmp_path, real_photos):
    payload = fc.load_payload(tiny_vit_pth) | {QUANTIZE_KEY: INT8}
    path, diff = onnx_export.export_onnx(payload, tmp_path / "vit_int8.onnx", int8=True)
    graph = onnx.load(str(path))
    assert "MatMulInteger" in {n.op_type for n in graph.graph.node}
    assert diff is not None and diff < INT8_PROB_TOLERANCE
    assert [p.name for p in tmp_path.iterdir()] == ["vit_int8.onnx"]  # no fp32 temp file left behind
    spec = json.loads({p.key: p.value for p in graph.metadata_props}[onnx_model.ONNX_METADATA_KEY])
    assert QUANTIZE_KEY not in spec  # the graph is int8 in itself; the key is the .pth's request to torch
    served, fp32 = fc.load_model(path), fc.load_model(tiny_vit_pth, device="cpu", backend="eager")
    batch = _photos_batch(real_photos, fp32.prep)
    assert (served.probabilities(batch) - fp32.probabilities(batch)).abs().max() < INT8_PROB_TOLERANCE


def test_cli_int8_and_fp32_flags(tiny_vit_pth, real_photos, monkeypatch, capsys):
    from flowers_classifier import cli
    seen = []
    load = cli.load_model
    monkeypatch.setattr(cli, "load_model", lambda *a, **kw: seen.append(kw["backend"]) or load(*a, **kw))
    photo = str(real_photos["rose"][0])
    for flags in (["--int8"], ["--fp32"], []):
        assert cli.main([photo, "--model", str(tiny_vit_pth), *flags]) == 0
    assert seen == ["int8", "eager", "auto"] and capsys.readouterr().out.count(photo) == 3


@pytest.mark.parametrize("which", ["cnn", "vit"])
def test_grad_cam_explains_int8_with_the_fp32_weights_of_its_file(which, tiny_vit_pth, tiny_cnn_pth, real_photos):
    """int8 layers pass no gradient (the ViT's map was all zero): the map is the fp32 one of the same file,
    for the class the int8 model predicts, and int8 still serves."""
    pth = tiny_vit_pth if which == "vit" else tiny_cnn_pth
    int8, fp32 = fc.load_model(pth, device="cpu", backend="int8"), fc.load_model(pth, device="cpu", backend="eager")
    photo = real_photos["tulip"][0]
    served = int8.classes.index(fc.predict(int8, photo))
    heat = grad_cam(int8, photo)
    assert heat.max() == pytest.approx(1.0)
    np.testing.assert_allclose(heat, grad_cam(fp32, photo, class_index=served), atol=1e-5)
    assert int8_layers(int8.net) > 0 and int8_layers(gradient_net(int8)) == 0
    assert gradient_net(int8) is gradient_net(int8)  # built once per model


def test_grad_cam_of_int8_refuses_a_file_changed_since_load(tmp_path, real_photos):
    """The fp32 twin is read from the file when Grad-CAM first asks: other weights there would explain a
    model that does not serve."""
    pth = tiny_cnn_payload_file(tmp_path / "cnn.pth")
    int8 = fc.load_model(pth, device="cpu", backend="int8")
    os.replace(tiny_cnn_payload_file(tmp_path / "new.pth", seed=1), pth)  # re-exported, as export.py writes
    with pytest.raises(ModelFileError, match=r"cnn.pth: changed since the model was loaded.*load the model again"):
        grad_cam(int8, real_photos["tulip"][0])
