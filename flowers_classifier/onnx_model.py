"""The ONNX form of a payload: `export_onnx` writes one (`export.py --onnx`), `load_onnx_model` serves
one through ONNX Runtime on the CPU (backends.OnnxBackend) as a `FlowerClassifier`, like a `.pth` model.

The graph takes `image` (N, 3, H, W) with a dynamic batch axis and returns `logits` and `probabilities`;
the payload's metadata (format version, classes, preprocessing, calibration temperature) rides along as
JSON in its metadata_props (the graph's `probabilities` are the raw softmax; serving divides `logits` by the
temperature), and is checked against PyTorch with ONNX Runtime before the file is written.
`int8=True` writes ONNX Runtime's own dynamic int8 quantisation of that graph instead (`quantize_onnx_int8`).
Needs the `onnx` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .backends import BackendError, OnnxBackend
from .classes import CLASSES
from .errors import FlowersError
from .factory import build_from_spec
from .files import atomic_write
from .model import FlowerClassifier
from .payload import QUANTIZE_KEY, ModelFileError, check_spec, payload_temperature, resolve_model_path
from .preprocess import Preprocess

ONNX_METADATA_KEY = "flowers_fastai"  # metadata_props key holding the payload spec as JSON
ONNX_INPUT, ONNX_OUTPUTS = "image", ("logits", "probabilities")
ONNX_TOLERANCE = 1e-4  # max abs difference of probabilities, ONNX Runtime vs PyTorch, fp32
# ORT's dynamic quantisation: int8 weights per output channel (as torch's path, quantize.py), activations
# quantised per call; MatMul and Gemm only (Linear layers, attention; convolutions stay fp32: ORT's
# ConvInteger is a slow reference kernel on the CPU).
ONNX_INT8_OPS = ("MatMul", "Gemm")


class OnnxExportError(FlowersError, ValueError):
    """The ONNX graph cannot be written as asked (it disagrees with PyTorch). The message says what to try."""


class _LogitsAndProbabilities(nn.Module):
    """The network plus its softmax, so ONNX users get probabilities without re-implementing anything."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, logits.softmax(-1)


def onnx_spec(payload: dict) -> dict:
    """The payload's metadata as stored in the ONNX file: everything but the weights and the int8 request of
    the `.pth` (torch's int8 path; an ONNX graph is quantised or not in itself), dtype float32."""
    return {k: v for k, v in payload.items() if k not in ("state_dict", QUANTIZE_KEY)} | {"dtype": "float32"}


def _fp32_module(payload: dict) -> nn.Module:
    net = build_from_spec(payload)
    net.load_state_dict(payload["state_dict"], strict=True)
    return _LogitsAndProbabilities(net.float()).eval()


def _check_onnx(path: str, module: nn.Module, size: int) -> float | None:
    """Max abs difference of probabilities between ONNX Runtime and PyTorch on a random batch of 3 (the
    graph was traced with 2, so this also proves the batch axis is dynamic); None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = module(x)[1]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUTS[1]], {ONNX_INPUT: x.numpy()})[0]
    return float((torch.from_numpy(got) - expected).abs().max())


def quantize_onnx_int8(src: str | Path, dst: str | Path) -> None:
    """ONNX Runtime's dynamic int8 quantisation of the fp32 graph `src`, written to `dst` (metadata kept)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise OnnxExportError(f"{dst}: an int8 ONNX graph is ONNX Runtime's quantisation, and onnxruntime is not "
                              f"installed; `pip install onnxruntime`, or export without --int8.") from e

    from .factory import _drop_log_records
    # ORT suggests its shape-inference pre-pass; the exporter's graph already carries the shapes.
    with _drop_log_records("Please consider to run pre-processing"):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(ONNX_INT8_OPS))


def export_onnx(payload: dict, out: str | Path, opset: int | None = None,
                int8: bool = False) -> tuple[Path, float | None]:
    """Write `payload` (a `.pth` payload dict) as an fp32 ONNX graph to `out`, atomically, and return
    (path, max abs difference of probabilities vs PyTorch, None when onnxruntime is not installed).
    Raises OnnxExportError, and writes nothing, when the fp32 graph's difference exceeds ONNX_TOLERANCE.
    `int8=True` then writes ONNX Runtime's int8 quantisation of that graph, and the difference returned is
    the int8 graph's from fp32 PyTorch (reported, not bounded: int8 is an approximation)."""
    import onnx
    module = _fp32_module(payload)
    size = int(payload["image_size"])
    sample = torch.zeros(2, 3, size, size)  # batch 2, not 1: torch.export would specialise a batch of 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(module, (sample,), dynamo=True, input_names=[ONNX_INPUT],
                                output_names=list(ONNX_OUTPUTS), dynamic_shapes={"x": {0: batch}},
                                opset_version=opset, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(onnx_spec(payload))})
    diff: list[float | None] = []

    def write(tmp: str) -> None:
        onnx.save_model(proto, tmp)  # weights inline: fine below protobuf's 2 GB (ViT-L/14 fp32 is 1.2 GB)
        diff.append(_check_onnx(tmp, module, size))
        if diff[0] is not None and diff[0] > ONNX_TOLERANCE:
            raise OnnxExportError(f"{out}: the ONNX graph disagrees with PyTorch by {diff[0]:.2e} "
                                  f"(> {ONNX_TOLERANCE}) in probability; nothing was written. Try another --opset.")
        if int8:
            fp32 = f"{tmp}.fp32"
            os.replace(tmp, fp32)
            try:
                quantize_onnx_int8(fp32, tmp)
            finally:
                Path(fp32).unlink(missing_ok=True)
            diff[0] = _check_onnx(tmp, module, size)

    return atomic_write(out, write), diff[0]


# --------------------------------------------------------------------------- serving

def _onnx_session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendError(f"{path}: serving an .onnx model needs onnxruntime, which is not installed; "
                             f"`pip install onnxruntime`, or serve the .pth payload instead.") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - truncated protobuf, not an ONNX file, unknown op, ...
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:300]}); "
                             f"export it again with `python export.py MODEL.pth --onnx OUT.onnx`.") from e


def load_onnx_model(onnx_path: str | os.PathLike, family: str | None = None, device: str | torch.device | None = None,
                    threads: int | None = None, calibrated: bool = True) -> FlowerClassifier:
    """An ONNX graph written by `export.py --onnx`, served by ONNX Runtime (CPU; `threads` sets its
    intra-op threads, default: ONNX Runtime's choice). The preprocessing and the calibration temperature
    come from the file's metadata; `calibrated=False` serves the raw softmax."""
    path = resolve_model_path(onnx_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file. Write one with `python export.py MODEL.pth --onnx {path}`.")
    if device is not None and torch.device(device).type != "cpu":
        raise ModelFileError(f"{path}: .onnx models are served on the CPU by ONNX Runtime; pass device='cpu' "
                             f"(or leave it out), or serve the .pth payload on {device}.")
    session = _onnx_session(path, threads)
    meta = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if meta is None:
        raise ModelFileError(f"{path}: an ONNX model without flowers_fastai metadata (no preprocessing spec); "
                             f"export it with `python export.py MODEL.pth --onnx OUT.onnx`.")
    spec = json.loads(meta)
    check_spec(spec, path)
    if family and spec["family"] != family:
        raise ModelFileError(f"{path}: holds a {spec['family']!r} model, not {family!r}.")
    return FlowerClassifier(OnnxBackend(session, ONNX_INPUT, ONNX_OUTPUTS[0]), spec["family"], spec["model_name"],
                            CLASSES, Preprocess.from_dict(spec), payload_temperature(spec, path) if calibrated else 1.0)
