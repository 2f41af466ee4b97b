"""The modules our models add to timm's and open_clip's: the CLIP classifier (image tower + linear head),
a faster, equal ConvNeXt V2 Global Response Norm, and `FlowerClassifier`: a `Backend` that runs an exported network
with the classes and preprocessing it is served with. How they are created lives in `factory`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from .classes import CLASSES
from .preprocess import Preprocess


class ClipClassifier(nn.Module):
    """CLIP image encoder + linear head on L2-normalised features (a zero-shot head keeps its meaning)."""

    def __init__(self, visual: nn.Module, num_classes: int = len(CLASSES), quick_gelu: bool = False):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.output_dim, num_classes)
        self.quick_gelu = quick_gelu  # architecture detail the export must record (openai weights use it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(x), dim=-1))


class FastGlobalResponseNorm(GlobalResponseNorm):
    """timm's GlobalResponseNorm, the same function and weights, computed with fewer passes over x:
    the spatial L2 norm as sqrt(sum(x^2)) in fp32 (torch's norm over two non-contiguous dims is a slow
    CPU kernel), and x + bias + weight * x * x_n as one fused x * (1 + weight * x_n) + bias, where the
    factor is only (N, 1, 1, C). Equal up to fp32 rounding; 1.5-6.5x faster on the CPU measured by
    bench/cpu_kernels.py (bench/RESULTS.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.float().square().sum(dim=self.spatial_dim, keepdim=True).sqrt().to(x.dtype)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        scale = torch.addcmul(torch.ones_like(x_n), self.weight.view(self.wb_shape), x_n)
        return torch.addcmul(self.bias.view(self.wb_shape), x, scale)


def replace_modules(net: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace, in place, each submodule `m` of `net` for which `swap(m)` returns a module by that module
    (modules put in are not visited); returns how many were replaced."""
    replaced = 0
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            new = swap(child)
            if new is not None:
                setattr(module, name, new)
                replaced += 1
    return replaced


def use_fast_grn(model: nn.Module) -> nn.Module:
    """Swap every GlobalResponseNorm of `model` for FastGlobalResponseNorm in place (weights untouched)."""
    for module in model.modules():
        if type(module) is GlobalResponseNorm:
            module.__class__ = FastGlobalResponseNorm
    return model


class Backend(Protocol):
    """`forward(batch) -> logits` on `device`, plus the network Grad-CAM differentiates (None: there is none)."""

    name: str  # one of backends.BACKENDS
    device: torch.device  # where the forward runs

    def forward(self, batch: torch.Tensor) -> torch.Tensor: ...

    def gradient_net(self) -> nn.Module | None: ...


@dataclass(frozen=True, eq=False)
class FlowerClassifier:
    """A backend (what runs the network: backends.py) plus what it needs to be fed and how its logits are read:
    the classes, the preprocessing and the temperature served (1.0: the raw softmax). Fixed when built: a
    different backend or temperature is another `load_model` call, never an attribute set afterwards. A plain
    object, not an nn.Module: its network may not be a PyTorch one (ONNX Runtime, a compiled package)."""

    backend: Backend
    family: str  # "cnn" or "clip"
    model_name: str  # the timm / open_clip architecture
    classes: tuple[str, ...]
    prep: Preprocess
    temperature: float = 1.0  # logits / temperature before the softmax: the payload's calibration

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def net(self) -> nn.Module:
        """The PyTorch network of an eager, int8 or package backend (behind a package: built on first use)."""
        return self.backend.net

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) fp32 logits on the CPU, before any temperature."""
        return self.backend.forward(batch).float().cpu()

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) fp32 probabilities, softmax(logits / temperature)."""
        return calibrated_softmax(self.logits(batch), self.temperature)


def calibrated_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / temperature) in fp32: T > 1 softens over-confident probabilities, and the argmax
    never changes (dividing by a positive number keeps the order)."""
    logits = logits.float()
    return (logits if temperature == 1.0 else logits / temperature).softmax(-1)
