"""Why this label: Grad-CAM heat maps for a served model, and an overlay of one on the photo.

Grad-CAM (Selvaraju et al. 2017) weights each channel of a feature map by the mean gradient of the class
logit over it, sums and keeps the positive part: where the evidence for that class lies.
- CNN (ConvNeXt): the output of the last stage (`net.stages[-1]`), a (N, C, h, w) map.
- ViT (CLIP): the patch tokens entering the last transformer block, reshaped to the patch grid. Not the
  last block's *output*: the head reads only the class token there, so the patch tokens' gradient is
  zero; one attention layer earlier they reach the class token (the choice pytorch-grad-cam documents
  for ViTs). Grad-CAM rather than attention rollout: it is class-specific (rollout shows where the model
  looks, not what argues for the label) and the same code as for the CNN.
The map is computed on the eval crop the model saw, then placed into the photo's own frame (its aspect):
the parts outside the centered crop were not seen, and get 0. A small hook-based implementation rather
than the `grad-cam` package: it runs on the served model as loaded (channels_last, `_LinearAsConv` on
the CPU), needs no parameter gradients and leaves the model untouched. Pure torch/numpy/PIL.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .model import FlowerClassifier
from .preprocess import load_rgb, resize_center_crop, to_tensor

OVERLAY_ALPHA = 0.5  # weight of the heat colours over the photo
MAX_OVERLAY_SIDE = 512  # the overlay is for a web page: no need for the photo's full resolution


def target_layer(model: FlowerClassifier) -> nn.Module:
    """The layer whose activations Grad-CAM weighs: see the module docstring."""
    if model.family == "cnn":
        return model.net.stages[-1]
    return model.net.visual.transformer.resblocks[-1]


def _tokens_to_grid(tokens: torch.Tensor, model: FlowerClassifier) -> torch.Tensor:
    """(N, L, C) tokens (class token first) -> (N, C, gh, gw) patch map."""
    gh, gw = model.net.visual.grid_size
    patches = tokens[:, -gh * gw:]  # open_clip puts the class token (and nothing else) before the patches
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


def cam_for_tensor(model: FlowerClassifier, x: torch.Tensor, class_index: int | None = None) -> np.ndarray:
    """(h, w) Grad-CAM map in [0, 1] at the crop's size for one normalised (3, H, W) input; the class is
    the predicted one unless `class_index` is given. All-zero when nothing argues for the class."""
    layer, captured = target_layer(model), {}
    vit = model.family != "cnn"

    def keep(_module, args, output=None):
        act = args[0] if vit else output
        if vit and not model.net.visual.transformer.batch_first:
            act = act.transpose(0, 1)  # LND -> NLD
        captured["act"] = act

    hook = layer.register_forward_pre_hook(keep) if vit else layer.register_forward_hook(keep)
    try:
        dtype = next(model.net.parameters()).dtype
        memory_format = torch.channels_last if model.channels_last else torch.preserve_format
        with torch.inference_mode(False), torch.enable_grad():  # the server may call us under inference_mode
            # a clone made here is a normal tensor even when x was made under inference_mode
            batch = x.clone().unsqueeze(0).to(model.device, dtype, memory_format=memory_format).requires_grad_(True)
            logits = model.net(batch)[0].float()
            target = int(logits.argmax()) if class_index is None else class_index
            act = captured["act"]
            (grad,) = torch.autograd.grad(logits[target], act)  # only this gradient: no parameter .grad set
    finally:
        hook.remove()
    act, grad = act.detach().float(), grad.float()
    if vit:
        act, grad = _tokens_to_grid(act, model), _tokens_to_grid(grad, model)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1): how much each channel argues for the class
    cam = F.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    top = float(cam.max())
    return (cam / top if top > 0 else cam).cpu().numpy()


def _crop_box(size: tuple[int, int], image_size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the photo's pixels of the centered crop `resize_center_crop` takes."""
    w, h = size
    scale = math.floor(image_size / crop_pct) / min(w, h)  # photo pixels -> resized pixels
    side = image_size / scale
    left, top = (w - side) / 2, (h - side) / 2
    return left, top, left + side, top + side


def grad_cam(model: FlowerClassifier, image: str | os.PathLike | Image.Image,
             class_index: int | None = None) -> np.ndarray:
    """Heat map (H, W) in [0, 1] of the photo's own size (EXIF-rotated): Grad-CAM of the eval crop,
    0 outside the crop (not seen by the model). `image` is a file or an RGB PIL image."""
    img = image if isinstance(image, Image.Image) else load_rgb(image)
    prep = model.prep
    crop = resize_center_crop(img, prep.image_size, prep.crop_pct, prep.interpolation)
    cam = cam_for_tensor(model, to_tensor(crop, prep), class_index)
    left, top, right, bottom = _crop_box(img.size, prep.image_size, prep.crop_pct)
    w, h = img.size
    x0, y0, x1, y1 = (max(0, round(v)) for v in (left, top, right, bottom))
    x1, y1 = min(w, x1), min(h, y1)
    full = np.zeros((h, w), dtype=np.float32)
    seen = Image.fromarray(cam.astype(np.float32), mode="F").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    full[y0:y1, x0:x1] = np.clip(np.asarray(seen), 0.0, 1.0)
    return full


def _jet(heat: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, the classic blue-cyan-yellow-red scale (no matplotlib here)."""
    r = np.clip(1.5 - np.abs(4 * heat - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * heat - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image: str | os.PathLike | Image.Image, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """The photo (at most MAX_OVERLAY_SIDE px on its long side) with the heat map blended over it."""
    img = image if isinstance(image, Image.Image) else load_rgb(image)
    if img.size != (heat.shape[1], heat.shape[0]):
        raise ValueError(f"overlay: heat map {heat.shape[1]}x{heat.shape[0]} does not match the "
                         f"{img.size[0]}x{img.size[1]} photo; compute it with grad_cam on this photo.")
    colours = Image.fromarray(_jet(heat))
    blended = Image.blend(img.convert("RGB"), colours, alpha)
    blended.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE))
    return blended


def explain(model: FlowerClassifier, image: str | os.PathLike | Image.Image,
            class_index: int | None = None) -> Image.Image:
    """`overlay(photo, grad_cam(model, photo))`: the photo decoded once."""
    img = image if isinstance(image, Image.Image) else load_rgb(image)
    return overlay(img, grad_cam(model, img, class_index))
