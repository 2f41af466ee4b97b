"""The `.pth` payload format: its version, keys, default file names, how one is made and how one is
read and validated.

A payload is a dict of tensors and plain metadata, loadable with `torch.load(weights_only=True)`:
format_version, family, model_name, classes, image_size, mean, std, state_dict, and optionally
interpolation, crop_pct, quick_gelu (clip), dtype, temperature (the calibration fitted at export: logits
are divided by it before the softmax; a file without it serves T = 1) and quantize ("int8": `load_model`
quantises the Linear layers to int8 when it serves on the CPU, see quantize.py; the weights stored are the
usual fp32/fp16 ones). No pickled classes, so loading one never runs code.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .classes import CLASSES
from .errors import FlowersError

FORMAT_VERSION = 1
SUPPORTED_FORMATS = (1,)
REQUIRED_KEYS = frozenset({"format_version", "family", "model_name", "classes", "image_size", "mean", "std",
                           "state_dict"})
TEMPERATURE_KEY = "temperature"  # optional: version-1 files written before calibration load as T = 1
QUANTIZE_KEY, INT8 = "quantize", "int8"  # optional: {"quantize": "int8"} serves int8 on the CPU
OPTIONAL_KEYS = frozenset({"interpolation", "crop_pct", "quick_gelu", "dtype", TEMPERATURE_KEY, QUANTIZE_KEY})
FAMILIES = ("cnn", "clip")
DEFAULT_FILES = {"cnn": "cnn_flowers.pth", "clip": "vit_flowers.pth"}  # what train.py/export.py write
MODELS_DIR = Path("models")  # where train.py/export.py write, relative to the working directory
CPU_PACKAGE_SUFFIX = ".cpu.pt2"  # cnn_flowers.pth -> cnn_flowers.cpu.pt2, its compiled CPU form (aot.py)


class ModelFileError(FlowersError, ValueError):
    """A model file that is missing, unsafe, damaged or of the wrong kind. The message names it."""


def default_model_path(family: str) -> Path:
    """models/cnn_flowers.pth or models/vit_flowers.pth, relative to the working directory."""
    return MODELS_DIR / DEFAULT_FILES[family]


def resolve_model_path(weights_path: str | os.PathLike) -> Path:
    """The path as given, or, for a bare file name that is not in the working directory, MODELS_DIR/name."""
    path = Path(weights_path)
    if not path.exists() and path.parent == Path(".") and (MODELS_DIR / path.name).exists():
        return MODELS_DIR / path.name
    return path


def make_payload(spec: dict, state_dict: dict[str, torch.Tensor], half: bool = False,
                 temperature: float | None = None, int8: bool = False) -> dict:
    """The payload of `spec` (family, model_name, classes, preprocessing) and weights, fp16 storage if `half`,
    with the calibration `temperature` when one was fitted, asking for int8 serving on the CPU if `int8`."""
    dtype = torch.float16 if half else torch.float32
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    spec = {k: v for k, v in spec.items() if k not in (TEMPERATURE_KEY, QUANTIZE_KEY)}
    payload = dict(format_version=FORMAT_VERSION, **spec, dtype=str(dtype).removeprefix("torch."), state_dict=tensors)
    if temperature is not None:
        payload[TEMPERATURE_KEY] = float(temperature)
    if int8:
        payload[QUANTIZE_KEY] = INT8
    return payload


def payload_int8(spec: dict, path: str | os.PathLike = "payload") -> bool:
    """Whether a payload asks to be served int8 on the CPU; ModelFileError for a quantize value we do not know."""
    value = spec.get(QUANTIZE_KEY)
    if value not in (None, INT8):
        raise ModelFileError(f"{path}: unknown quantize mode {value!r} (this code knows {INT8!r}); export it again "
                             f"with export.py (--int8 or without).")
    return value == INT8


def payload_temperature(spec: dict, path: str | os.PathLike = "payload") -> float:
    """The calibration temperature of a payload or ONNX spec: 1.0 when it has none; ModelFileError unless it
    is a positive finite number."""
    t = spec.get(TEMPERATURE_KEY, 1.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ModelFileError(f"{path}: calibration temperature {t!r} is not a positive finite number; export it "
                             f"again with export.py (or with --no-calibrate).")
    return float(t)


def check_spec(spec: dict, path: Path) -> None:
    """The metadata checks shared by `.pth` payloads and ONNX files: a version we read, our five classes."""
    if spec.get("format_version") not in SUPPORTED_FORMATS:
        raise ModelFileError(f"{path}: payload format {spec.get('format_version')} is not supported "
                             f"(this code reads {SUPPORTED_FORMATS}); update flowers_classifier or re-export it.")
    if tuple(spec.get("classes", ())) != CLASSES:
        raise ModelFileError(f"{path}: classes {spec.get('classes')} are not {list(CLASSES)}")
    if spec.get("family") not in FAMILIES:
        raise ModelFileError(f"{path}: unknown model family {spec.get('family')!r}; expected one of {FAMILIES}")


def _torch_load(path: Path, mmap: bool = False) -> object:
    try:
        # torch maps only its zip format (torch.save's default); an older file is read as before
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a torch file at all (random bytes, text, ...)
            raise ModelFileError(f"{path}: not a readable model file (damaged, or not a torch file at all); "
                                 f"export it again with export.py.") from e
        raise ModelFileError(f"{path}: refused to load: the file holds pickled Python objects, not a "
                             f"plain flowers_fastai payload (nothing in it was executed). Re-export it "
                             f"with export.py.") from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise ModelFileError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from e


def load_payload(weights_path: str | os.PathLike, mmap: bool = False) -> dict:
    """Read and validate a payload written by `export.py`; ModelFileError on anything else. `mmap=True` maps
    its tensors from the file instead of reading them (load_model, which may never need them)."""
    path = resolve_model_path(weights_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file. Train and export one with "
                             f"`python train.py --arch cnn` (or `python export.py RUN_DIR`).")
    return validate_payload(_torch_load(path, mmap), path)


def validate_payload(payload: object, path: str | os.PathLike = "payload") -> dict:
    """`payload` when it is one this code serves (its keys, version, classes, family, temperature, int8
    request); ModelFileError naming `path` otherwise. Shared by the .pth reader and the Hub folder's (hub.py)."""
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: not a flowers_fastai payload (a {type(payload).__name__}, not a dict)")
    keys = set(payload)
    missing, extra = REQUIRED_KEYS - keys, keys - REQUIRED_KEYS - OPTIONAL_KEYS
    if missing or extra:
        raise ModelFileError(f"{path}: not a flowers_fastai payload (missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(extra)}); export it with export.py.")
    check_spec(payload, path)
    payload_temperature(payload, path)
    payload_int8(payload, path)
    return payload
