"""Image decoding and evaluation-time preprocessing, shared bit for bit by validation and serving.

The fastai validation pipeline and the runtime both call `load_rgb` and `resize_center_crop`,
then scale to [0, 1] and normalise with the backbone's mean/std, so what is measured during training
is what is served. Pure PIL/NumPy/torch: no fastai here.
"""

from __future__ import annotations

import io
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


# What the public API takes wherever it reads an image: a file, its encoded bytes (an HTTP body: never written to a
# temp file) or a PIL image. Each goes through the same guards (decompression bomb, truncated, not an image).
ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image
BYTES_TYPES = (bytes, bytearray, memoryview)


def source_name(image: ImageSource) -> str:
    """How messages name an image: its path, else what it is (the caller may add where it came from)."""
    if isinstance(image, BYTES_TYPES):
        return f"image bytes ({len(image)} bytes)"
    if isinstance(image, Image.Image):
        return f"PIL image ({image.width}x{image.height} {image.mode})"
    return str(image)


def is_path(image: ImageSource) -> bool:
    """True for a file name (str or os.PathLike), False for in-memory bytes or a PIL image."""
    return isinstance(image, str | os.PathLike)


def load_rgb(image: ImageSource, name: str | None = None) -> Image.Image:
    """Decode `image` (a file, its bytes or a PIL image) fully (first frame of animations) into an RGB image, or
    raise InvalidImageError. `name`: how the message calls the image (default `source_name`), e.g. the path the
    bytes were read from."""
    name = name or source_name(image)
    if is_path(image):
        path = Path(image)
        if not path.exists():
            raise InvalidImageError(f"{name}: no such file")
        if path.is_dir():
            raise InvalidImageError(f"{name}: is a directory, not an image file")
    elif not isinstance(image, BYTES_TYPES + (Image.Image,)):
        raise TypeError(f"load_rgb: expected a path, image bytes or a PIL image, got {type(image).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(image, Image.Image):
                # Already opened by the caller: the same size guard as Image.open, then the pixels (lazy until now).
                _check_pixels(image)
                image.load()
                return to_rgb(image)
            with Image.open(io.BytesIO(image) if isinstance(image, BYTES_TYPES) else image) as img:
                img.load()  # force the full decode now: truncated files fail here, not mid-epoch
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"{name}: image is too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise InvalidImageError(f"{name}: not a recognised image format") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"{name}: cannot decode image ({e})") from e


def _check_pixels(img: Image.Image) -> None:
    """Image.open's decompression-bomb rule for an image opened elsewhere: more than Image.MAX_IMAGE_PIXELS
    pixels warns (an error here), more than twice that is an error."""
    limit, pixels = Image.MAX_IMAGE_PIXELS, img.width * img.height
    if limit and pixels > 2 * limit:
        raise Image.DecompressionBombError(f"Image size ({pixels} pixels) exceeds limit of {2 * limit} pixels, "
                                           f"could be decompression bomb DOS attack.")
    if limit and pixels > limit:
        warnings.warn(f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be decompression "
                      f"bomb DOS attack.", Image.DecompressionBombWarning, stacklevel=2)


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


def preprocess_image(image: ImageSource, prep: Preprocess, name: str | None = None) -> torch.Tensor:
    """File (or its bytes, or a PIL image) -> normalised (3, size, size) tensor, exactly as validation sees it.
    `name`: as for load_rgb."""
    img = resize_center_crop(load_rgb(image, name), prep.image_size, prep.crop_pct, prep.interpolation)
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


def tta_views(image: ImageSource, prep: Preprocess, name: str | None = None) -> torch.Tensor:
    """(10, 3, H, W): the served crop (view 0), the four corner crops of the image (a file, its bytes or a PIL
    image) resized to size / 0.875 on its short side, and the mirror image of each of those five."""
    img = load_rgb(image, name)
    crops = [resize_center_crop(img, prep.image_size, prep.crop_pct, prep.interpolation)]
    crops += _corner_crops(img, prep.image_size, prep.interpolation)
    crops += [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops]
    return torch.stack([to_tensor(c, prep) for c in crops])
