"""ONNX export (`export.py --onnx`, `flowers_fastai.onnx_export.export_onnx`) and serving an .onnx with
flowers_classifier: the graph's probabilities equal PyTorch's, the preprocessing travels in its metadata.
Also the CPU fast paths of torch serving (channels_last, compile=True) against the plain module."""

import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from conftest import ROOT, TINY_CNN, make_image_folder

import flowers_classifier as fc
from flowers_classifier import onnx_model
from flowers_classifier.classes import CLASSES
from flowers_classifier.factory import build_from_spec
from flowers_classifier.preprocess import preprocess_image
from flowers_fastai import onnx_export


@pytest.fixture(scope="module")
def tiny_onnx(tiny_cnn_pth, tmp_path_factory):
    """(the tiny convnextv2_atto .pth, its ONNX export, the max diff export_onnx measured)."""
    out = tmp_path_factory.mktemp("onnx") / "cnn_flowers.onnx"
    path, diff = onnx_export.export_onnx(fc.load_payload(tiny_cnn_pth), out)
    return tiny_cnn_pth, path, diff


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("photos"), per_class=2, size=90)
    return sorted(root.rglob("*.jpg"))


def test_onnx_probabilities_match_pytorch(tiny_onnx, photos):
    pth, onnx_path, diff = tiny_onnx
    assert diff is not None and diff < 1e-4
    torch_model, onnx_model = fc.load_model(pth, device="cpu"), fc.load_model(onnx_path)
    batch = torch.stack([preprocess_image(p, torch_model.prep) for p in photos])
    for x in (batch[:1], batch):  # the batch axis is dynamic: 1 and 10 images through the same graph
        expected, got = torch_model.probabilities(x), onnx_model.probabilities(x)
        assert got.shape == (len(x), len(CLASSES)) and got.dtype == torch.float32
        assert (got - expected).abs().max() < 1e-4
    assert torch.allclose(onnx_model.logits(batch), torch_model.logits(batch), atol=1e-4)  # the logits output too


def test_flowers_classifier_predicts_with_the_onnx(tiny_onnx, photos):
    pth, onnx_path, _ = tiny_onnx
    torch_model, onnx_model = fc.load_cnn_model(pth, device="cpu"), fc.load_cnn_model(onnx_path)
    assert isinstance(onnx_model, fc.FlowerClassifier) and onnx_model.backend.name == "onnx"
    assert (onnx_model.family, onnx_model.model_name, onnx_model.prep) == ("cnn", TINY_CNN, torch_model.prep)
    ours, theirs = fc.predict_proba(torch_model, photos[0]), fc.predict_proba(onnx_model, photos[0])
    assert list(theirs) == list(CLASSES) and max(abs(ours[c] - theirs[c]) for c in CLASSES) < 1e-4
    assert fc.predict(onnx_model, photos[0]) == fc.predict(torch_model, photos[0])
    records = fc.predict_batch(onnx_model, [*photos[:3], photos[0].with_name("missing.jpg")], bs=2)
    assert [r["predicted_class"] for r in records[:3]] == [fc.predict(torch_model, p) for p in photos[:3]]
    assert records[3]["error"] and "no such file" in records[3]["error"]


def test_the_metadata_holds_the_payload_spec(tiny_onnx):
    pth, onnx_path, _ = tiny_onnx
    props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    spec = json.loads(props[onnx_model.ONNX_METADATA_KEY])
    payload = fc.load_payload(pth)
    for key in ("family", "model_name", "classes", "image_size", "mean", "std", "interpolation", "crop_pct"):
        assert spec[key] == payload[key], key
    assert spec["dtype"] == "float32" and "state_dict" not in spec


def test_cli_exports_a_payload_and_a_run_folder(tiny_cnn_pth, tmp_path):
    out = subprocess.run([sys.executable, "export.py", str(tiny_cnn_pth), "--onnx", str(tmp_path / "a.onnx")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max |p_onnx - p_torch|" in out.stdout and (tmp_path / "a.onnx").is_file()
    # a run folder: metrics.json (spec) + best.pth (weights), as train.py leaves it
    payload = fc.load_payload(tiny_cnn_pth)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(payload["state_dict"], run / "best.pth")
    spec = {k: v for k, v in payload.items() if k not in ("state_dict", "format_version", "dtype")}
    (run / "metrics.json").write_text(json.dumps({"model": spec}))
    out = subprocess.run([sys.executable, "export.py", str(run), "--onnx", str(tmp_path / "b.onnx")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert fc.predict_proba(fc.load_model(tmp_path / "b.onnx"), make_image_folder(tmp_path / "i", 1) / "rose/0.jpg")


def test_cli_refuses_a_pth_without_onnx(tiny_cnn_pth):
    out = subprocess.run([sys.executable, "export.py", str(tiny_cnn_pth)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "not a run folder" in out.stderr and "--onnx" in out.stderr


def test_a_disagreeing_export_writes_nothing(tiny_cnn_pth, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "ONNX_TOLERANCE", -1.0)  # any difference (even 0) now counts as a failure
    with pytest.raises(onnx_export.OnnxExportError, match="disagrees with PyTorch.*nothing was written"):
        onnx_export.export_onnx(fc.load_payload(tiny_cnn_pth), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file is left behind


def test_bad_onnx_files_are_refused_with_their_name(tiny_onnx, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(fc.ModelFileError, match="garbage.onnx: not a readable ONNX model"):
        fc.load_model(garbage)
    bare = tmp_path / "bare.onnx"  # a valid graph, but not one of ours: no preprocessing spec
    proto = onnx.load(str(tiny_onnx[1]))
    del proto.metadata_props[:]
    onnx.save_model(proto, str(bare))
    with pytest.raises(fc.ModelFileError, match="bare.onnx: an ONNX model without flowers_fastai metadata"):
        fc.load_model(bare)
    with pytest.raises(fc.ModelFileError, match="holds a 'cnn' model, not 'clip'"):
        fc.load_vit_model(tiny_onnx[1])
    with pytest.raises(fc.ModelFileError, match="missing.onnx: no such model file"):
        fc.load_model(tmp_path / "missing.onnx")


def test_fast_cpu_serving_matches_the_plain_module(tiny_cnn_pth, photos):
    """The CPU fast paths (channels_last by default for ConvNeXt, compile=True) serve the probabilities of
    the module as built, NCHW and eager."""
    payload = fc.load_payload(tiny_cnn_pth)
    plain = build_from_spec(payload)
    plain.load_state_dict(payload["state_dict"])
    served = fc.load_model(tiny_cnn_pth, device="cpu")
    assert next(served.net.parameters()).is_contiguous(memory_format=torch.channels_last)
    if shutil.which(os.environ.get("CXX", "g++")):
        compiled = fc.load_model(tiny_cnn_pth, device="cpu", compile=True)
        assert compiled.backend.name == "eager" and compiled.backend.compiled
    else:  # e.g. a runtime-only Docker image: told so, and served eagerly
        with pytest.warns(UserWarning, match="torch.compile failed.*C\\+\\+ compiler"):
            compiled = fc.load_model(tiny_cnn_pth, device="cpu", compile=True)
        assert not compiled.backend.compiled
    x = torch.stack([preprocess_image(p, served.prep) for p in photos])
    with torch.inference_mode():
        expected = plain.eval()(x).softmax(-1)
    for model in (served, compiled):
        for batch in (x[:1], x):
            assert (model.probabilities(batch) - expected[:len(batch)]).abs().max() < 1e-5


def test_grad_cam_refuses_an_onnx_model(tiny_onnx, photos):
    """ONNX Runtime computes no gradients: a clear refusal naming the .pth to explain, not an AttributeError."""
    from flowers_classifier.explain import ExplainError, explain
    with pytest.raises(ExplainError, match=r"\.onnx model.*no gradients.*load the \.pth it was exported from"):
        explain(fc.load_model(tiny_onnx[1]), photos[0])
