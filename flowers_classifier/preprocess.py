"""Image decoding and evaluation-time preprocessing, shared bit for bit by validation and serving.

The fastai validation pipeline and the runtime both call `load_rgb` and `resize_center_crop`,
then scale to [0, 1] and normalise with the backbone's mean/std, so what is measured during training
is what is served. Pure PIL/NumPy/torch: no fastai here.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FlowersError

# The file suffixes a folder of photos is scanned for (training data, batch prediction, demo examples).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


class InvalidImageError(FlowersError, ValueError):
    """An input that is not a decodable image. The message names the file."""


@dataclass(frozen=True)
class Preprocess:
    """How a backbone wants its pixels: square input size, eval crop fraction, resize filter, stats."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875  # eval: resize the short side to size / crop_pct, then center-crop

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(image_size=int(d["image_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=str(d.get("interpolation", "bicubic")),
                   crop_pct=float(d.get("crop_pct", 0.875)))


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite transparent pixels onto white: a cut-out flower on black would be a different photo."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, any mode (L, LA, P, RGBA, CMYK, I;16, F) converted to 8-bit RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return _flatten_alpha(img)
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # 16-bit / float grayscale: rescale to 8 bits instead of letting PIL clip at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully (first frame of animations) into an RGB image, or raise InvalidImageError."""
    path = Path(path)
    if not path.exists():
        raise InvalidImageError(f"{path}: no such file")
    if path.is_dir():
        raise InvalidImageError(f"{path}: is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # force the full decode now: truncated files fail here, not mid-epoch
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"{path}: image is too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise InvalidImageError(f"{path}: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"{path}: cannot decode image ({e})") from e


def resize_center_crop(img: Image.Image, size: int, crop_pct: float,
                       interpolation: str = "bicubic") -> Image.Image:
    """timm's eval transform: short side to floor(size / crop_pct), then a centered size x size crop."""
    scale = math.floor(size / crop_pct)
    w, h = img.size
    if w <= h:
        new_w, new_h = scale, max(scale, round(h * scale / w))
    else:
        new_w, new_h = max(scale, round(w * scale / h)), scale
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[interpolation])
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, prep: Preprocess) -> torch.Tensor:
    """A (3, H, W) float tensor scaled to [0, 1] and normalised: the same arithmetic as fastai's
    IntToFloatTensor + Normalize, so validation and serving agree to float rounding."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (x - mean) / std


def preprocess_image(path: str | os.PathLike, prep: Preprocess) -> torch.Tensor:
    """File -> normalised (3, size, size) tensor, exactly as validation sees it."""
    img = resize_center_crop(load_rgb(path), prep.image_size, prep.crop_pct, prep.interpolation)
    return to_tensor(img, prep)


# --------------------------------------------------------------------------- test-time augmentation
# Shared by `evaluate.py --tta` and the demo's TTA checkbox, so both average the same ten views.

TTA_CROP_PCT = 0.875  # corner crops come from the image resized to size / 0.875 (short side), timm's default


def _corner_crops(img: Image.Image, size: int, interpolation: str) -> list[Image.Image]:
    scale = math.floor(size / TTA_CROP_PCT)
    w, h = img.size
    img = img.resize((max(scale, round(w * scale / min(w, h))), max(scale, round(h * scale / min(w, h)))),
                     _RESAMPLE[interpolation])
    w, h = img.size
    return [img.crop((x, y, x + size, y + size)) for x, y in ((0, 0), (w - size, 0), (0, h - size),
                                                               (w - size, h - size))]


def tta_views(path: str | os.PathLike, prep: Preprocess) -> torch.Tensor:
    """(10, 3, H, W): the served crop (view 0), the four corner crops of the image resized to
    size / 0.875 on its short side, and the mirror image of each of those five."""
    img = load_rgb(path)
    crops = [resize_center_crop(img, prep.image_size, prep.crop_pct, prep.interpolation)]
    crops += _corner_crops(img, prep.image_size, prep.interpolation)
    crops += [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops]
    return torch.stack([to_tensor(c, prep) for c in crops])
