"""Model factory: the architecture an exported payload describes, randomly initialised, and the pixels it
expects (the modules themselves are in `model`).

Two families:
- "cnn":  a timm ConvNeXt V2 with a `num_classes`-way head.
- "clip": an OpenCLIP image encoder with a linear head on L2-normalised image features.

Nothing here downloads or resolves pretrained weights: the runtime builds what a payload names and loads the
payload's weights into it (`build_from_spec`). Where a model's starting weights come from (timm's hub, an
open_clip tag, a local file) and CLIP's zero-shot head are the trainer's (`flowers_fastai.pretrained`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from torch import nn

from .classes import CLASSES
from .model import ClipClassifier, use_fast_grn
from .preprocess import Preprocess


def create_cnn(model_name: str, num_classes: int = len(CLASSES), drop_path_rate: float = 0.0,
               fast_grn: bool = True) -> nn.Module:
    """The timm ConvNeXt V2 `model_name`, randomly initialised, with a `Linear(in_features, num_classes)` head.
    fast_grn: swap timm's GlobalResponseNorm for FastGlobalResponseNorm (same function, fewer passes)."""
    import timm
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate)
    return use_fast_grn(model) if fast_grn else model


def cnn_preprocess(model: nn.Module, image_size: int | None = None) -> Preprocess:
    cfg = model.pretrained_cfg
    return Preprocess(image_size=image_size or cfg["input_size"][-1], mean=tuple(cfg["mean"]),
                      std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bicubic"),
                      crop_pct=cfg.get("crop_pct", 0.875))


def create_clip(model_name: str, num_classes: int = len(CLASSES), image_size: int | None = None,
                quick_gelu: bool = False) -> ClipClassifier:
    """The OpenCLIP image tower of `model_name`, randomly initialised, with a random linear head (the text tower
    is not kept). image_size: force another input size than the model's; quick_gelu: as the weights were trained."""
    import open_clip
    # Random init is the point: open_clip's "No pretrained weights loaded" warning would mislead.
    with _drop_log_records("No pretrained weights loaded"):
        clip = open_clip.create_model(model_name, pretrained=None, force_image_size=image_size,
                                      force_quick_gelu=quick_gelu)
    return ClipClassifier(clip.visual, num_classes, quick_gelu)


def clip_preprocess(model: ClipClassifier) -> Preprocess:
    """CLIP's own eval transform: bicubic resize of the short side to the model's input size (224, 336
    for -336 models, or the forced size), center crop, CLIP's mean/std (from the tag where it has them)."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return Preprocess(image_size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=cfg.get("interpolation", "bicubic"), crop_pct=1.0)


# --------------------------------------------------------------------------- shared entry points

class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def _drop_log_records(prefix: str):
    """Drop the root logger's records that start with `prefix`, only for the `with` block (open_clip logs
    through the root logger, with `logging.warning`)."""
    root, drop = logging.getLogger(), _DropPrefix(prefix)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def preprocess_for(model: nn.Module, image_size: int | None = None) -> Preprocess:
    return clip_preprocess(model) if isinstance(model, ClipClassifier) else cnn_preprocess(model, image_size)


def build_from_spec(spec: dict, fast_grn: bool = True) -> nn.Module:
    """The architecture an exported payload describes, randomly initialised (never downloads).
    fast_grn=False keeps timm's own GlobalResponseNorm (benchmarks compare against it)."""
    family, name, n = spec["family"], spec["model_name"], len(spec["classes"])
    if family == "cnn":
        return create_cnn(name, num_classes=n, fast_grn=fast_grn)
    if family == "clip":
        return create_clip(name, num_classes=n, image_size=spec.get("image_size"),
                           quick_gelu=spec.get("quick_gelu", False))
    raise ValueError(f"unknown model family {family!r}: expected 'cnn' or 'clip'")
