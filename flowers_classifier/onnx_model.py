"""Serving the ONNX form of a payload: `load_onnx_model` runs an `.onnx` file written by `export.py --onnx`
through ONNX Runtime on the CPU (backends.OnnxBackend), as a `FlowerClassifier` like a `.pth` model. Needs
onnxruntime only; writing the file is the trainer's (`flowers_fastai.onnx_export`, which takes the format from here).

The graph takes `image` (N, 3, H, W) with a dynamic batch axis and returns `logits` and `probabilities`;
the payload's metadata (format version, classes, preprocessing, calibration temperature) rides along as
JSON in its metadata_props (the graph's `probabilities` are the raw softmax; serving divides `logits` by the
temperature).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .backends import BackendError, OnnxBackend
from .classes import CLASSES
from .model import FlowerClassifier
from .payload import QUANTIZE_KEY, ModelFileError, check_spec, payload_temperature, resolve_model_path
from .preprocess import Preprocess

ONNX_METADATA_KEY = "flowers_fastai"  # metadata_props key holding the payload spec as JSON
ONNX_INPUT, ONNX_OUTPUTS = "image", ("logits", "probabilities")


def onnx_spec(payload: dict) -> dict:
    """The payload's metadata as stored in the ONNX file: everything but the weights and the int8 request of
    the `.pth` (torch's int8 path; an ONNX graph is quantised or not in itself), dtype float32."""
    return {k: v for k, v in payload.items() if k not in ("state_dict", QUANTIZE_KEY)} | {"dtype": "float32"}


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
