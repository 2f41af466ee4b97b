"""Writing the ONNX form of a payload (`export.py --onnx`): an fp32 graph checked against PyTorch with ONNX
Runtime before the file is written, or ONNX Runtime's dynamic int8 quantisation of it (`int8=True`).

The format is the runtime's (`flowers_classifier.onnx_model`, which serves the file): the graph takes `image`
(N, 3, H, W) with a dynamic batch axis and returns `logits` and `probabilities` (the raw softmax; serving
divides `logits` by the temperature); the payload's metadata rides along as JSON in its metadata_props.
An export concern: it needs the `onnx` extra (onnx, onnxscript for torch's exporter, onnxruntime for the
check), which serving an .onnx file does not (ONNX Runtime only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from flowers_classifier.errors import FlowersError
from flowers_classifier.factory import _drop_log_records, build_from_spec
from flowers_classifier.files import atomic_write
from flowers_classifier.onnx_model import ONNX_INPUT, ONNX_METADATA_KEY, ONNX_OUTPUTS, onnx_spec

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
