"""Standalone flower classifier: load an exported `.pth` and predict, with torch, timm, open_clip and
PIL only (no fastai, no network).

    import flowers_classifier as fc
    model = fc.load_cnn_model("cnn_flowers.pth")   # a bare name is also looked up in models/
    fc.predict(model, "rose.jpg")                   # -> "rose"
    fc.predict_proba(model, "rose.jpg")             # -> {"daisy": 0.01, "dandelion": 0.02, ...}

Payloads are read with `torch.load(weights_only=True)`: a file holding pickled objects is refused
without running anything.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from flowers_fastai.classes import CLASSES
from flowers_fastai.models import build_from_spec
from flowers_fastai.preprocess import InvalidImageError, Preprocess, preprocess_image

__all__ = ["CLASSES", "FlowerClassifier", "InvalidImageError", "ModelFileError", "load_cnn_model",
           "load_model", "load_vit_model", "predict", "predict_proba"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
REQUIRED_KEYS = frozenset({"format_version", "family", "model_name", "classes", "image_size", "mean", "std",
                           "state_dict"})
OPTIONAL_KEYS = frozenset({"interpolation", "crop_pct", "quick_gelu", "dtype"})
SUPPORTED_FORMATS = (1,)


class ModelFileError(ValueError):
    """A model file that is missing, unsafe, damaged or of the wrong kind. The message names it."""


class FlowerClassifier(nn.Module):
    """An exported network plus what it needs to be fed: classes and preprocessing."""

    def __init__(self, net: nn.Module, family: str, model_name: str, classes: tuple[str, ...], prep: Preprocess):
        super().__init__()
        self.net, self.family, self.model_name, self.classes, self.prep = net, family, model_name, classes, prep

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) fp32 probabilities."""
        dtype = next(self.net.parameters()).dtype
        return self.net(batch.to(self.device, dtype)).float().softmax(-1).cpu()


def _resolve(weights_path: str | os.PathLike) -> Path:
    path = Path(weights_path)
    if not path.exists() and path.parent == Path(".") and (MODELS_DIR / path.name).exists():
        return MODELS_DIR / path.name
    return path


def load_payload(weights_path: str | os.PathLike) -> dict:
    """Read and validate a payload written by `export.py`; ModelFileError on anything else."""
    path = _resolve(weights_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file. Train and export one with "
                             f"`python train.py --arch cnn` (or `python export.py RUN_DIR`).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path}: refused to load: the file holds pickled Python objects, not a "
                             f"plain flowers_fastai payload (nothing in it was executed). Re-export it "
                             f"with export.py.") from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise ModelFileError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: not a flowers_fastai payload (a {type(payload).__name__}, not a dict)")
    keys = set(payload)
    missing, extra = REQUIRED_KEYS - keys, keys - REQUIRED_KEYS - OPTIONAL_KEYS
    if missing or extra:
        raise ModelFileError(f"{path}: not a flowers_fastai payload (missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(extra)}); export it with export.py.")
    if payload["format_version"] not in SUPPORTED_FORMATS:
        raise ModelFileError(f"{path}: payload format {payload['format_version']} is not supported "
                             f"(this code reads {SUPPORTED_FORMATS}); update flowers_classifier.")
    if tuple(payload["classes"]) != CLASSES:
        raise ModelFileError(f"{path}: classes {payload['classes']} are not {list(CLASSES)}")
    return payload


def load_model(weights_path: str | os.PathLike, family: str | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> FlowerClassifier:
    """Build the architecture the payload describes (no download), load its weights, eval mode.
    `family` ("cnn" or "clip") makes a file of the other family an error. Uses CUDA when available."""
    payload = load_payload(weights_path)
    path = _resolve(weights_path)
    if family and payload["family"] != family:
        loader = "load_cnn_model" if payload["family"] == "cnn" else "load_vit_model"
        raise ModelFileError(f"{path}: holds a {payload['family']!r} model, not {family!r}; use {loader}().")
    try:
        net = build_from_spec(payload)
        net.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: weights do not fit {payload['model_name']} ({e})") from e
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        dtype = torch.float32  # half precision on CPU is slower and less exact
    prep = Preprocess.from_dict(payload)
    return FlowerClassifier(net.to(device, dtype).eval(), payload["family"], payload["model_name"],
                            tuple(payload["classes"]), prep)


def load_cnn_model(weights_path: str | os.PathLike = "cnn_flowers.pth", device=None,
                   dtype: torch.dtype = torch.float32) -> FlowerClassifier:
    """The exported ConvNeXt V2 classifier (`export.py` output)."""
    return load_model(weights_path, "cnn", device, dtype)


def load_vit_model(weights_path: str | os.PathLike = "vit_flowers.pth", device=None,
                   dtype: torch.dtype = torch.float32) -> FlowerClassifier:
    """The exported CLIP ViT classifier; fp32 on CPU, fp16/bf16 allowed on GPU via `dtype`."""
    return load_model(weights_path, "clip", device, dtype)


def predict_proba(model: FlowerClassifier, image_path: str | os.PathLike) -> dict[str, float]:
    """Class -> probability for one image file (EXIF-rotated, any mode -> RGB, validation crop)."""
    x = preprocess_image(image_path, model.prep).unsqueeze(0)
    probs = model.probabilities(x)[0]
    return {c: float(p) for c, p in zip(model.classes, probs, strict=True)}


def predict(model: FlowerClassifier, image_path: str | os.PathLike) -> str:
    """The most likely class: always one of daisy, dandelion, rose, sunflower, tulip."""
    probs = predict_proba(model, image_path)
    return max(probs, key=probs.get)
