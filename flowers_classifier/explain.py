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
A model whose network passes no gradient is explained from the fp32 network of the same weights
(`gradient_net`, the backend's: int8's quantised layers have no backward; behind a CPU package, the eager network), for
the class that the served model predicts. An ONNX model has no PyTorch network and is refused, and so is a
map that comes out flat: an overlay of nothing would read as "no evidence anywhere".
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .errors import FlowersError
from .model import FlowerClassifier
from .preprocess import load_rgb, resize_center_crop, to_tensor
from .quantize import int8_layers

OVERLAY_ALPHA = 0.5  # weight of the heat colours over the photo
MAX_OVERLAY_SIDE = 512  # the overlay is for a web page: no need for the photo's full resolution


class ExplainError(FlowersError, ValueError):
    """Grad-CAM cannot explain this model or photo (no PyTorch network, a flat map); the message says why
    and what to do."""


def gradient_net(model: FlowerClassifier) -> nn.Module:
    """The network Grad-CAM differentiates for `model`: its backend's (the eager network; the fp32 network of
    the same weights behind int8 or a CPU package, built on first use). ExplainError for an ONNX model."""
    net = model.backend.gradient_net()
    if net is None:
        raise ExplainError(f"{model.model_name}: an .onnx model runs in ONNX Runtime, which computes no "
                           f"gradients, so Grad-CAM cannot explain it; load the .pth it was exported from "
                           f"(fc.load_model('MODEL.pth')) to explain its predictions.")
    return net


def target_layer(model: FlowerClassifier) -> nn.Module:
    """The layer of `gradient_net(model)` whose activations Grad-CAM weighs: see the module docstring."""
    return _target_layer(gradient_net(model), model.family)


def _target_layer(net: nn.Module, family: str) -> nn.Module:
    return net.stages[-1] if family == "cnn" else net.visual.transformer.resblocks[-1]


def _tokens_to_grid(tokens: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """(N, L, C) tokens (class token first) -> (N, C, gh, gw) patch map."""
    gh, gw = net.visual.grid_size
    patches = tokens[:, -gh * gw:]  # open_clip puts the class token (and nothing else) before the patches
    return patches.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)


def cam_for_tensor(model: FlowerClassifier, x: torch.Tensor, class_index: int | None = None) -> np.ndarray:
    """(h, w) Grad-CAM map in [0, 1] at the crop's size for one normalised (3, H, W) input; the class is
    the one the model predicts unless `class_index` is given. ExplainError when the map is flat (all zero
    or not finite): there is nothing to draw."""
    net = gradient_net(model)
    if class_index is None and model.backend.name != "eager":
        # another network serves (int8, a CPU package): explain the class it predicts, not its fp32 twin's
        class_index = int(model.logits(x.unsqueeze(0))[0].argmax())
    layer, captured = _target_layer(net, model.family), {}
    vit = model.family != "cnn"

    def keep(_module, args, output=None):
        act = args[0] if vit else output
        if vit and not net.visual.transformer.batch_first:
            act = act.transpose(0, 1)  # LND -> NLD
        captured["act"] = act

    hook = layer.register_forward_pre_hook(keep) if vit else layer.register_forward_hook(keep)
    try:
        param = next(net.parameters())
        with torch.inference_mode(False), torch.enable_grad():  # the server may call us under inference_mode
            # a clone made here is a normal tensor even when x was made under inference_mode
            batch = x.clone().unsqueeze(0).to(param.device, param.dtype)
            logits = net(batch.requires_grad_(True))[0].float()
            target = int(logits.argmax()) if class_index is None else class_index
            act = captured["act"]
            (grad,) = torch.autograd.grad(logits[target], act)  # only this gradient: no parameter .grad set
    finally:
        hook.remove()
    act, grad = act.detach().float(), grad.float()
    if vit:
        act, grad = _tokens_to_grid(act, net), _tokens_to_grid(grad, net)
    weights = grad.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1): how much each channel argues for the class
    cam = F.relu((weights * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[0, 0]
    _check_not_flat(cam, net, model, target)
    return (cam / cam.max()).cpu().numpy()


def _check_not_flat(cam: torch.Tensor, net: nn.Module, model: FlowerClassifier, target: int) -> None:
    """ExplainError, saying why, for a map with nothing to draw: drawn, it would read as "no evidence"."""
    what = f"Grad-CAM of {model.model_name} for {model.classes[target]!r}"
    if not bool(torch.isfinite(cam).all()):
        dtype = next(net.parameters()).dtype
        why = (f"{dtype} overflowed; load the model in float32 (load_model(..., dtype=torch.float32))"
               if dtype in (torch.float16, torch.bfloat16) else "the network's weights hold NaN or inf; "
               "export the model again from a run whose weights are finite")
        raise ExplainError(f"{what} is not finite (NaN or inf), so no map is drawn: {why}.")
    if not bool(cam.max() > 0):
        why = ("its int8 layers pass no gradient; explain the fp32 model (load_model(..., backend='eager'))"
               if int8_layers(net) else "nothing at the explained layer argues for that class in this photo; "
               "explain another class (class_index=...) or another photo")
        raise ExplainError(f"{what} is all zero, so no map is drawn: {why}.")


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
